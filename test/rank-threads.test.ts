// Several ranks per worker thread (what the supervisor does beyond 32 ranks, forced here at
// ep=4 and 8): the same verdicts, culprits, ledgers, paths and numbers as one thread per
// rank and as the engine; a rank that crashes is named, and its thread's other ranks end
// with it; a rank that stalls keeps its thread alive, so the verdict is a stall.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { runActors } from '../actors/supervisor.js';
import { casePayloads } from '../actors/caseRanks.js';
import { simulateDes } from '../sim/des.js';
import { reportFromDes } from '../sim/report/fromDes.js';
import { caseScenario, validateScenario, type Scenario } from '../machines/scenario.js';
import { loadCase } from '../src/case.js';
import { canonicalLedger } from './ledger.js';
import { goldenDir } from './paths.js';

const threadCount = () => readdirSync('/proc/self/task').length;

const scenarios: Partial<Scenario>[] = [
  { ep: 8, experts: 16 },
  { ep: 4, variant: 'no-dispatch-edge', routing: 'starve:2' },
  { ep: 4, variant: 'skip-empty-sends', routing: 'empty:3' },
  { ep: 4, dp: 2, fsdp: 'split', packed: false, variant: 'no-unused-expert-grads', routing: 'starve:1' },
  // dp groups starve different ep ranks: a wait-for cycle across communicators, between threads and within them.
  { ep: 4, dp: 2, fsdp: 'experts', variant: 'no-unused-expert-grads', routing: 'starve:1,4' },
  { ep: 4, layers: 2, variant: 'early-exit', earlyExitRank: 1, earlyExitAfterLayers: 1 },
];

for (const spec of scenarios) {
  test(`${JSON.stringify(spec)}: 2 and 3 ranks per thread give the verdict, culprits and ledger of one per thread and of the engine`, async () => {
    const s = validateScenario(spec);
    const one = (await runActors(s)).diagnosis;
    const des = simulateDes(s);
    for (const ranksPerThread of [2, 3]) {
      const r = await runActors(s, { ranksPerThread });
      const d = r.diagnosis;
      assert.is(d.verdict, one.verdict, `${ranksPerThread} per thread: ${d.cause}`);
      assert.equal([d.communicator, d.position, [...d.culprits]], [one.communicator, one.position, [...one.culprits]]);
      assert.is(d.verdict, des.diagnosis.verdict);
      assert.equal(canonicalLedger(r.ledger), canonicalLedger(des.ledger));
    }
  });
}

test('ranks sharing a thread record the state paths the engine report has', async () => {
  const s = validateScenario({ ep: 2, experts: 4, dp: 2, fsdp: 'split', layers: 2, routing: 'starve:1' });
  assert.equal((await runActors(s, { ranksPerThread: 3 })).paths, reportFromDes(s).paths);
});

test('a case computes the same bytes with 1, 2 and 4 ranks per thread, over ports and through shared memory', async () => {
  const file = readdirSync(goldenDir).find((f) => f.startsWith('ep4') && f.endsWith('.safetensors'));
  assert.ok(file, 'a 4-rank golden case');
  const data = await loadCase(join(goldenDir, file!));
  for (const exchange of ['ports', 'shared'] as const) {
    const runs = await Promise.all([1, 2, 4].map((ranksPerThread) => runActors(caseScenario(data.meta), { casePayloads: casePayloads(data), exchange, ranksPerThread })));
    for (const r of runs) assert.is(r.diagnosis.verdict, 'ok', r.diagnosis.cause);
    const [one, ...shared] = runs.map((r) => r.results.map((b) => Buffer.from(b!).toString('base64')));
    assert.is(one!.length, 4);
    for (const got of shared) assert.equal(got, one);
  }
});

test('a rank that throws while hosted with others is the crash named, its thread\'s other ranks end with it, no thread is left', async () => {
  const s = validateScenario({ ep: 8, experts: 16 });
  await runActors(s, { ranksPerThread: 4 }); // warm up: libuv and V8 helper threads start lazily
  const before = threadCount();
  const r = await runActors(s, { ranksPerThread: 4, faults: [{ kind: 'throw', rank: 5, op: 'fwd.combine' }] });
  assert.is(r.diagnosis.verdict, 'crash', r.diagnosis.cause);
  assert.equal([...r.diagnosis.culprits], [5]);
  assert.match(r.diagnosis.cause, /^rank 5 crashed: injected fault/);
  assert.match(r.diagnosis.cause, /its worker thread, which ended with it, also hosted ranks 4, 6, 7/);
  assert.is(threadCount(), before, 'every worker thread has exited');
});

test('a rank that stalls on a thread it shares with every other rank is a stall, not an exit of the thread', async () => {
  const r = await runActors(validateScenario({ ep: 4 }), { ranksPerThread: 4, faults: [{ kind: 'stall', rank: 3, op: 'fwd.dispatch' }], timeoutMs: 2000, computeTimeoutMs: 3000 });
  assert.is(r.diagnosis.verdict, 'stall', r.diagnosis.cause);
  assert.equal([...r.diagnosis.culprits], [3]);
});

test('a corrupt chunk from a rank to peers in its thread and in another is a violation, as with one thread per rank', async () => {
  const r = await runActors(validateScenario({ ep: 4 }), { ranksPerThread: 2, faults: [{ kind: 'corrupt-message', rank: 1, op: 'fwd.dispatch' }], timeoutMs: 5000 });
  assert.is(r.diagnosis.verdict, 'violation', r.diagnosis.cause);
  assert.match(r.diagnosis.cause, /corrupt message/);
});

test('beyond 32 ranks the default hosts several ranks per thread and agrees with the engine', async () => {
  const s = validateScenario({ ep: 40, experts: 40, routing: 'starve:7', variant: 'no-dispatch-edge' });
  const before = threadCount();
  let most = 0;
  const r = await runActors(s, { onIssue: () => void (most = Math.max(most, threadCount() - before)) });
  assert.ok(most > 0 && most <= 16 + 8, `${most} threads more during the run: at most 16 rank threads (and V8's helpers), not 40`);
  const des = simulateDes(s);
  assert.is(r.diagnosis.verdict, des.diagnosis.verdict, r.diagnosis.cause);
  assert.equal([...r.diagnosis.culprits], [...des.diagnosis.culprits]);
  assert.equal(canonicalLedger(r.ledger), canonicalLedger(des.ledger));
});

test('ranksPerThread must be a positive integer', async () => {
  for (const ranksPerThread of [0, 1.5, -2]) {
    const err = await runActors(validateScenario({ ep: 2 }), { ranksPerThread }).then(() => null, (e: unknown) => e as Error);
    assert.match(err?.message ?? 'no error', /ranksPerThread must be a positive integer/);
  }
});

test.run();
