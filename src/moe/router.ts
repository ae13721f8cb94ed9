// Routers as KempnerForge defines them (kempnerforge/model/router.py), on router logits
// [T,E] (the gate Linear is the caller's): they produce the routing weights [T,K] and
// global expert indices [T,K] the EP layer consumes. Top-k picks the k largest scores in
// descending order; ties go to the lower expert index.
import { Tensor, toFloat64, type FloatDType } from '../tensor.js';
import { floatTensor } from './experts.js';

export interface Routing<F extends FloatDType = FloatDType> {
  readonly weights_TK: Tensor<F>;
  readonly indices_TK: Tensor<'i64'>;
  /** Entries routed to each expert, over all tokens and k slots. */
  readonly expertCounts_E: Float64Array;
}

export interface SoftmaxRouting<F extends FloatDType = FloatDType> extends Routing<F> {
  /** Switch-style load-balancing loss (see softmaxTopK). */
  readonly auxLoss: number;
  /** ST-MoE router z-loss (see routerZLoss). */
  readonly zLoss: number;
}

function dims(logits_TE: Tensor, topK: number): [number, number] {
  if (logits_TE.shape.length !== 2) throw new Error(`router logits must be [T, E], got [${logits_TE.shape.join(', ')}]`);
  const [T, E] = logits_TE.shape as [number, number];
  if (!Number.isInteger(topK) || topK < 1 || topK > E) throw new Error(`top_k (${topK}) must be in [1, num_experts (${E})]`);
  return [T, E];
}

/** Indices of the k largest of row[0..E) in descending order (lower index wins ties). */
function topKIndices(row: Float64Array, k: number): number[] {
  const order = Array.from(row.keys());
  order.sort((a, b) => row[b]! - row[a]! || a - b);
  return order.slice(0, k);
}

/**
 * Shared top-k routing: experts are selected by `select` scores, and each weight is its
 * `score` divided by the sum of the selected `score`s (renormalised over the top k).
 */
function route<F extends FloatDType>(dtype: F, T: number, E: number, K: number, select: Float64Array, score: Float64Array): Routing<F> {
  const weights = new Float64Array(T * K);
  const indices = new BigInt64Array(T * K);
  const counts = new Float64Array(E);
  for (let t = 0; t < T; t++) {
    const chosen = topKIndices(select.subarray(t * E, (t + 1) * E), K);
    let sum = 0;
    for (const e of chosen) sum += score[t * E + e]!;
    chosen.forEach((e, k) => {
      weights[t * K + k] = score[t * E + e]! / sum;
      indices[t * K + k] = BigInt(e);
      counts[e]!++;
    });
  }
  return { weights_TK: floatTensor(dtype, [T, K], weights), indices_TK: new Tensor('i64', [T, K], indices), expertCounts_E: counts };
}

function softmaxRows(logits: Float64Array, T: number, E: number): Float64Array {
  const probs = new Float64Array(T * E);
  for (let t = 0; t < T; t++) {
    let max = -Infinity;
    for (let e = 0; e < E; e++) max = Math.max(max, logits[t * E + e]!);
    let sum = 0;
    for (let e = 0; e < E; e++) sum += probs[t * E + e] = Math.exp(logits[t * E + e]! - max);
    for (let e = 0; e < E; e++) probs[t * E + e]! /= sum;
  }
  return probs;
}

/**
 * ST-MoE router z-loss: mean over tokens of logsumexp_e(logits[t,e])², which keeps router
 * logits small. (The caller scales it by its coefficient.)
 */
export function routerZLoss(logits_TE: Tensor): number {
  const [T, E] = dims(logits_TE, 1);
  const logits = toFloat64(logits_TE).data;
  let total = 0;
  for (let t = 0; t < T; t++) {
    let max = -Infinity;
    for (let e = 0; e < E; e++) max = Math.max(max, logits[t * E + e]!);
    let sum = 0;
    for (let e = 0; e < E; e++) sum += Math.exp(logits[t * E + e]! - max);
    const lse = max + Math.log(sum);
    total += lse * lse;
  }
  return T === 0 ? 0 : total / T;
}

/**
 * Mixtral-style softmax top-k (KempnerForge SoftmaxTopKRouter): probs = softmax(logits),
 * top-k of probs, weights renormalised to sum to 1 per token. Aux loss (Switch
 * Transformer): L_aux = E · Σ_i f_i · P_i, with f_i = (entries routed to expert i) / (T·K)
 * and P_i = mean over tokens of probs[t,i]; 1 when perfectly balanced.
 */
export function softmaxTopK<F extends FloatDType>(logits_TE: Tensor<F>, topK: number): SoftmaxRouting<F> {
  const [T, E] = dims(logits_TE, topK);
  const probs = softmaxRows(toFloat64(logits_TE).data, T, E);
  const routing = route(logits_TE.dtype, T, E, topK, probs, probs);
  let auxLoss = 0;
  if (T > 0) {
    for (let e = 0; e < E; e++) {
      let p = 0;
      for (let t = 0; t < T; t++) p += probs[t * E + e]!;
      auxLoss += (routing.expertCounts_E[e]! / (T * topK)) * (p / T);
    }
    auxLoss *= E;
  }
  return { ...routing, auxLoss, zLoss: routerZLoss(logits_TE) };
}

/**
 * DeepSeek-V3 sigmoid top-k with auxiliary-loss-free balancing: scores s = sigmoid(logits);
 * experts are selected by s + bias, but the weights are the unbiased s of the selected
 * experts renormalised to sum to 1, so the bias steers load without changing how much a
 * chosen expert counts. (The KempnerForge version at hand adds the bias before the sigmoid
 * and weights by the biased scores; DeepSeek-V3 §2.1.2 keeps the bias out of the weights,
 * which is what this follows.) No aux loss.
 */
export function sigmoidTopK<F extends FloatDType>(logits_TE: Tensor<F>, topK: number, expertBias_E?: ArrayLike<number>): Routing<F> {
  const [T, E] = dims(logits_TE, topK);
  if (expertBias_E && expertBias_E.length !== E) throw new Error(`expert bias has ${expertBias_E.length} entries for ${E} experts`);
  const scores = toFloat64(logits_TE).data.map((v) => 1 / (1 + Math.exp(-v)));
  const select = expertBias_E ? scores.map((s, i) => s + expertBias_E[i % E]!) : scores;
  return route(logits_TE.dtype, T, E, topK, select, scores);
}
