// The EP layer: KempnerForge's ep_dispatch_and_compute (reference/expert_parallel.py, its
// non-grouped loop path), forward and backward, written once against a Communicator and
// an ExpertBackend. Forward issues A fwd.counts, B fwd.dispatch, C fwd.expert_ids,
// D fwd.combine; backward issues D' bwd.combine and B' bwd.dispatch. Every collective goes
// through `collective()`, the one place a runtime hooks protocol behaviour.
//
// Forward returns an immutable record of what backward needs (as torchtitan's dispatch
// returns the metadata its combine consumes); nothing is kept on the context.
import { Tensor, i64FromIndexArray, toFloat64, toIndexArray, type DType, type FloatDType } from '../tensor.js';
import { UsageError } from '../errors.js';
import { floatTensor } from '../moe/experts.js';
import { combineRows, gatherRows, routeGrad, tokenPositions, ungroup, type Floats } from './rows.js';
import type { CollectiveOp, CollectiveTag, Communicator, ExpertBackend, ExpertForward, ExpertWeights, PackedExperts } from './types.js';
import { takeUnfilled, type ScratchPool } from './scratch.js';

/**
 * How a runtime drives and checks the layer's collectives (the actor runtime backs it with
 * the rank machine). The layer reports the facts the protocol's guards need and asks
 * before each collective whether this rank issues it.
 */
export interface LayerProtocol {
  /** Routing of this layer is known: tokens held and rows for each EP rank. */
  routed(tokens: number, sendCounts: readonly number[]): Promise<void>;
  /** true: issue the collective now; false: the protocol skips it on this rank. Throws on a call the protocol does not allow. */
  admit(tag: CollectiveTag): Promise<boolean>;
  /** The collective completed with what this rank received (the protocol reads the facts it reveals). */
  completed(tag: CollectiveTag, received: Tensor): Promise<void>;
  /** The local expert compute of this layer finished. */
  computed(phase: 'forward' | 'backward'): Promise<void>;
}

export interface EpContext<F extends FloatDType = FloatDType> {
  /** The EP communicator; null when ep = 1 (no exchange at all). */
  readonly comm: Communicator | null;
  readonly backend: ExpertBackend;
  /** This rank's experts only: global ids [rank·N, (rank+1)·N). */
  readonly experts: ExpertWeights<F>;
  readonly numExperts: number;
  readonly topK: number;
  /** The seed's gradient_scale: per-expert output scale (R / N) / c_i. */
  readonly gradientScale: boolean;
  readonly layer: number;
  readonly microBatch: number;
  /** Protocol hooks; absent, every collective is issued unconditionally. */
  readonly protocol?: LayerProtocol;
  /**
   * Row buffers reused across calls. With it, the layer gives its temporaries back as they
   * die and epBackward consumes its EpSaved: backpropagate each forward once. Its outputs
   * (out, grad x, the experts' gradients) come from the pool too: give them back once read.
   */
  readonly scratch?: ScratchPool;
}

/** What forward leaves for backward. S = T·K dispatch entries; R rows received. */
export interface EpSaved<F extends FloatDType = FloatDType> {
  readonly T: number;
  readonly D: number;
  readonly K: number;
  /** sortOrder_S[p] = flat (t, k) entry at send position p (stable sort by target rank). */
  readonly sortOrder_S: Int32Array;
  /** Each token's K send positions, ascending (the combine's summation order). */
  readonly positions_TK: Int32Array;
  readonly sendCounts: readonly number[];
  readonly recvCounts: readonly number[];
  /** byExpert_R[q] = received row at expert-grouped position q. */
  readonly byExpert_R: Int32Array;
  readonly rowsPerExpert: readonly number[];
  /** Gradient-scale factor per expert-grouped row; null when off or nothing was received. */
  readonly rowScale_R: Float64Array | null;
  readonly recvGrouped_RD: Tensor<F>;
  readonly expertFwd: ExpertForward<F>;
  /** Rows as they came back from D, in send order, before routing weights. */
  readonly returned_SD: Tensor<F>;
  readonly weights_S: Float64Array;
}

export interface EpForwardResult<F extends FloatDType = FloatDType> {
  readonly out_TD: Tensor<F>;
  readonly saved: EpSaved<F>;
}

export interface EpBackwardResult<F extends FloatDType = FloatDType> {
  readonly gradX_TD: Tensor<F>;
  readonly gradWeights_TK: Tensor<F>;
  /** Gradients of this rank's experts, in the layout of ctx.experts. */
  readonly grads: ExpertWeights<F>;
}

