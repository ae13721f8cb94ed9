import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runCase, syntheticCase, type CaseData } from '../src/case.js';
import { denseMoe } from '../src/moe/dense.js';
import { convertLayout, tsBackend } from '../src/moe/experts.js';
import { randInt, seededRng } from '../src/moe/random.js';
import { epBackward, epForward, localExpertRange, localExperts } from '../src/ep/layer.js';
import { createInProcessGroup, inProcessRanks } from '../actors/inprocess.js';
import { ACTIVATIONS, type CollectiveOp, type Communicator, type PackedExperts } from '../src/ep/types.js';
import { Tensor, relativeError, type FloatDType } from '../src/tensor.js';
import { ScratchPool } from '../src/ep/scratch.js';
import { loadNative, nativeBackend } from '../src/native/backend.js';

function concatRows<F extends FloatDType | 'i64'>(parts: readonly Tensor<F>[]): Tensor<F> {
  const rowShape = parts[0]!.shape.slice(1);
  const rows = parts.reduce((n, p) => n + (p.shape[0] ?? 0), 0);
  const out = Tensor.zeros(parts[0]!.dtype, [rows, ...rowShape]);
  let at = 0;
  for (const p of parts) {
    (out.data as Float64Array).set(p.data as Float64Array, at);
    at += p.data.length;
  }
  return out;
}

function randomCase(seed: number): CaseData<'f64'> {
  const rng = seededRng(seed);
  const ep = [1, 2, 3, 4, 8][randInt(rng, 5)]!;
  const n = 1 + randInt(rng, 3);
  const E = ep * n;
  // Starve some ranks (never so many that fewer than top_k experts remain).
  const starvedRanks = Array.from({ length: ep }, (_, r) => r).filter(() => rng() < 0.25);
  if (starvedRanks.length === ep) starvedRanks.pop();
  const available = E - starvedRanks.length * n;
  const topK = 1 + randInt(rng, Math.min(available, 3));
  return syntheticCase(
    {
      ep,
      numExperts: E,
      topK,
      dim: 1 + randInt(rng, 5),
      hidden: 1 + randInt(rng, 6),
      activation: ACTIVATIONS[randInt(rng, 3)]!,
      packed: rng() < 0.5,
      gradientScale: false,
      dtype: 'f64',
      tokensPerRank: Array.from({ length: ep }, () => (rng() < 0.2 ? 0 : randInt(rng, 6))),
      starvedRanks,
    },
    seed,
  );
}

test('property: with gradient scale off, the EP layer equals the dense MoE (outputs and all grads)', async () => {
  const base = Number(process.env.EP_SEED ?? 20240601);
  for (let trial = 0; trial < 150; trial++) {
    const seed = base + trial;
    const data = randomCase(seed);
    const { meta } = data;
    const where = `seed ${seed} (ep=${meta.ep} E=${meta.numExperts} k=${meta.topK} ${meta.activation} ${meta.packed ? 'packed' : 'unpacked'}, tokens ${data.ranks.map((r) => r.x_TD.shape[0]).join('/')}); rerun with EP_SEED=${seed}`;
    const ep = await runCase(data, { runRanks: inProcessRanks });
    const experts = meta.packed ? data.experts : convertLayout(data.experts, 'unpacked');
    const dense = await denseMoe(
      tsBackend,
      experts,
      concatRows(data.ranks.map((r) => r.x_TD)),
      concatRows(data.ranks.map((r) => r.weights_TK)),
      concatRows(data.ranks.map((r) => r.indices_TK as Tensor<'i64'>)),
      concatRows(data.ranks.map((r) => r.gradOut_TD)),
    );
    const denseGrads = dense.grads!.layout === 'packed' ? dense.grads! : convertLayout(dense.grads!, 'packed');
    if (denseGrads.layout !== 'packed') throw new Error('unreachable');
    const pairs: [string, Tensor, Tensor][] = [
      ['out', concatRows(ep.ranks.map((r) => r.out_TD)), dense.out_TD],
      ['grad_x', concatRows(ep.ranks.map((r) => r.gradX_TD)), dense.gradX_TD!],
      ['grad_weights', concatRows(ep.ranks.map((r) => r.gradWeights_TK)), dense.gradWeights_TK!],
      ['grad.up_w', ep.grads.up, denseGrads.up],
      ['grad.down_w', ep.grads.down, denseGrads.down],
    ];
    if (ep.grads.gate) pairs.push(['grad.gate_w', ep.grads.gate, denseGrads.gate!]);
    for (const [name, got, want] of pairs) {
      const err = relativeError(got, want);
      if (!(err < 1e-12)) assert.unreachable(`${name} differs from dense by ${err} at ${where}`);
    }
  }
});

