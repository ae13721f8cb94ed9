// The hang classes of issue 16, each on the discrete-event engine and worker ranks: the
// verdict and culprit it must give, the guard its cause quotes, and the same layout under
// the seed variant running ok.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { simulateDes } from '../sim/des.js';
import { runActors } from '../actors/supervisor.js';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { verdictOf } from './differential.js';

// The compute limit finds a stall: short, yet far above what these small layers compute on a loaded machine.
const both = async (s: Scenario, computeTimeoutMs = 8000) => ({ des: simulateDes(s).diagnosis, actors: (await runActors(s, { computeTimeoutMs })).diagnosis });

test('kernel-hang: a rank whose local expert got 0 rows stalls in its expert backward, named with the expert, on both engines; never a collective finding', async () => {
  const s = validateScenario({ ep: 4, experts: 8, routing: 'starve:1', variant: 'kernel-hang' });
  const { des, actors } = await both(s, 3000);
  assert.is(des.verdict, 'stall', des.cause);
  assert.equal([...des.culprits], [1]);
  assert.equal([des.communicator, des.position, des.hangs], [null, null, undefined]);
  assert.match(des.cause, /rank 1 has not returned from the expert backward of layer 0, which never returns: expert 2 of rank 1 received 0 rows .*guard zeroRowExpertHangsKernel/);
  assert.match(des.cause, /ranks 0, 2, 3 wait for it in their collectives/);
  assert.is(des.ranks[1]!.state, 'backward.kernelHung');
  assert.equal(verdictOf(actors), verdictOf(des), actors.cause);
  // The worker's layer really did not return: the compute limit found it, quoting the same guard.
  assert.match(actors.cause, /rank 1 has not returned from the expert backward of layer 0, which never returns: expert 2 .*for \d+ ms \(compute limit 3000 ms\)/);
});

test('kernel-hang: every expert receiving rows is ok, and the starved layout under seed is ok', async () => {
  const fed = validateScenario({ ep: 2, experts: 2, topK: 2, tokens: 8, variant: 'kernel-hang' });
  const seed = validateScenario({ ep: 4, experts: 8, routing: 'starve:1', variant: 'seed' });
  for (const s of [fed, seed]) {
    const { des, actors } = await both(s);
    assert.is(des.verdict, 'ok', des.cause);
    assert.is(actors.verdict, 'ok', actors.cause);
  }
});

test('kernel-hang: two stalled ranks in two data-parallel replicas are both named, after every other rank blocked', async () => {
  const s = validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'block', routing: 'explicit', explicit: [[[[0, 1, 0, 1]]], [[[0, 1, 0, 1]]], [[[2, 3, 2, 3]]], [[[2, 3, 2, 3]]]], variant: 'kernel-hang' });
  const { des, actors } = await both(s);
  assert.is(des.verdict, 'stall', des.cause);
  assert.equal([...des.culprits], [1, 2]);
  assert.equal(verdictOf(actors), verdictOf(des), actors.cause);
});

test('wrong-group: the rank that gathers on its dp communicator is the missing member of every ep group; the cause quotes the guard; seed is ok', async () => {
  const s = validateScenario({ ep: 4, dp: 2, experts: 8, fsdp: 'block', variant: 'wrong-group', wrongGroupRank: 1 });
  const { des, actors } = await both(s);
  assert.equal([des.verdict, des.communicator, [...des.culprits]], ['missing', 'ep[dp=0]', [1]], des.cause);
  assert.equal(des.hangs?.map((h) => [h.communicator, [...h.culprits]]), [['ep[dp=0]', [1]], ['ep[dp=1]', [5]]]);
  assert.match(des.cause, /rank 1 all-gathers its experts' gradients on its dp communicator.*variant wrong-group .* so rank 1 skipped grad\.all_gather/);
  const decision = simulateDes(s).snapshots[1]!.context.skips.at(-1)!;
  assert.equal([decision.guard, decision.held], ['gathersExpertGradsOnOwnGroup', false]);
  assert.equal(verdictOf(actors), verdictOf(des), actors.cause);
  const seed = await both({ ...s, variant: 'seed' });
  assert.equal([seed.des.verdict, seed.actors.verdict], ['ok', 'ok']);
});

test('wrong-group needs a dp communicator: dp = 1 is refused with one line', () => {
  assert.throws(() => validateScenario({ ep: 4, experts: 8, variant: 'wrong-group' }), /variant wrong-group .* dp must be at least 2, got 1/);
  assert.throws(() => validateScenario({ ep: 4, dp: 2, experts: 8, variant: 'wrong-group', wrongGroupRank: 4 }), /wrongGroupRank must be an EP rank in \[0, 4\), got 4/);
});

test('uneven-batches: the rank with the shorter shard is missing from the next micro-batch; the cause quotes the guard; an even shard and seed are ok', async () => {
  const s = validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'split', microBatches: 3, variant: 'uneven-batches', evalBatches: 10 });
  const { des, actors } = await both(s);
  // 10 batches over 4 ranks: ranks 0, 1 run 3 micro-batches, ranks 2, 3 run 2.
  assert.is(des.verdict, 'missing', des.cause);
  assert.match(des.cause, /shard of the 10 evaluation batches over 4 ranks holds 2 micro-batch\(es\), the longest 3.*variant uneven-batches/);
  const decision = simulateDes(s).snapshots[2]!.context.skips.at(-1)!;
  assert.equal([decision.guard, decision.held, decision.microBatch], ['moreMicroBatches', false, 1]);
  assert.equal(verdictOf(actors), verdictOf(des), actors.cause);
  for (const ok of [{ ...s, evalBatches: 12 }, { ...s, variant: 'seed' as const }]) {
    const r = await both(validateScenario(ok));
    assert.equal([r.des.verdict, r.actors.verdict], ['ok', 'ok'], r.des.cause);
  }
});

test('second-stream: the order the scenario fixes is followed on both engines; the rank that issued the shared all-gather first is the culprit; one order everywhere and seed are ok', async () => {
  const order = (first: number) => Array.from({ length: 4 }, (_, r) => [r === first ? 'shared.all_gather' : 'fwd.combine', 'fwd.combine'] as const);
  const s = validateScenario({ ep: 2, dp: 2, experts: 4, layers: 2, variant: 'second-stream', streamOrder: order(2).map((row) => [...row]) });
  const { des, actors } = await both(s);
  assert.equal([des.verdict, des.communicator, des.position], ['mismatch', 'ep[dp=1]', 3], des.cause);
  assert.match(des.cause, /rank 2 issued shared\.all_gather of layer 0|rank 3 issued fwd\.combine of layer 0/);
  assert.match(des.cause, /rank 2's shared expert on the second stream completed before its routed experts in layer 0 forward, so it issued shared\.all_gather before fwd\.combine/);
  assert.equal(verdictOf(actors), verdictOf(des), actors.cause);
  for (const ok of [{ ...s, streamOrder: order(-1).map((row) => [...row]) }, { ...s, variant: 'seed' as const }]) {
    const r = await both(validateScenario(ok));
    assert.equal([r.des.verdict, r.actors.verdict], ['ok', 'ok'], r.des.cause);
  }
  assert.throws(() => validateScenario({ ...s, streamOrder: [['fwd.combine']] }), /streamOrder must list, for each of the 4 ranks, 2 entries of 'shared.all_gather' or 'fwd.combine'/);
});

test.run();