/** Experts rank `rank` of `ep` owns, as apply_expert_parallel partitions them. */
export function localExpertRange(numExperts: number, ep: number, rank: number): { start: number; count: number } {
  if (!Number.isInteger(ep) || ep < 1) throw new UsageError(`ep must be a positive integer, got ${ep}`);
  if (!Number.isInteger(numExperts) || numExperts % ep !== 0) throw new UsageError(`num_experts (${numExperts}) must be divisible by ep (${ep})`);
  const count = numExperts / ep;
  return { start: rank * count, count };
}

function epSize(ctx: EpContext): { ep: number; rank: number } {
  return { ep: ctx.comm?.size ?? 1, rank: ctx.comm?.rank ?? 0 };
}

/**
 * The one path every collective takes. With no communicator (ep = 1) the exchange is the
 * identity and nothing is issued. A collective the protocol skips yields zero rows from
 * every peer (filled with `skippedFill`): the rank goes on as its code would, and the
 * peers that did issue it are left waiting, which is the hazard being reproduced.
 */
async function collective<D extends DType>(
  ctx: EpContext,
  op: CollectiveOp,
  send: Tensor<D>,
  sendSplits: readonly number[],
  recvSplits: readonly number[],
  skippedFill = 0,
): Promise<Tensor<D>> {
  if (!ctx.comm) return send;
  const tag: CollectiveTag = { op, layer: ctx.layer, microBatch: ctx.microBatch };
  if (ctx.protocol && !(await ctx.protocol.admit(tag))) {
    const skipped = Tensor.zeros(send.dtype, [recvSplits.reduce((a, b) => a + b, 0), ...send.shape.slice(1)]);
    if (skippedFill !== 0) (skipped.data as BigInt64Array).fill(BigInt(skippedFill));
    return skipped;
  }
  const received = await ctx.comm.allToAll(tag, send, sendSplits, recvSplits);
  await ctx.protocol?.completed(tag, received);
  return received;
}

/**
 * A temporary sent on an exchange that has returned goes back to the scratch pool, unless
 * the exchange handed back that very tensor (ep = 1 has no exchange).
 */
function recycleSent(ctx: EpContext, sent: Tensor, received: Tensor): void {
  if (sent !== received) ctx.scratch?.give(sent);
}

/** Hand an exchange result the layer has copied out of back to the communicator for reuse. */
function release(ctx: EpContext, t: Tensor): void {
  ctx.comm?.release?.(t);
}

/** Stable counting sort of keys in [0, buckets): order[p] = position of the p-th item, plus counts. */
function stableBucketSort(keys: ArrayLike<number>, buckets: number): { order: Int32Array; counts: number[] } {
  const counts = new Array<number>(buckets).fill(0);
  for (let i = 0; i < keys.length; i++) counts[keys[i]!]!++;
  const next = new Array<number>(buckets);
  for (let b = 0, at = 0; b < buckets; b++) {
    next[b] = at;
    at += counts[b]!;
  }
  const order = new Int32Array(keys.length);
  for (let i = 0; i < keys.length; i++) order[next[keys[i]!]!++] = i;
  return { order, counts };
}

function checkShape(t: Tensor, want: readonly number[], what: string): void {
  if (t.shape.length !== want.length || t.shape.some((d, i) => d !== want[i])) {
    throw new UsageError(`${what} has shape [${t.shape.join(', ')}], expected [${want.join(', ')}]`);
  }
}

