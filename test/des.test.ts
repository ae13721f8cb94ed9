import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { simulateDes } from '../sim/des.js';
import { costModel } from '../sim/cost.js';
import { validateScenario } from '../machines/scenario.js';

test('seed scenario finishes ok; with and without a trace the engine writes the same ledger', () => {
  const s = validateScenario({ ep: 4, experts: 8, layers: 2, microBatches: 2 });
  const a = simulateDes(s);
  const b = simulateDes(s, { trace: true });
  assert.is(a.diagnosis.verdict, 'ok');
  assert.equal(b.ledger, a.ledger);
  // 4 EP all-to-alls forward + 2 backward, per layer and micro-batch, per rank.
  assert.is(a.ledger.length, 6 * 2 * 2 * 4);
});

test('starved rank skips bwd.dispatch under no-dispatch-edge: missing, culprit named', () => {
  const d = simulateDes(validateScenario({ ep: 4, experts: 8, routing: 'starve:1', variant: 'no-dispatch-edge' })).diagnosis;
  assert.is(d.verdict, 'missing');
  assert.equal(d.culprits, [1]);
  assert.match(d.cause, /rank 1 received 0 rows in layer 0/);
});

test('trace: one lane per rank, each collective an X event named by its op with its ledger position', () => {
  const s = validateScenario({ ep: 4, experts: 8, layers: 1 });
  const r = simulateDes(s, { trace: true });
  const lanes = r.trace!.filter((e) => e.ph === 'M').map((e) => e.tid);
  assert.equal(lanes, [0, 1, 2, 3]);
  const collectives = r.spans!;
  assert.is(collectives.length, r.ledger.length);
  const first = collectives.find((e) => e.tid === 2 && e.name === 'fwd.dispatch')!;
  assert.equal(first.args, { communicator: 'ep', position: 1, layer: 0, microBatch: 0 });
  for (const e of [...r.trace!, ...collectives]) if (e.ph === 'X') assert.ok(e.dur! >= 0 && e.ts + e.dur! <= r.simulatedMs * 1e3 + 1e-6);
});

test('simulated time: crossing nodes costs more than staying inside one', () => {
  const s = validateScenario({ ep: 8, experts: 16, tokens: 256, dim: 1024, hidden: 2048 });
  const oneNode = simulateDes(s, { cost: costModel({ ranksPerNode: 8 }) }).simulatedMs;
  const rankPerNode = simulateDes(s, { cost: costModel({ ranksPerNode: 1 }) }).simulatedMs;
  assert.ok(oneNode > 0);
  assert.ok(rankPerNode > oneNode, `${rankPerNode} > ${oneNode}`);
});

test('completion-order: B′ and the experts reduce-scatter issued in crossed orders form a wait-for cycle', () => {
  const s = validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'experts', variant: 'completion-order' });
  // Ranks 0 and 3 see B′ ready first, ranks 1 and 2 the reduce-scatter: 0→1→3→2→0.
  const d = simulateDes(s, { firstReady: (rank) => (rank === 0 || rank === 3 ? 'bwd.dispatch' : 'fsdp.reduce_scatter') }).diagnosis;
  assert.is(d.verdict, 'cycle');
  assert.equal(d.culprits, [0, 1, 2, 3]);
  const seed = simulateDes({ ...s, variant: 'seed' }, { firstReady: (rank) => (rank === 0 || rank === 3 ? 'bwd.dispatch' : 'fsdp.reduce_scatter') }).diagnosis;
  assert.is(seed.verdict, 'ok');
});

test('layer-metric: a rank that routed nothing all-reduces a metric one element short', () => {
  const s = validateScenario({ ep: 4, experts: 8, layers: 2, routing: 'empty:2', variant: 'layer-metric' });
  const r = simulateDes(s);
  assert.is(r.diagnosis.verdict, 'mismatch');
  assert.ok(r.diagnosis.culprits.includes(2));
  const sizes = r.ledger.filter((e) => e.op === 'metric.all_reduce').map((e) => [e.rank, e.size]);
  assert.ok(sizes.some(([rank, size]) => rank === 2 && size === 2));
  assert.ok(sizes.some(([rank, size]) => rank !== 2 && size === 3));
  assert.is(simulateDes({ ...s, variant: 'seed' }).diagnosis.verdict, 'ok');
});

test.run();
