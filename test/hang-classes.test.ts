// The hang classes of issue 16, each on the discrete-event engine and worker ranks (the
// pipeline's on launched processes too): the verdict and culprit it must give, the guard its
// cause quotes, and the same layout under the seed variant running ok.
import { test } from 'uvu';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as assert from 'uvu/assert';
import { simulateDes } from '../sim/des.js';
import { runActors } from '../actors/supervisor.js';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { communicators, commOf } from '../machines/mesh.js';
import { VARIANT_NAMES } from '../machines/variants.js';
import { runScenarioOnProcesses } from '../cli/localRanks.js';
import { verdictOf } from './differential.js';
import { canonicalLedger } from './ledger.js';
import { runCli } from './cli.js';

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

test('stage-metric: the stages without MoE layers all-reduce fewer aux-loss keys over the pipeline group and are missing there, on the engine, worker ranks and launched processes; the cause quotes the guard', async () => {
  // pp 4 × ep 2: stages 0 and 3 dense, so ranks 0, 1 and 6, 7 hold no key; stages 1, 2 hold one.
  const s = validateScenario({ ep: 2, experts: 4, moeLayers: [0, 1, 1, 0], variant: 'stage-metric' });
  assert.equal([s.pp, s.layers], [4, 1]);
  const des = simulateDes(s);
  const d = des.diagnosis;
  assert.equal([d.verdict, d.communicator, d.position, [...d.culprits]], ['missing', 'pp[ep=0]', 0, [0, 6]], d.cause);
  assert.equal(d.hangs?.map((h) => [h.verdict, h.communicator, [...h.culprits]]), [['missing', 'pp[ep=0]', [0, 6]], ['missing', 'pp[ep=1]', [1, 7]]]);
  assert.match(d.cause, /rank 0 on pipeline stage 0 holds 0 MoE layers, so its aux-loss tracker has 0 keys and it all-reduced 0 times over its pipeline group, where stage 1 holds 1 MoE layer/);
  assert.match(d.cause, /variant stage-metric .* so ranks 0, 6 skipped metric\.all_reduce; ranks 2, 4 wait in metric\.all_reduce \(pp\[ep=0\], position 0\)/);
  const decision = des.snapshots[6]!.context.skips.at(-1)!;
  assert.equal([decision.guard, decision.held, decision.skipped], ['allReducesNextLocalKey', false, ['metric.all_reduce']]);
  // The stages with a key issue one all-reduce of one element each on their pipeline group; the EP exchanges are the stage's own.
  const pp = des.ledger.filter((e) => e.communicator.startsWith('pp'));
  assert.equal(pp.map((e) => [e.rank, e.op, e.size]).sort(), [[2, 'metric.all_reduce', 1], [3, 'metric.all_reduce', 1], [4, 'metric.all_reduce', 1], [5, 'metric.all_reduce', 1]]);
  assert.ok(des.ledger.every((e) => e.comm !== 'ep' || e.communicator === commOf(s, e.rank, 'ep')));
  const actors = (await runActors(s)).diagnosis;
  assert.equal(verdictOf(actors), verdictOf(d), actors.cause);
  const processes = (await runScenarioOnProcesses(s, ['--timeout', '30000'])).diagnosis;
  assert.equal(verdictOf(processes), verdictOf(d), processes.cause);
});

test('stage-metric: a stage with more MoE layers waits in the all-reduce of the key its peer stage does not hold', () => {
  const d = simulateDes(validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'block', moeLayers: [2, 1], variant: 'stage-metric' })).diagnosis;
  assert.equal([d.verdict, d.communicator, d.position, [...d.culprits]], ['missing', 'pp[dp=0,ep=0]', 1, [4]], d.cause);
  assert.equal(d.hangs?.map((h) => h.communicator), ['pp[dp=0,ep=0]', 'pp[dp=0,ep=1]', 'pp[dp=1,ep=0]', 'pp[dp=1,ep=1]']);
  assert.equal(d.ranks.filter((r) => r.state === 'stageMetricKey').map((r) => [r.rank, r.layer]), [[0, 1], [1, 1], [2, 1], [3, 1]]);
});

test('stage-metric: the same layouts under seed (one all-reduce holding every stage\'s keys) and equal stages under stage-metric are ok on every engine', async () => {
  const layouts = [
    validateScenario({ ep: 2, experts: 4, moeLayers: [0, 1, 1, 0], variant: 'seed' }),
    validateScenario({ ep: 2, experts: 4, pp: 2, layers: 2, variant: 'stage-metric' }),
  ];
  for (const s of layouts) {
    const des = simulateDes(s);
    assert.is(des.diagnosis.verdict, 'ok', des.diagnosis.cause);
    const actors = await runActors(s);
    const processes = await runScenarioOnProcesses(s, ['--timeout', '30000']);
    assert.equal([actors.diagnosis.verdict, processes.diagnosis.verdict], ['ok', 'ok'], `${actors.diagnosis.cause} / ${processes.diagnosis.cause}`);
    assert.equal(canonicalLedger(actors.ledger), canonicalLedger(des.ledger));
    assert.equal(canonicalLedger(processes.ledger), canonicalLedger(des.ledger));
  }
  // Under seed every rank, dense stages too, all-reduces once the 2 keys of the whole pipeline.
  const seed = simulateDes(layouts[0]!).ledger.filter((e) => e.comm === 'pp');
  assert.equal([seed.length, new Set(seed.map((e) => e.size))], [8, new Set([2])]);
});