export async function epForward<F extends FloatDType>(ctx: EpContext<F>, x_TD: Tensor<F>, weights_TK: Tensor, indices_TK: Tensor): Promise<EpForwardResult<F>> {
  const { ep, rank } = epSize(ctx);
  const { start, count: N } = localExpertRange(ctx.numExperts, ep, rank);
  const K = ctx.topK;
  const T = x_TD.shape[0] ?? 0;
  const D = x_TD.rowSize;
  checkShape(x_TD, [T, D], 'x');
  checkShape(weights_TK, [T, K], 'weights');
  checkShape(indices_TK, [T, K], 'indices');

  // 1. (t, k) entries t-major; target rank = expert // N; stable sort by target.
  const idx_S = toIndexArray(indices_TK, 'indices');
  const S = idx_S.length;
  const target_S = new Int32Array(S);
  for (let i = 0; i < S; i++) {
    const e = idx_S[i]!;
    if (e < 0 || e >= ctx.numExperts) throw new UsageError(`indices[${Math.floor(i / K)}, ${i % K}] = ${e} is outside [0, ${ctx.numExperts})`);
    target_S[i] = Math.floor(e / N);
  }
  const { order: sortOrder_S, counts: sendCounts } = stableBucketSort(target_S, ep);
  // token of each send position (entry // K) and its expert id
  const token_S = new Int32Array(S);
  const ids_S = new Int32Array(S);
  for (let p = 0; p < S; p++) {
    const entry = sortOrder_S[p]!;
    token_S[p] = Math.floor(entry / K);
    ids_S[p] = idx_S[entry]!;
  }
  const idsSorted_S = i64FromIndexArray(ids_S);
  const xSorted_SD = gatherRows(x_TD, token_S, null, ctx.scratch);

  // 2-4. A counts, B rows, C expert ids (the seed sends ids as f32 [n,1]; i64 [n] is exact for any E).
  await ctx.protocol?.routed(T, sendCounts);
  const ones = new Array<number>(ep).fill(1);
  const countsOf = (t: Tensor): number[] => Array.from(t.data as BigInt64Array, Number);
  const recvCountsT = await collective(ctx, 'fwd.counts', Tensor.from('i64', [ep], sendCounts), ones, ones);
  const recvCounts = countsOf(recvCountsT);
  release(ctx, recvCountsT);
  const recv_RD = await collective(ctx, 'fwd.dispatch', xSorted_SD, sendCounts, recvCounts);
  recycleSent(ctx, xSorted_SD, recv_RD); // every exchange has copied the rows when it returns
  const recvIds = await collective(ctx, 'fwd.expert_ids', idsSorted_S, sendCounts, recvCounts, start);
  const recvIds_R = toIndexArray(recvIds, 'received expert ids');
  release(ctx, recvIds);

  // 5. Group received rows by local expert (stable) for the backend.
  const local_R = new Int32Array(recvIds_R.length);
  for (let r = 0; r < local_R.length; r++) {
    const l = recvIds_R[r]! - start;
    if (l < 0 || l >= N) throw new Error(`rank ${rank} received a row for expert ${recvIds_R[r]}, outside its experts [${start}, ${start + N})`);
    local_R[r] = l;
  }
  const { order: byExpert_R, counts: rowsPerExpert } = stableBucketSort(local_R, N);
  const recvGrouped_RD = gatherRows(recv_RD, byExpert_R, null, ctx.scratch);
  release(ctx, recv_RD);
  const expertFwd = await ctx.backend.forward(ctx.experts, recvGrouped_RD, rowsPerExpert, ctx.scratch);
  await ctx.protocol?.computed('forward');

  // 6. Gradient scale: rows of local expert i scaled by (R / N) / c_i, in forward too.
  const R = byExpert_R.length;
  let rowScale_R: Float64Array | null = null;
  if (ctx.gradientScale && R > 0) {
    rowScale_R = new Float64Array(R);
    let q = 0;
    for (const c of rowsPerExpert) rowScale_R.fill(R / N / c, q, (q += c));
  }
  const local_RD = ungroup(expertFwd.y, byExpert_R, rowScale_R, ctx.scratch);
  ctx.scratch?.give(expertFwd.y);

  // 7. D: expert outputs go home, splits swapped.
  const returned_SD = await collective(ctx, 'fwd.combine', local_RD, recvCounts, sendCounts);
  recycleSent(ctx, local_RD, returned_SD);

  // 8. Unsort, weight, scatter-add into out [T,D] (summed in f64 in send order, rounded once).
  const weightsFlat = toFloat64(weights_TK).data;
  const weights_S = new Float64Array(S);
  for (let p = 0; p < S; p++) weights_S[p] = weightsFlat[sortOrder_S[p]!]!;
  const positions_TK = tokenPositions(token_S, T, K);
  const out_TD = combineRows(returned_SD, positions_TK, K, weights_S, T, ctx.scratch);

  const saved: EpSaved<F> = Object.freeze({
    T, D, K, sortOrder_S, positions_TK, sendCounts, recvCounts, byExpert_R, rowsPerExpert, rowScale_R, recvGrouped_RD, expertFwd, returned_SD, weights_S,
  });
  return { out_TD, saved };
}

