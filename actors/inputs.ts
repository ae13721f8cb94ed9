// What a rank worker computes on: for a case file, its rank's tensors from the file; for a
// generated scenario, seeded random experts (the same on every rank), activations and the
// scenario's routing. Layers of a generated step are independent draws: the protocol, not
// the numbers, is what a simulation checks.
import { epRankOf } from '../machines/mesh.js';
import { decodeMessage } from '../src/codec/msgpack.js';
import type { ExpertWeights, PackedExperts } from '../src/ep/types.js';
import { localExperts } from '../src/ep/layer.js';
import { convertLayout } from '../src/moe/experts.js';
import { randomTensor, seededRng } from '../src/moe/random.js';
import { Tensor } from '../src/tensor.js';
import { routeTokens } from '../machines/routing.js';
import type { WorkerJob } from './messages.js';

export interface RankStepInputs {
  readonly experts: ExpertWeights<'f32'>;
  readonly gradientScale: boolean;
  x(microBatch: number, layer: number): Tensor<'f32'>;
  routing(microBatch: number, layer: number): { weights_TK: Tensor<'f32'>; indices_TK: Tensor<'i64'> };
  gradOut(microBatch: number, layer: number): Tensor<'f32'>;
}

/** One rank's slice of a case, as the supervisor encodes it for the worker. */
export interface CaseRankJob {
  readonly experts: PackedExperts<'f32'>;
  readonly packed: boolean;
  readonly gradientScale: boolean;
  readonly x_TD: Tensor<'f32'>;
  readonly weights_TK: Tensor<'f32'>;
  readonly indices_TK: Tensor<'i64'>;
  readonly gradOut_TD: Tensor<'f32'>;
}

export function rankInputs(job: WorkerJob): RankStepInputs {
  if (job.casePayload) {
    const c = decodeMessage(job.casePayload) as CaseRankJob;
    return {
      experts: c.packed ? c.experts : convertLayout(c.experts, 'unpacked'),
      gradientScale: c.gradientScale,
      x: () => c.x_TD,
      routing: () => ({ weights_TK: c.weights_TK, indices_TK: c.indices_TK }),
      gradOut: () => c.gradOut_TD,
    };
  }
  const s = job.scenario;
  const [D, H, E] = [s.dim, s.hidden, s.experts];
  const rng = seededRng(s.seed);
  const global: PackedExperts<'f32'> = {
    layout: 'packed',
    activation: s.activation,
    up: randomTensor(rng, 'f32', [E, D, H], 1 / Math.sqrt(D)),
    gate: s.activation === 'silu' ? randomTensor(rng, 'f32', [E, D, H], 1 / Math.sqrt(D)) : null,
    down: randomTensor(rng, 'f32', [E, H, D], 1 / Math.sqrt(H)),
  };
  const local = localExperts(global, s.ep, epRankOf(s, job.rank));
  const draw = (microBatch: number, layer: number, salt: number) => seededRng((s.seed * 7919 + job.rank * 104729 + microBatch * 1299709 + layer * 15485863 + salt) >>> 0);
  const indicesOf = (mb: number, layer: number) => routeTokens(s, job.rank, mb, layer);
  return {
    experts: s.packed ? local : convertLayout(local, 'unpacked'),
    gradientScale: false,
    x: (mb, layer) => randomTensor(draw(mb, layer, 1), 'f32', [indicesOf(mb, layer).length / s.topK, D]),
    routing: (mb, layer) => {
      const idx = indicesOf(mb, layer);
      const r = draw(mb, layer, 2);
      const w = Float32Array.from(idx, () => 0.1 + r());
      for (let t = 0; t < idx.length; t += s.topK) {
        let sum = 0;
        for (let k = 0; k < s.topK; k++) sum += w[t + k]!;
        for (let k = 0; k < s.topK; k++) w[t + k]! /= sum;
      }
      const T = idx.length / s.topK;
      return { weights_TK: new Tensor('f32', [T, s.topK], w), indices_TK: new Tensor('i64', [T, s.topK], BigInt64Array.from(idx, BigInt)) };
    },
    gradOut: (mb, layer) => randomTensor(draw(mb, layer, 3), 'f32', [indicesOf(mb, layer).length / s.topK, D]),
  };
}
