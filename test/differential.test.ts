// Differential: random scenarios (fixed seeds) through the discrete-event engine, worker
// ranks and launched processes agree on verdict, communicator, position, culprits and every
// hung communicator. A failure prints the scenario JSON `sim --scenario` replays.
// `npm run fuzz -- --count N --seed S` runs the same check longer.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { simulateDes } from '../sim/des.js';
import { VARIANT_NAMES } from '../machines/variants.js';
import { disagreement, randomScenarios } from './differential.js';
import type { Scenario } from '../machines/scenario.js';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli } from './cli.js';

const onWorkers = randomScenarios(20261140, 64);
const onProcesses = randomScenarios(7, 10);

test('the random scenarios cover every variant, FSDP with each wrap policy, pipelines with a dense stage, zero-token ranks, several layers and micro-batches, and both hung and ok runs', () => {
  const all = [...onWorkers, ...onProcesses];
  for (const v of VARIANT_NAMES) assert.ok(all.some((s) => s.variant === v), `variant ${v}`);
  for (const w of ['block', 'split', 'experts']) assert.ok(all.some((s) => s.fsdp === w), `fsdp ${w}`);
  assert.ok(all.some((s) => s.tokens === 0 || /^(starve|empty):/.test(s.routing)), 'a zero-token rank');
  assert.ok(all.some((s) => s.layers > 1) && all.some((s) => s.microBatches > 1), 'several layers and micro-batches');
  assert.ok(all.some((s) => s.variant !== 'stage-metric' && (s.pp ?? 1) > 1) && all.some((s) => s.moeLayers?.includes(0)), 'pipelines under other variants, and a dense stage');
  const verdicts = new Set(all.map((s) => simulateDes(s).diagnosis.verdict));
  for (const v of ['ok', 'missing', 'mismatch', 'cycle', 'stall']) assert.ok(verdicts.has(v as never), `some scenario gives ${v} (got ${[...verdicts].join(', ')})`);
});

/** Every scenario through the engine and `engine`; each disagreement printed with the scenario that replays it. */
async function allAgree(scenarios: readonly Scenario[], engine: 'actors' | 'processes'): Promise<void> {
  const failures: string[] = [];
  for (const s of scenarios) {
    const d = await disagreement(s, engine);
    if (d) failures.push(d);
  }
  assert.ok(failures.length === 0, `${failures.length} of ${scenarios.length} disagree:\n${failures.join('\n\n')}`);
}

test(`${onWorkers.length} random scenarios: worker ranks give the engine's verdict, communicator, position, culprits and hangs`, () => allAgree(onWorkers, 'actors'));

test(`${onProcesses.length} random scenarios: launched processes give the engine's verdict, communicator, position, culprits and hangs`, () => allAgree(onProcesses, 'processes'));

test('a completion-order counterexample from check --replay reproduces on all three engines', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-replay-'));
  const file = join(dir, 'cx.json');
  try {
    const check = await runCli(['check', '--ep', '2', '--dp', '2', '--experts', '4', '--fsdp', '--wrap', 'experts', '--variant', 'completion-order', '--replay', file]);
    assert.is(check.code, 2, check.stderr);
    const verdicts = [];
    for (const engine of ['des', 'actors', 'processes']) {
      const r = await runCli(['sim', '--scenario', file, '--engine', engine, '--json']);
      assert.is(r.code, 2, `${engine}: ${r.stderr}`);
      const { verdict, communicator, position, culprits, hangs } = JSON.parse(r.stdout);
      verdicts.push({ engine, verdict, communicator, position, culprits, hangs });
    }
    assert.is(verdicts[0]!.verdict, 'cycle');
    for (const v of verdicts.slice(1)) assert.equal({ ...v, engine: 'des' }, verdicts[0], `${v.engine} differs from des`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a slow healthy step is ok on every engine under a short collective limit: waiting for a computing peer is not a hang', async () => {
  // The TypeScript kernels take well over a second a layer here; only collectives are held to --timeout 1000.
  const flags = ['--ep', '2', '--experts', '4', '--top-k', '2', '--tokens', '2048', '--dim', '256', '--hidden', '512', '--backend', 'ts', '--timeout', '1000', '--json'];
  for (const engine of ['actors', 'processes']) {
    const r = await runCli(['sim', ...flags, '--engine', engine]);
    assert.is(r.code, 0, `${engine}: ${r.stdout}${r.stderr}`);
    assert.is(JSON.parse(r.stdout).verdict, 'ok');
  }
});

test.run();