test('gradient scale multiplies each entry by (R / N) / c_i of its expert, R the rows its owner received', async () => {
  // top-1, so each token's output is one expert's row: scaled on/off is exactly that factor.
  const spec = { ep: 2, numExperts: 4, topK: 1, dim: 3, hidden: 4, activation: 'relu' as const, packed: true, dtype: 'f64' as const, tokensPerRank: [6, 5] };
  const offCase = syntheticCase({ ...spec, gradientScale: false }, 7);
  const off = await runCase(offCase, { runRanks: inProcessRanks });
  const on = await runCase(syntheticCase({ ...spec, gradientScale: true }, 7), { runRanks: inProcessRanks });
  const N = spec.numExperts / spec.ep;
  const ids = offCase.ranks.map((r) => Array.from(r.indices_TK.data as BigInt64Array, Number));
  const rowsOf = new Array<number>(spec.numExperts).fill(0);
  for (const e of ids.flat()) rowsOf[e]!++;
  const receivedBy = (owner: number) => rowsOf.slice(owner * N, (owner + 1) * N).reduce((a, b) => a + b, 0);
  let scaled = 0;
  ids.forEach((rankIds, rank) => {
    rankIds.forEach((e, t) => {
      const factor = receivedBy(Math.floor(e / N)) / N / rowsOf[e]!;
      if (factor !== 1) scaled++;
      for (let d = 0; d < spec.dim; d++) {
        const want = factor * (off.ranks[rank]!.out_TD.data as Float64Array)[t * spec.dim + d]!;
        const got = (on.ranks[rank]!.out_TD.data as Float64Array)[t * spec.dim + d]!;
        assert.ok(Math.abs(got - want) <= 1e-12 * Math.max(1, Math.abs(want)), `rank ${rank} token ${t} dim ${d}: ${got} vs ${want} (factor ${factor})`);
      }
    });
  });
  assert.ok(scaled > 0, 'some expert has a factor other than 1, so the check can fail');
});

test('E % ep != 0 is an error naming both numbers', async () => {
  assert.throws(() => localExpertRange(6, 4, 0), /num_experts \(6\) must be divisible by ep \(4\)/);
  const group = createInProcessGroup(4);
  const data = syntheticCase({ ep: 2, numExperts: 6, topK: 1, dim: 2, hidden: 2, activation: 'relu', packed: true, gradientScale: false, dtype: 'f64', tokensPerRank: [1, 1] }, 1);
  const ctx = { comm: group.members[0]!, backend: tsBackend, experts: data.experts, numExperts: 6, topK: 1, gradientScale: false, layer: 0, microBatch: 0 };
  const r = data.ranks[0]!;
  try {
    await epForward(ctx, r.x_TD, r.weights_TK, r.indices_TK);
    assert.unreachable('epForward accepted 6 experts over ep 4');
  } catch (err) {
    assert.match(String(err), /num_experts \(6\) must be divisible by ep \(4\)/);
  }
});

/** Collectives each rank issues, recorded around an in-process group. */
function recording(comm: Communicator, log: CollectiveOp[]): Communicator {
  return { name: comm.name, rank: comm.rank, size: comm.size, allToAll: (tag, send, s, r) => (log.push(tag.op), comm.allToAll(tag, send, s, r)) };
}

