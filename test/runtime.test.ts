// The worker-thread runtime: verdicts for every hazard variant, ledgers equal to the
// single-thread engine's, crashes, cycles and bad messages reported, no thread left behind.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { runActors } from '../actors/supervisor.js';
import { PendingArrivals } from '../actors/arrivals.js';
import { actorRanks } from '../actors/caseRanks.js';
import { simulateDes } from '../sim/des.js';
import { reportFromDes } from '../sim/report/fromDes.js';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { canonicalLedger } from './ledger.js';
import { loadCase, resultTensors, runCase } from '../src/case.js';
import { readSafetensorsFile } from '../src/codec/safetensors.js';
import { relativeError } from '../src/tensor.js';
import { seededRng } from '../src/moe/random.js';
import { goldenDir } from './paths.js';

/** OS threads of this process (Linux): a worker that outlives its run shows up here. */
const threadCount = () => readdirSync('/proc/self/task').length;

test('golden cases match within 1e-5 with every rank a worker thread, exchanging over MessagePorts and through shared memory', async () => {
  const files = readdirSync(goldenDir).filter((f) => f.endsWith('.safetensors'));
  assert.ok(files.length >= 6);
  for (const f of files) {
    const path = join(goldenDir, f);
    const [data, file] = await Promise.all([loadCase(path), readSafetensorsFile(path)]);
    for (const exchange of ['ports', 'shared'] as const) {
      const got = resultTensors(await runCase(data, { runRanks: actorRanks({ exchange }) }));
      // Exactly the results the seed wrote: none missing, none extra, so the loop below checks them all.
      const expected = [...file.tensors.keys()].filter((k) => k.startsWith('expected.')).map((k) => k.slice('expected.'.length));
      assert.ok(expected.length > 0, `${f}: no expected.* tensors`);
      assert.equal([...got.keys()].sort(), expected.sort(), `${f} over ${exchange}`);
      for (const [name, t] of got) {
        const want = file.tensors.get(`expected.${name}`);
        assert.ok(want, `${f}: expected.${name} missing`);
        const err = relativeError(t, want!);
        assert.ok(err <= 1e-5, `${f} over ${exchange}: ${name} relative error ${err}`);
      }
    }
  }
});

test('starve:1 under no-dispatch-edge: missing bwd.dispatch on ep, culprit rank 1, detected at once', async () => {
  const r = await runActors(validateScenario({ ep: 4, experts: 8, topK: 2, routing: 'starve:1', variant: 'no-dispatch-edge' }));
  const d = r.diagnosis;
  assert.is(d.verdict, 'missing');
  assert.is(d.communicator, 'ep');
  assert.equal(d.culprits, [1]);
  assert.match(d.cause, /rank 1 received 0 rows in layer 0/);
  assert.match(d.cause, /skipped bwd\.dispatch/);
  assert.ok(d.ranks.some((x) => x.rank !== 1 && x.op === 'bwd.dispatch'), 'a peer waits in bwd.dispatch');
  assert.ok(d.detectedAfterMs! < 5000, `detected after ${d.detectedAfterMs} ms, well before the 10 s collective limit`);
});

const ok = async (s: Partial<Scenario>) => {
  const d = (await runActors(validateScenario(s))).diagnosis;
  assert.is(d.verdict, 'ok', `${JSON.stringify(s)}: ${d.cause}`);
};

test('the seed variant completes for every routing generator', async () => {
  for (const routing of ['uniform', 'zipf:1.5', 'starve:1', 'hot:3', 'empty:2']) await ok({ ep: 4, routing });
});

test('the seed variant completes for ep 1, 2, 4, 8 and for dp=2 with FSDP under every wrap policy', async () => {
  for (const ep of [1, 2, 4, 8]) await ok({ ep, experts: 8 });
  for (const fsdp of ['block', 'split', 'experts'] as const) await ok({ ep: 2, experts: 4, dp: 2, fsdp, routing: 'starve:1', packed: false });
});

const hazards: { variant: Scenario['variant']; triggers: Partial<Scenario>; harmless: Partial<Scenario>; verdict: string; culprits: number[] }[] = [
  { variant: 'no-dispatch-edge', triggers: { routing: 'starve:2' }, harmless: { routing: 'uniform' }, verdict: 'missing', culprits: [2] },
  { variant: 'skip-empty-sends', triggers: { routing: 'empty:3' }, harmless: { routing: 'uniform', tokens: 32 }, verdict: 'mismatch', culprits: [3] },
  { variant: 'early-exit', triggers: { layers: 2, earlyExitRank: 1, earlyExitAfterLayers: 1 }, harmless: { layers: 2, earlyExitRank: 1, earlyExitAfterLayers: 2 }, verdict: 'missing', culprits: [1] },
  { variant: 'local-capacity', triggers: { routing: 'empty:1' }, harmless: { routing: 'uniform' }, verdict: 'mismatch', culprits: [1] },
  {
    variant: 'no-unused-expert-grads',
    triggers: { dp: 2, fsdp: 'split', packed: false, routing: 'starve:1' },
    harmless: { dp: 2, fsdp: 'split', packed: false, routing: 'uniform', tokens: 64 },
    verdict: 'mismatch',
    culprits: [1],
  },
];