export async function epBackward<F extends FloatDType>(ctx: EpContext<F>, saved: EpSaved<F>, gradOut_TD: Tensor<F>): Promise<EpBackwardResult<F>> {
  const { T, D, K, sortOrder_S, sendCounts, recvCounts, byExpert_R, rowsPerExpert, rowScale_R, weights_S } = saved;
  checkShape(gradOut_TD, [T, D], 'grad_out');
  const g = gradOut_TD.data as Floats;
  const ret = saved.returned_SD.data as Floats;
  const S = sortOrder_S.length;
  const token_S = new Int32Array(S);
  for (let p = 0; p < S; p++) token_S[p] = Math.floor(sortOrder_S[p]! / K);

  // Grad of the returned rows (w · grad_out[t], rounded once into the dtype) and of the
  // routing weights (<grad_out[t], row>, summed in f64).
  const gradReturned = takeUnfilled(ctx.scratch, gradOut_TD.dtype, [S, D]); // routeGrad writes every row
  const gradWeights = new Float64Array(T * K);
  routeGrad(g, D, ret, token_S, sortOrder_S, weights_S, gradReturned.data as Floats, gradWeights);
  // The forward is consumed: the fwd.combine result goes back to its communicator (ep = 1,
  // no exchange: the rows themselves, to the pool).
  if (ctx.scratch && ctx.comm) release(ctx, saved.returned_SD);
  else ctx.scratch?.give(saved.returned_SD);

  // D': grads go to the expert owners; regroup by expert, apply the forward's scale.
  const gradLocal_RD = await collective(ctx, 'bwd.combine', gradReturned, sendCounts, recvCounts);
  recycleSent(ctx, gradReturned, gradLocal_RD);
  const gradY_RD = gatherRows(gradLocal_RD, byExpert_R, rowScale_R, ctx.scratch);
  release(ctx, gradLocal_RD);
  const expertBwd = await ctx.backend.backward(ctx.experts, saved.recvGrouped_RD, rowsPerExpert, saved.expertFwd, gradY_RD, ctx.scratch);
  ctx.scratch?.give(gradY_RD, saved.recvGrouped_RD);
  await ctx.protocol?.computed('backward');

  // B': grads of the dispatched rows go home; gather-add into grad_x (f64, rounded once).
  const gradRecv_RD = ungroup(expertBwd.gradX, byExpert_R, null, ctx.scratch);
  ctx.scratch?.give(expertBwd.gradX);
  const gradSorted_SD = await collective(ctx, 'bwd.dispatch', gradRecv_RD, recvCounts, sendCounts);
  recycleSent(ctx, gradRecv_RD, gradSorted_SD);
  const gradX_TD = combineRows(gradSorted_SD, saved.positions_TK, K, null, T, ctx.scratch);
  release(ctx, gradSorted_SD);
  return {
    gradX_TD,
    gradWeights_TK: floatTensor(gradOut_TD.dtype, [T, K], gradWeights),
    grads: expertBwd.grads,
  };
}

// ---- global <-> local packed weights ----

function sliceRows<F extends FloatDType>(t: Tensor<F>, start: number, count: number): Tensor<F> {
  const rs = t.rowSize;
  return new Tensor(t.dtype, [count, ...t.shape.slice(1)], t.data.slice(start * rs, (start + count) * rs) as Tensor<F>['data']);
}

/** Rank `rank`'s slice [start, start+N) of global packed experts [E, …] (copies, as apply_expert_parallel clones). */
export function localExperts<F extends FloatDType>(global: PackedExperts<F>, ep: number, rank: number): PackedExperts<F> {
  const { start, count } = localExpertRange(global.up.shape[0] ?? 0, ep, rank);
  return {
    layout: 'packed',
    activation: global.activation,
    up: sliceRows(global.up, start, count),
    gate: global.gate && sliceRows(global.gate, start, count),
    down: sliceRows(global.down, start, count),
  };
}

/** Write rank `rank`'s local packed grads [N, …] into global packed arrays [E, …] (in place). */
export function placeLocalGrads<F extends FloatDType>(global: PackedExperts<F>, local: PackedExperts<F>, ep: number, rank: number): void {
  const { start } = localExpertRange(global.up.shape[0] ?? 0, ep, rank);
  const put = (dst: Tensor<F>, src: Tensor<F>): void => (dst.data as Float64Array).set(src.data as Float64Array, start * dst.rowSize);
  put(global.up, local.up);
  put(global.down, local.down);
  if (global.gate && local.gate) put(global.gate, local.gate);
}