test('each rank issues A B C D then D\' B\', also a rank that receives nothing or holds no tokens; ep=1 issues none', async () => {
  const data = syntheticCase({ ep: 3, numExperts: 3, topK: 1, dim: 2, hidden: 3, activation: 'gelu', packed: true, gradientScale: true, dtype: 'f64', tokensPerRank: [4, 0, 3], starvedRanks: [2] }, 3);
  const group = createInProcessGroup(3);
  const logs: CollectiveOp[][] = [[], [], []];
  await Promise.all(
    group.members.map(async (comm, rank) => {
      const ctx = { comm: recording(comm, logs[rank]!), backend: tsBackend, experts: localExperts(data.experts, 3, rank), numExperts: 3, topK: 1, gradientScale: true, layer: 0, microBatch: 0 };
      const input = data.ranks[rank]!;
      const { saved } = await epForward(ctx, input.x_TD, input.weights_TK, input.indices_TK);
      if (rank === 2) assert.is(saved.byExpert_R.length, 0);
      await epBackward(ctx, saved, input.gradOut_TD);
    }),
  );
  for (const log of logs) assert.equal(log, ['fwd.counts', 'fwd.dispatch', 'fwd.expert_ids', 'fwd.combine', 'bwd.combine', 'bwd.dispatch']);
});

