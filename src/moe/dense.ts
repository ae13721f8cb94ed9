// A dense MoE reference for tests: every token through its top-k experts on one rank with
// all E experts, no exchange and no gradient scale:
//   out[t] = Σ_k weights[t,k] · expert_{indices[t,k]}(x[t])
// It shares nothing with the EP layer's dispatch bookkeeping, so agreement between the
// two checks the permutations and exchanges.
import { Tensor, gatherRows, toFloat64, toIndexArray, type FloatDType } from '../tensor.js';
import type { ExpertBackend, ExpertWeights } from '../ep/types.js';
import { floatTensor } from './experts.js';

export interface DenseResult<F extends FloatDType = FloatDType> {
  readonly out_TD: Tensor<F>;
  /** Present when grad_out was given. */
  readonly gradX_TD?: Tensor<F>;
  readonly gradWeights_TK?: Tensor<F>;
  readonly grads?: ExpertWeights<F>;
}

export async function denseMoe<F extends FloatDType>(
  backend: ExpertBackend,
  experts: ExpertWeights<F>,
  x_TD: Tensor<F>,
  weights_TK: Tensor,
  indices_TK: Tensor,
  gradOut_TD?: Tensor<F>,
): Promise<DenseResult<F>> {
  const E = experts.layout === 'packed' ? (experts.up.shape[0] ?? 0) : experts.experts.length;
  const [T, K] = indices_TK.shape as [number, number];
  const D = x_TD.rowSize;
  const idx = toIndexArray(indices_TK, 'indices');
  const w = toFloat64(weights_TK).data;
  // Entries of each expert in (t, k) order: grouped[e] lists flat entries.
  const grouped: number[][] = Array.from({ length: E }, () => []);
  idx.forEach((e, entry) => {
    if (e < 0 || e >= E) throw new Error(`indices[${Math.floor(entry / K)}, ${entry % K}] = ${e} is outside [0, ${E})`);
    grouped[e]!.push(entry);
  });
  const entries = grouped.flat();
  const rowsPerExpert = grouped.map((g) => g.length);
  const xg = gatherRows(x_TD, entries.map((entry) => Math.floor(entry / K)));
  const fwd = await backend.forward(experts, xg, rowsPerExpert);
  const y = fwd.y.data;
  const out = new Float64Array(T * D);
  entries.forEach((entry, q) => {
    const o = Math.floor(entry / K) * D;
    for (let d = 0; d < D; d++) out[o + d] += w[entry]! * y[q * D + d]!;
  });
  const out_TD = floatTensor(x_TD.dtype, [T, D], out);
  if (!gradOut_TD) return { out_TD };

  const g = gradOut_TD.data;
  const gradY = new Float64Array(entries.length * D);
  const gradWeights = new Float64Array(T * K);
  entries.forEach((entry, q) => {
    const o = Math.floor(entry / K) * D;
    for (let d = 0; d < D; d++) {
      gradY[q * D + d] = w[entry]! * g[o + d]!;
      gradWeights[entry] += g[o + d]! * y[q * D + d]!;
    }
  });
  const bwd = await backend.backward(experts, xg, rowsPerExpert, fwd, floatTensor(x_TD.dtype, [entries.length, D], gradY));
  const gx = bwd.gradX.data;
  const gradX = new Float64Array(T * D);
  entries.forEach((entry, q) => {
    const o = Math.floor(entry / K) * D;
    for (let d = 0; d < D; d++) gradX[o + d] += gx[q * D + d]!;
  });
  return {
    out_TD,
    gradX_TD: floatTensor(x_TD.dtype, [T, D], gradX),
    gradWeights_TK: floatTensor(x_TD.dtype, [T, K], gradWeights),
    grads: bwd.grads,
  };
}