for (const h of hazards) {
  test(`${h.variant} is caught where it triggers, as the engine catches it, and passes where it does not`, async () => {
    const s = validateScenario({ ep: 4, variant: h.variant, ...h.triggers });
    const d = (await runActors(s)).diagnosis;
    assert.is(d.verdict, h.verdict, `${h.variant}: ${d.cause}`);
    assert.equal([...d.culprits], h.culprits);
    const engine = simulateDes(s).diagnosis;
    assert.equal([d.communicator, d.position, d.hangs], [engine.communicator, engine.position, engine.hangs]);
    assert.match(d.cause, new RegExp(`variant ${h.variant}`));
    await ok({ ep: 4, variant: h.variant, ...h.harmless });
  });
}

test('early exit at the next micro-batch, after the backward\'s FSDP collectives: the rank issues them, then stops, as the engine has it', async () => {
  // The rank's machine reaches its exit only once the driver has issued the trailing FSDP collectives.
  const s = validateScenario({ ep: 3, dp: 2, fsdp: 'experts', experts: 3, topK: 2, tokens: 0, layers: 1, microBatches: 2, routing: 'zipf:1.5', variant: 'early-exit', earlyExitRank: 2, earlyExitAfterLayers: 1, seed: 698021888 });
  const d = (await runActors(s)).diagnosis;
  const engine = simulateDes(s).diagnosis;
  assert.is(d.verdict, 'missing', d.cause);
  assert.equal([d.communicator, d.position, d.culprits, d.hangs], [engine.communicator, engine.position, engine.culprits, engine.hangs]);
});

test('the ledger the workers produce equals the one predicted by stepping the machines with transition()', async () => {
  const rng = seededRng(20261127);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rng() * xs.length)]!;
  for (let i = 0; i < 6; i++) {
    const ep = pick([1, 2, 4]);
    const dp = pick([1, 1, 2]);
    const s = validateScenario({
      ep,
      dp,
      experts: ep * pick([1, 2, 3]),
      topK: 1,
      tokens: pick([0, 3, 8]),
      layers: pick([1, 2]),
      microBatches: pick([1, 2]),
      routing: pick(['uniform', 'zipf:2', `hot:0`]),
      fsdp: dp > 1 ? pick(['block', 'split', 'experts'] as const) : null,
      seed: Math.floor(rng() * 1e6),
    });
    const actors = await runActors(s);
    const des = simulateDes(s);
    assert.is(actors.diagnosis.verdict, des.diagnosis.verdict, JSON.stringify(s));
    assert.equal(canonicalLedger(actors.ledger), canonicalLedger(des.ledger), JSON.stringify(s));
  }
});

test('each worker records the same state path, microstep by microstep, as the engine report', async () => {
  const s = validateScenario({ ep: 2, experts: 4, dp: 2, fsdp: 'split', layers: 2, routing: 'starve:1' });
  const actors = await runActors(s);
  const des = reportFromDes(s);
  assert.equal(actors.paths, des.paths);
});

test('the layer-metric variant runs its metric all-reduce on the workers and is caught on a rank that routed nothing', async () => {
  await ok({ ep: 4, variant: 'layer-metric' });
  const d = (await runActors(validateScenario({ ep: 4, variant: 'layer-metric', routing: 'empty:2' }))).diagnosis;
  assert.is(d.verdict, 'mismatch');
  assert.ok(d.ranks.every((r) => r.op === 'metric.all_reduce'));
});

test('a worker that throws mid-collective gives crash at once and leaves no thread alive', async () => {
  const s = validateScenario({ ep: 4 });
  await runActors(s); // warm up: libuv and V8 helper threads start lazily
  const before = threadCount();
  const t0 = performance.now();
  const r = await runActors(s, { faults: [{ kind: 'throw', rank: 2, op: 'fwd.combine' }] });
  assert.is(r.diagnosis.verdict, 'crash');
  assert.equal(r.diagnosis.culprits, [2]);
  assert.match(r.diagnosis.cause, /injected fault/);
  assert.ok(r.diagnosis.detectedAfterMs! < 1000);
  assert.ok(performance.now() - t0 < 10_000);
  assert.is(threadCount(), before, 'every worker thread has exited');
});