test('the pipeline is validated in one line: stage-metric needs pp >= 2, one MoE-layer count per stage, some stage with an MoE layer, layers the largest count', async () => {
  assert.throws(() => validateScenario({ ep: 2, experts: 4, variant: 'stage-metric' }), /variant stage-metric all-reduces over the pipeline group: pp must be at least 2, got 1/);
  assert.throws(() => validateScenario({ ep: 2, experts: 4, pp: 3, moeLayers: [0, 1] }), /moeLayers must give each of the 3 pipeline stage\(s\) its number of MoE layers .*got \[0,1\]/);
  assert.throws(() => validateScenario({ ep: 2, experts: 4, moeLayers: [0, -1] }), /moeLayers must give each of the 2 pipeline stage/);
  assert.throws(() => validateScenario({ ep: 2, experts: 4, moeLayers: [0, 0] }), /moeLayers 0,0: no pipeline stage holds an MoE layer/);
  assert.throws(() => validateScenario({ ep: 2, experts: 4, moeLayers: [1, 2], layers: 3 }), /layers \(3\) must be the most MoE layers of any stage \(2\)/);
  assert.throws(() => validateScenario({ ep: 2, experts: 4, pp: 0 }), /pp must be a positive integer, got 0/);
  const bad = await runCli(['sim', '--engine', 'des', '--moe-layers', '0,1,x']);
  assert.equal([bad.code, bad.stderr.trim().split('\n').length], [1, 1], bad.stderr);
  assert.match(bad.stderr, /--moe-layers must be comma-separated MoE layer counts, one per pipeline stage/);
});

test('sim: --pp and --moe-layers run stage-metric; a written scenario replays it; the variants\' knobs have flags, each refused under another variant', async () => {
  const flags = ['sim', '--engine', 'des', '--json', '--ep', '2', '--experts', '4', '--moe-layers', '1,2', '--variant', 'stage-metric'];
  const r = await runCli(flags);
  assert.is(r.code, 2, r.stderr);
  const viaFlags = JSON.parse(r.stdout);
  assert.equal([viaFlags.verdict, viaFlags.communicator, viaFlags.position, viaFlags.culprits], ['missing', 'pp[ep=0]', 1, [0]]);
  const dir = mkdtempSync(join(tmpdir(), 'ep-pp-'));
  try {
    const file = join(dir, 's.json');
    writeFileSync(file, JSON.stringify(validateScenario({ ep: 2, experts: 4, moeLayers: [1, 2], variant: 'stage-metric' })));
    const replay = await runCli(['sim', '--engine', 'des', '--json', '--scenario', file]);
    assert.equal(JSON.parse(replay.stdout), viaFlags);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const knobs = [
    { flags: ['--dp', '2', '--variant', 'wrong-group', '--wrong-group-rank', '0'], culprits: [0] },
    { flags: ['--dp', '2', '--micro-batches', '2', '--variant', 'uneven-batches', '--eval-batches', '5'], culprits: [1] },
    { flags: ['--layers', '2', '--variant', 'second-stream', '--shared-first', '1'], culprits: [0, 1] },
  ];
  for (const k of knobs) {
    const run = await runCli(['sim', '--engine', 'des', '--json', '--ep', '2', '--experts', '4', ...k.flags]);
    assert.equal([run.code, JSON.parse(run.stdout).culprits], [2, k.culprits], run.stdout + run.stderr);
  }
  const ok = await runCli(['sim', '--engine', 'des', '--ep', '2', '--experts', '4', '--variant', 'second-stream', '--shared-first', 'none']);
  assert.is(ok.code, 0, ok.stdout);
  for (const flag of [['--wrong-group-rank', '0'], ['--eval-batches', '3'], ['--shared-first', '0']]) {
    const refused = await runCli(['sim', '--engine', 'des', '--ep', '2', '--experts', '4', ...flag]);
    assert.equal([refused.code, refused.stderr.trim()], [1, `ep-actors: ${flag[0]} applies to --variant ${{ '--wrong-group-rank': 'wrong-group', '--eval-batches': 'uneven-batches', '--shared-first': 'second-stream' }[flag[0]!]}`]);
  }
  const help = await runCli(['sim', '--help']);
  for (const f of ['--pp N', '--moe-layers', '--wrong-group-rank', '--eval-batches', '--shared-first']) assert.ok(help.stdout.includes(f), f);
});

test('pp = 1: the dp × ep mesh keeps its numbering and communicators, and pp 1 or one MoE-layer count per stage changes no ledger', () => {
  for (const [ep, dp] of [[4, 1], [2, 2], [1, 3], [3, 2]] as const) {
    const expected = [
      ...Array.from({ length: dp }, (_, d) => ({ id: dp > 1 ? `ep[dp=${d}]` : 'ep', kind: 'ep', members: Array.from({ length: ep }, (_, e) => d * ep + e) })),
      ...(dp > 1 ? Array.from({ length: ep }, (_, e) => ({ id: ep > 1 ? `dp[ep=${e}]` : 'dp', kind: 'dp', members: Array.from({ length: dp }, (_, d) => d * ep + e) })) : []),
    ];
    assert.equal(communicators({ ep, dp }), expected);
    assert.equal(communicators({ ep, dp, pp: 1 }), expected);
  }
  for (const variant of VARIANT_NAMES.filter((v) => v !== 'stage-metric')) {
    const base = { ep: 2, dp: 2, experts: 4, layers: 2, microBatches: 2, routing: 'starve:1', variant, ...(variant === 'uneven-batches' ? { evalBatches: 7 } : {}) };
    const ledger = JSON.stringify(simulateDes(validateScenario(base)).ledger);
    assert.is(JSON.stringify(simulateDes(validateScenario({ ...base, pp: 1 })).ledger), ledger, variant);
    assert.is(JSON.stringify(simulateDes(validateScenario({ ...base, moeLayers: [2] })).ledger), ledger, variant);
  }
});

test.run();