test('in-process group: inconsistent splits reject every member with one clear error', async () => {
  const group = createInProcessGroup(2);
  const tag = { op: 'fwd.dispatch' as const, layer: 0, microBatch: 0 };
  const rows = (n: number) => Tensor.zeros('f32', [n, 2]);
  // rank 0 sends 1 row to rank 1, but rank 1 expects 2 from rank 0.
  const a = group.members[0]!.allToAll(tag, rows(2), [1, 1], [1, 1]);
  const b = group.members[1]!.allToAll(tag, rows(2), [1, 1], [2, 1]);
  const results = await Promise.allSettled([a, b]);
  for (const r of results) {
    assert.is(r.status, 'rejected');
    assert.match(String((r as PromiseRejectedResult).reason), /ep collective #0: rank 0 sends 1 rows to rank 1 but rank 1 expects 2 in fwd\.dispatch/);
  }
});

test('in-process group: different ops at one position, and a member that never posts, are reported', async () => {
  const g1 = createInProcessGroup(2);
  const t = Tensor.zeros('f64', [0, 1]);
  const a = g1.members[0]!.allToAll({ op: 'bwd.dispatch', layer: 1, microBatch: 0 }, t, [0, 0], [0, 0]);
  const b = g1.members[1]!.allToAll({ op: 'fwd.counts', layer: 1, microBatch: 0 }, t, [0, 0], [0, 0]);
  for (const r of await Promise.allSettled([a, b])) {
    assert.match(String((r as PromiseRejectedResult).reason), /collective #0: rank 0 issued bwd\.dispatch of layer 1 but rank 1 issued fwd\.counts of layer 1/);
  }
  const g2 = createInProcessGroup(2);
  const waiting = g2.members[0]!.allToAll({ op: 'bwd.dispatch', layer: 0, microBatch: 0 }, t, [0, 0], [0, 0]);
  g2.finish(1);
  try {
    await waiting;
    assert.unreachable('a collective completed without every member');
  } catch (err) {
    assert.match(String(err), /rank 1 finished without issuing position 0, where rank 0 waits in bwd\.dispatch/);
  }
});

test('in-process group: all-to-all delivers rows grouped by source rank', async () => {
  const group = createInProcessGroup(2);
  const tag = { op: 'fwd.dispatch' as const, layer: 0, microBatch: 0 };
  const [r0, r1] = await Promise.all([
    group.members[0]!.allToAll(tag, Tensor.from('f32', [3, 1], [1, 2, 3]), [1, 2], [1, 1]),
    group.members[1]!.allToAll(tag, Tensor.from('f32', [2, 1], [4, 5]), [1, 1], [2, 1]),
  ]);
  assert.equal(Array.from(r0!.data), [1, 4]);
  assert.equal(Array.from(r1!.data), [2, 3, 5]);
});


test('scratch pool: a taken buffer comes back for a later take of a fitting size; foreign, repeated and tiny gives are ignored', () => {
  const pool = new ScratchPool();
  const a = pool.take('f32', [256, 256]); // 256 KiB
  assert.is(pool.freeBytes, 0);
  pool.give(a, a); // the second give of the same buffer must not hand it out twice
  assert.is(pool.freeBytes, a.byteLength);
  const b = pool.take('f64', [100, 256]); // 200 KiB: fits within twice its size
  assert.is(b.data.buffer, a.data.buffer);
  assert.is(pool.take('f32', [256, 256]).data.buffer === a.data.buffer, false, 'a buffer in use is not handed out again');
  pool.give(Tensor.unfilled('f32', [256, 256])); // not the pool's: its memory may be shared
  assert.is(pool.freeBytes, 0);
  pool.give(b);
  assert.is(pool.take('f32', [16, 256]).data.buffer === b.data.buffer, false, 'a buffer more than twice the request stays for bigger ones');
  const tiny = pool.take('f32', [4]);
  pool.give(tiny);
  assert.is(pool.freeBytes, b.data.buffer.byteLength, 'small tensors are not kept');
});

test('with a (poisoning) scratch pool, two layers of forward and backward give bit-identical results to fresh buffers (native and TypeScript backends)', async () => {
  const backends = [tsBackend, ...(loadNative() ? [nativeBackend] : [])];
  // ep = 1 too: there the exchanges hand back the very tensor they were given.
  const layouts = [
    { ep: 3, tokensPerRank: [300, 256, 0] },
    { ep: 1, tokensPerRank: [300] },
  ];
  for (const [i, [dtype, layout]] of (['f32', 'f64'] as const).flatMap((d) => layouts.map((l) => [d, l] as const)).entries()) {
    const data = syntheticCase(
      { ep: layout.ep, numExperts: 6, topK: 2, dim: 64, hidden: 96, activation: 'silu', packed: true, gradientScale: i % 2 === 0, dtype, tokensPerRank: layout.tokensPerRank },
      11 + i,
    );
    for (const backend of backends) {
      const run = async (pooled: boolean): Promise<Tensor[]> => {
        const group = createInProcessGroup(data.meta.ep);
        const comms: readonly (Communicator | null)[] = data.meta.ep === 1 ? [null] : group.members;
        const outs = await Promise.all(
          comms.map(async (comm, rank) => {
            // Poisoned: a buffer read after the layer gave it back holds NaN, and the results differ.
            const scratch = pooled ? new ScratchPool({ poison: true }) : undefined;
            const base = { comm, backend, scratch, experts: localExperts(data.experts, data.meta.ep, rank), numExperts: data.meta.numExperts, topK: data.meta.topK, gradientScale: data.meta.gradientScale, microBatch: 0 };
            const input = data.ranks[rank]!;
            const got: Tensor[] = [];
            for (let layer = 0; layer < 2; layer++) {
              const ctx = { ...base, layer };
              const { out_TD, saved } = await epForward(ctx, input.x_TD, input.weights_TK, input.indices_TK);
              const bwd = await epBackward(ctx, saved, input.gradOut_TD);
              const g = bwd.grads as PackedExperts;
              got.push(out_TD, bwd.gradX_TD, bwd.gradWeights_TK, g.up, g.gate!, g.down);
            }
            if (comm) group.finish(rank);
            return got;
          }),
        );
        return outs.flat();
      };
      const fresh = await run(false);
      const pooled = await run(true);
      assert.is(pooled.length, fresh.length);
      pooled.forEach((t, j) => assert.equal(Array.from(t.data as Float64Array), Array.from(fresh[j]!.data as Float64Array), `ep=${data.meta.ep} ${dtype} ${backend.name}: tensor ${j} differs with the pool`));
    }
  }
});

test.run();