test('a cross-communicator ordering gives cycle naming the ranks in it', async () => {
  // dp group 0 starves ep rank 1, group 1 starves ep rank 0: those ranks skip the experts
  // unit's reduce-scatter and wait in bwd.dispatch while their peers wait in the reduce-scatter.
  const s = validateScenario({ ep: 4, dp: 2, fsdp: 'experts', variant: 'no-unused-expert-grads', routing: 'starve:1,4' });
  const r = await runActors(s);
  assert.is(r.diagnosis.verdict, 'cycle', r.diagnosis.cause);
  assert.equal([...r.diagnosis.culprits], [0, 1, 4, 5]);
  assert.match(r.diagnosis.cause, /wait-for cycle across communicators/);
  assert.is(simulateDes(s).diagnosis.verdict, 'cycle');
});

test('a rank whose own work never returns is a stall naming it and its work; the ranks waiting for it are not hung', async () => {
  const r = await runActors(validateScenario({ ep: 4 }), { faults: [{ kind: 'stall', rank: 3, op: 'fwd.dispatch' }], timeoutMs: 2000, computeTimeoutMs: 5000 });
  assert.is(r.diagnosis.verdict, 'stall', r.diagnosis.cause);
  assert.equal(r.diagnosis.culprits, [3]);
  assert.match(r.diagnosis.cause, /rank 3 has not returned from its work before fwd\.dispatch of layer 0 for \d+ ms \(compute limit 5000 ms\)/);
  assert.match(r.diagnosis.cause, /ranks 0–2 wait for it in their collectives, which is not a hang of theirs/);
});

test('a healthy step whose compute outlasts the collective limit is ok: waiting for a computing peer is not a hang', async () => {
  // The TypeScript kernels take well over 1 s for this layer (the example); only collectives are held to the limit.
  const r = await runActors(validateScenario({ ep: 2, experts: 4, topK: 2, tokens: 2048, dim: 256, hidden: 512 }), { timeoutMs: 1000 });
  assert.ok(r.wallMs > 1000, `the run took ${r.wallMs} ms: too fast to show the point`);
  assert.is(r.diagnosis.verdict, 'ok', r.diagnosis.cause);
});

test('a rank that reports its data arrived before the ledger proves the collective complete is not waiting (the reports race across workers)', () => {
  const p = new PendingArrivals(2);
  // Rank 0 issues, rank 0's data arrives and it reports; only then does rank 1's issue complete the ledger.
  p.arrived(0, 10);
  p.proven(0, 12);
  p.proven(1, 12);
  assert.equal(p.lateAt(5000, 1000), [1], 'rank 1 has not reported: its data is late');
  p.arrived(1, 20);
  assert.ok(p.none());
  assert.equal(p.lateAt(5000, 1000), []);
  // In order: proved first, reported later, then the next collective proved and never reported.
  p.proven(0, 30);
  p.arrived(0, 35);
  p.proven(0, 40);
  assert.equal(p.lateAt(1039, 1000), []);
  assert.equal(p.lateAt(1041, 1000), [0]);
});

test('a worker posting the supervisor a malformed message gives violation, not a supervisor crash', async () => {
  const r = await runActors(validateScenario({ ep: 2, experts: 4 }), { faults: [{ kind: 'garbage-to-supervisor', rank: 1, op: 'fwd.combine' }], timeoutMs: 5000 });
  assert.is(r.diagnosis.verdict, 'violation', r.diagnosis.cause);
  assert.match(r.diagnosis.cause, /rank 1 sent the supervisor a message it cannot use \(type issue\)/);
});

test('malformed and unexpected messages between actors are reported, never crash, never hang', async () => {
  const s = validateScenario({ ep: 4 });
  const cases = [
    { kind: 'corrupt-message' as const, pattern: /corrupt message/ },
    { kind: 'wrong-communicator' as const, pattern: /communicator 'ep-bogus'/ },
    // Re-tagged with the previous position: stale once the receiver completed it, the wrong op while it still waits in it.
    { kind: 'stale-position' as const, pattern: /stale chunk|expected fwd\.counts from rank 1 at ep position 0 but received fwd\.dispatch/ },
  ];
  for (const c of cases) {
    const r = await runActors(s, { faults: [{ kind: c.kind, rank: 1, op: 'fwd.dispatch' }], timeoutMs: 5000 });
    assert.is(r.diagnosis.verdict, 'violation', `${c.kind}: ${r.diagnosis.cause}`);
    assert.match(r.diagnosis.cause, c.pattern);
  }
});

test.run();
