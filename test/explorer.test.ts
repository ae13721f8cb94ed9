import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { explore } from '../sim/explorer.js';
import { runDes, simulateDes } from '../sim/des.js';
import { validateScenario } from '../machines/scenario.js';
import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cliPath } from './paths.js';

test('seed proves over every routing class of ep=4, 8 experts, top-2', () => {
  const r = explore(validateScenario({ ep: 4, experts: 8, topK: 2 }));
  assert.is(r.verdict, 'proved');
  assert.is(r.classesRun, r.classes);
  assert.is(r.symmetries, 24);
  assert.ok(r.classes > 50);
});

test('no-dispatch-edge: the shortest counterexample starves exactly one rank, and replays', () => {
  const r = explore(validateScenario({ ep: 4, experts: 8, topK: 2, variant: 'no-dispatch-edge' }));
  assert.is(r.verdict, 'counterexample');
  const c = r.counterexample!;
  assert.is(c.starvedRanks.length, 1);
  assert.equal(c.diagnosis.culprits, c.starvedRanks);
  assert.is(c.diagnosis.verdict, 'missing');
  // The scenario written by --replay reproduces it, through JSON and validation.
  const replay = validateScenario(JSON.parse(JSON.stringify(c.scenario)));
  assert.is(replay.routing, 'explicit');
  const again = runDes(replay).diagnosis;
  assert.is(again.verdict, 'missing');
  assert.equal(again.culprits, c.starvedRanks);
});

test('check --replay writes a scenario that sim reproduces on both engines', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-check-'));
  const file = join(dir, 'replay.json');
  const cli = (...args: string[]) => spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8', timeout: 60_000 });
  const check = cli('check', '--ep', '4', '--experts', '8', '--top-k', '2', '--variant', 'no-dispatch-edge', '--replay', file, '--json');
  assert.is(check.status, 2, check.stderr);
  for (const engine of ['actors', 'des']) {
    const sim = cli('sim', '--scenario', file, '--engine', engine, '--json');
    assert.is(sim.status, 2, `${engine}: ${sim.stderr}`);
    const d = JSON.parse(sim.stdout);
    assert.is(d.verdict, 'missing', engine);
    assert.is(d.culprits.length, 1, engine);
  }
});

test('skip-empty-sends: shortest counterexample has no starved rank, one rank holding tokens', () => {
  const c = explore(validateScenario({ ep: 4, experts: 8, topK: 2, variant: 'skip-empty-sends' })).counterexample!;
  assert.is(c.starvedRanks.length, 0);
  assert.is(c.ranks.filter((k) => k.holdsTokens).length, 1);
});

test('completion-order: schedules explored, the crossing order found and replayed with its orders', () => {
  const r = explore(validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'experts', variant: 'completion-order' }));
  assert.is(r.verdict, 'counterexample');
  const c = r.counterexample!;
  assert.is(c.diagnosis.verdict, 'cycle');
  assert.ok(c.firstReady);
  assert.is(simulateDes(JSON.parse(JSON.stringify(c.scenario))).diagnosis.verdict, 'cycle');
  assert.is(explore(validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'experts' })).verdict, 'proved');
});

test('early-exit keeps its distinguished rank out of the symmetry group', () => {
  const r = explore(validateScenario({ ep: 4, experts: 8, microBatches: 2, variant: 'early-exit' }));
  assert.is(r.symmetries, 6);
  assert.is(r.counterexample!.diagnosis.culprits[0], 3);
});

test('per-rank classes lose nothing: every zero/non-zero pattern of rows per (source, destination) pair agrees with the explorer', () => {
  // ep=3, 2 experts per rank, top-1: a non-zero pair (s, d) sends one token from s to
  // expert (s + d) mod 2 of rank d. 2^9 patterns cover every pair-level routing class.
  const ep = 3;
  const base = { ep, experts: 2 * ep, topK: 1 };
  for (const variant of ['seed', 'no-dispatch-edge', 'skip-empty-sends', 'local-capacity'] as const) {
    let pairHangs = 0;
    for (let mask = 0; mask < 1 << (ep * ep); mask++) {
      const explicit = Array.from({ length: ep }, (_, s) => {
        const ids: number[] = [];
        for (let d = 0; d < ep; d++) if (mask & (1 << (s * ep + d))) ids.push(2 * d + ((s + d) % 2));
        return [[ids]];
      });
      const tokens = Math.max(...explicit.map((r) => r[0]![0]!.length));
      const verdict = runDes(validateScenario({ ...base, variant, tokens, routing: 'explicit', explicit })).diagnosis.verdict;
      if (verdict !== 'ok') pairHangs++;
    }
    const r = explore(validateScenario({ ...base, variant }));
    assert.is(r.verdict === 'proved', pairHangs === 0, `${variant}: explorer ${r.verdict}, ${pairHangs} of 512 pair patterns hang`);
  }
});

test.run();
