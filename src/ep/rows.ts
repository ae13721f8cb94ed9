// The EP layer's row bookkeeping: moving rows between token, send and expert order, the
// weighted combine, the routing-weight gradient. Native kernels when the addon is loaded,
// TypeScript loops otherwise, with the same arithmetic.
import { Tensor, type DType, type FloatDType } from '../tensor.js';
import { loadNative, type NativeAddon } from '../native/backend.js';
import { takeUnfilled, type ScratchPool } from './scratch.js';

export type Floats = Float32Array | Float64Array;

// The row bookkeeping runs on the one JS thread that serves every in-process rank;
// as TypeScript loops it cost about 100 ms of CPU per EP step (ep=4, T=1024, D=256), a third
// of the expert GEMMs. When the addon is loaded the same operations run there, with the same
// arithmetic (f64 products and sums, one rounding, rows in order), so results do not
// depend on which path ran; the loops remain for builds without the addon.
let rowKernels: NativeAddon | null | undefined;
function native(): NativeAddon | null {
  if (rowKernels === undefined) rowKernels = loadNative();
  return rowKernels;
}

/** dst row i ← src row index[i] (gather), or dst row index[i] ← src row i (scatter); times scale[i] when given. */
export function moveRows(src: Floats, index: Int32Array, D: number, dst: Floats, scale: Float64Array | null, scatter: boolean): void {
  const addon = native();
  if (addon && D > 0) {
    addon.moveRows(src, D, index, dst, scale, scatter);
    return;
  }
  const rows = (scatter ? dst.length : src.length) / D;
  for (let i = 0; i < index.length; i++) {
    const r = index[i]!;
    if (!(r >= 0 && r < rows)) throw new Error(`row index ${r} outside [0, ${rows})`);
    const s = (scatter ? i : r) * D;
    const o = (scatter ? r : i) * D;
    if (scale) {
      const f = scale[i]!;
      for (let d = 0; d < D; d++) dst[o + d] = f * src[s + d]!;
    } else {
      dst.set(src.subarray(s, s + D), o); // a memcpy: faster than an element loop
    }
  }
}

/** The rows of `t` in a new order: out[i] = t[index[i]] (times scale[i]). */
export function gatherRows<F extends DType>(t: Tensor<F>, index: Int32Array, scale: Float64Array | null = null, scratch?: ScratchPool): Tensor<F> {
  const out = takeUnfilled(scratch, t.dtype, [index.length, ...t.shape.slice(1)]);
  moveRows(t.data as Floats, index, t.rowSize, out.data as Floats, scale, false);
  return out;
}

/**
 * Each token's send positions, ascending: positions_TK[t·K + k] is the k-th position p (in
 * send order) whose row belongs to token t. Every token has exactly K entries.
 */
export function tokenPositions(token_S: Int32Array, T: number, K: number): Int32Array {
  const positions = new Int32Array(T * K);
  const filled = new Int32Array(T);
  for (let p = 0; p < token_S.length; p++) {
    const t = token_S[p]!;
    positions[t * K + filled[t]!++] = p;
  }
  return positions;
}

/**
 * The combine: out[t] = Σ_k weight[p]·rows[p] over token t's positions p (weight 1 when
 * null), summed in f64 from 0 in send order and rounded once into the rows' dtype — the
 * seed's scatter_add, with one fixed summation order whatever ran it.
 */
export function combineRows<F extends FloatDType>(rows: Tensor<F>, positions_TK: Int32Array, K: number, weight_S: Float64Array | null, T: number, scratch?: ScratchPool): Tensor<F> {
  const D = rows.rowSize;
  const out = takeUnfilled(scratch, rows.dtype, [T, D]);
  const src = rows.data as Floats;
  const dst = out.data as Floats;
  const addon = native();
  if (addon && D > 0) {
    addon.combineRows(src, D, positions_TK, K, weight_S, dst);
    return out;
  }
  const acc = new Float64Array(D);
  for (let t = 0; t < T; t++) {
    acc.fill(0);
    for (let k = 0; k < K; k++) {
      const p = positions_TK[t * K + k]!;
      const w = weight_S ? weight_S[p]! : 1;
      for (let d = 0; d < D; d++) acc[d] += w * src[p * D + d]!;
    }
    dst.set(acc, t * D); // one rounding into f32 (or none for f64)
  }
  return out;
}

/** gr[p] = w[p] · g[token[p]] (rounded once into gr's dtype); gw[entry[p]] = <g[token[p]], ret[p]> in f64. */
export function routeGrad(g: Floats, D: number, ret: Floats, token_S: Int32Array, entry_S: Int32Array, w_S: Float64Array, gr: Floats, gw: Float64Array): void {
  const addon = native();
  if (addon && D > 0) {
    addon.routeGrad(g, D, ret, token_S, entry_S, w_S, gr, gw);
    return;
  }
  for (let p = 0; p < token_S.length; p++) {
    const o = token_S[p]! * D;
    const s = p * D;
    const w = w_S[p]!;
    let dot = 0;
    for (let d = 0; d < D; d++) {
      const gv = g[o + d]!;
      gr[s + d] = w * gv;
      dot += gv * ret[s + d]!;
    }
    gw[entry_S[p]!] = dot;
  }
}

/**
 * Expert-grouped rows back in received order (row byExpert[q] ← grouped row q), times a
 * per-row scale. byExpert_R is a permutation, so every row of the result is written.
 */
export function ungroup<F extends FloatDType>(grouped_RD: Tensor<F>, byExpert_R: Int32Array, rowScale_R: Float64Array | null, scratch?: ScratchPool): Tensor<F> {
  if (byExpert_R.length !== grouped_RD.shape[0]) throw new Error(`ungroup: ${byExpert_R.length} row indices for ${grouped_RD.shape[0]} rows`);
  const out = takeUnfilled(scratch, grouped_RD.dtype, grouped_RD.shape);
  moveRows(grouped_RD.data as Floats, byExpert_R, grouped_RD.rowSize, out.data as Floats, rowScale_R, true);
  return out;
}
