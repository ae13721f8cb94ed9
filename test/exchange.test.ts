// The exchanges of worker ranks (--exchange): the staged shared-memory exchange produces
// the ledger the MessagePort exchange does and is caught on the same hazards (its golden
// cases are in runtime.test.ts); the GPU exchanges (device-copy, nccl) refuse in one line where there is no
// GPU, and compute the golden case where there is one.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runActors } from '../actors/supervisor.js';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { canonicalLedger } from './ledger.js';
import { readSafetensors, readSafetensorsFile } from '../src/codec/safetensors.js';
import { loadNative } from '../src/native/backend.js';
import { relativeError } from '../src/tensor.js';
import { seededRng } from '../src/moe/random.js';
import { goldenDir } from './paths.js';
import { runCli } from './cli.js';


test('shared memory and MessagePorts give the same verdict and ledger on random scenarios, FSDP over dp=2 included', async () => {
  const rng = seededRng(5150);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rng() * xs.length)]!;
  for (let i = 0; i < 5; i++) {
    const ep = pick([2, 3, 4]);
    const dp = i < 2 ? 2 : 1;
    const s = validateScenario({
      ep, dp, experts: ep * pick([1, 2]), topK: pick([1, 2]), tokens: pick([0, 5, 16]), layers: pick([1, 2]), microBatches: pick([1, 2]),
      routing: pick(['uniform', 'zipf:2', 'starve:1', 'hot:0']), fsdp: dp > 1 ? pick(['block', 'split', 'experts'] as const) : null, seed: Math.floor(rng() * 1e6),
    });
    const [ports, shared] = [await runActors(s), await runActors(s, { exchange: 'shared' })];
    assert.is(shared.diagnosis.verdict, 'ok', `${JSON.stringify(s)}: ${shared.diagnosis.cause}`);
    assert.is(ports.diagnosis.verdict, 'ok');
    assert.equal(canonicalLedger(shared.ledger), canonicalLedger(ports.ledger), JSON.stringify(s));
  }
});

test('hazards are caught through shared memory with the same verdict and culprit as through MessagePorts', async () => {
  const cases: Partial<Scenario>[] = [
    { variant: 'no-dispatch-edge', routing: 'starve:2' },
    { variant: 'skip-empty-sends', routing: 'empty:3' },
    { variant: 'early-exit', layers: 2, earlyExitRank: 1, earlyExitAfterLayers: 1 },
  ];
  for (const c of cases) {
    const s = validateScenario({ ep: 4, ...c });
    const [ports, shared] = [(await runActors(s)).diagnosis, (await runActors(s, { exchange: 'shared' })).diagnosis];
    assert.is(shared.verdict, ports.verdict, `${c.variant}: ${shared.cause}`);
    assert.equal(shared.culprits, ports.culprits, c.variant);
    assert.match(shared.cause, new RegExp(`variant ${c.variant}`));
  }
});

test('damaged staged announcements between worker ranks are violations, never crashes or hangs', async () => {
  const s = validateScenario({ ep: 4 });
  for (const [kind, pattern] of [['corrupt-message', /corrupt message/], ['wrong-communicator', /communicator 'ep-bogus'/], ['stale-position', /stale chunk|expected fwd\.counts from rank 1 at ep position 0 but received fwd\.dispatch/]] as const) {
    const r = await runActors(s, { exchange: 'shared', faults: [{ kind, rank: 1, op: 'fwd.dispatch' }], timeoutMs: 5000 });
    assert.is(r.diagnosis.verdict, 'violation', `${kind}: ${r.diagnosis.cause}`);
    assert.match(r.diagnosis.cause, pattern);
  }
});

const cudaDevices = (): number => {
  try {
    return (loadNative()?.cudaInfo().devices as number | undefined) ?? 0;
  } catch {
    return 0;
  }
};

test('run --exchange device-copy|nccl: one line where there is no GPU, the golden case where there is', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-exchange-'));
  try {
    const golden = join(goldenDir, 'ep4_silu_packed.safetensors');
    for (const exchange of ['device-copy', 'nccl']) {
      const out = join(dir, `${exchange}.safetensors`);
      const r = await runCli(['run', '--case', golden, '--out', out, '--exchange', exchange]);
      const gpus = cudaDevices();
      if (gpus === 0 || (exchange === 'nccl' && gpus < 4)) {
        assert.is(r.code, 1, r.stdout);
        assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
        assert.match(r.stderr, new RegExp(`the ${exchange} exchange (cannot run here|needs)`));
        assert.not.ok(readdirSync(dir).includes(`${exchange}.safetensors`), 'nothing written');
      } else {
        assert.is(r.code, 0, r.stderr);
        const want = await readSafetensorsFile(golden);
        for (const [name, t] of readSafetensors(readFileSync(out), out).tensors) {
          assert.ok(relativeError(t, want.tensors.get(`expected.${name}`)!) <= 1e-5, `${exchange}: ${name}`);
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('--exchange is checked: unknown names, --in-process and the des engine are refused in one line', async () => {
  const golden = join(goldenDir, 'ep1_silu.safetensors');
  const cases: [string[], RegExp][] = [
    [['run', '--case', golden, '--out', '/tmp/never.safetensors', '--exchange', 'carrier-pigeon'], /--exchange must be one of ports, shared, device-copy, nccl, got 'carrier-pigeon'/],
    [['run', '--case', golden, '--out', '/tmp/never.safetensors', '--in-process', '--exchange', 'shared'], /--in-process ranks share one thread/],
    [['sim', '--ep', '2', '--engine', 'des', '--exchange', 'shared'], /needs --engine actors/],
  ];
  for (const [args, pattern] of cases) {
    const r = await runCli(args);
    assert.is(r.code, 1, args.join(' '));
    assert.match(r.stderr, pattern);
  }
  const ok = await runCli(['sim', '--ep', '4', '--experts', '8', '--exchange', 'shared', '--json']);
  assert.is(ok.code, 0, ok.stderr);
  assert.is((JSON.parse(ok.stdout) as { verdict: string }).verdict, 'ok');
});

test.run();
