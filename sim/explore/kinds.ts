// What the rank machine can observe of a routing, per rank, read off its guards
// (machines/rankMachine.ts) and the collectives' matching (machines/ledger.ts):
//
//   sendsNoRowsAndSkips      skip-empty-sends   the rank's send total: zero iff it holds no tokens
//   returnsNoRowsAndSkips    skip-empty-sends   its received total: zero iff no row reaches it
//   keepsDispatchEdge        no-dispatch-edge   its received total, zero or not
//   dataSplits (capacity)    local-capacity     its token count (one capacity level for every holder here)
//   metricSize               layer-metric       whether it routed tokens
//   expertsWithGrads         FSDP guards/sizes  constant under unused-expert grads; with them dropped,
//                                               zero or not (packed) or how many local experts get rows
//   dispatchReadyFirst       completion-order   its per-layer-call completion order (experts wrap)
//   stopsEarly               early-exit         its EP rank (one rank is singled out)
//
// Nothing else branches on routing: all-to-all splits come from one send matrix, so send and
// receive splits always pair, and two ranks with equal facts issue identical, mutually
// consistent collectives. A rank's kind is (holds tokens, local experts reached, completion
// order); the observable kind is its projection onto the facts above.
import { rankConfig, type Scenario } from '../../machines/scenario.js';
import { UsageError } from '../../src/errors.js';

export interface RankKind {
  readonly holdsTokens: boolean;
  /** Local experts receiving rows (the first `usedExperts` of the rank's block). */
  readonly usedExperts: number;
  /** Completion order, bit c for layer call c (micro-batch · layers + layer): 1 = bwd.dispatch first. */
  readonly schedule: number;
}

export interface Observation {
  readonly tokens: boolean;
  readonly received: boolean;
  /** How expertsWithGrads depends on the routing: not at all, zero or not, or the count. */
  readonly grads: 'none' | 'any' | 'count';
  /** Layer calls whose completion order is a choice (completion-order with the experts wrap), else 0. */
  readonly layerCalls: number;
  /** EP ranks the variant singles out (early-exit's rank): never merged with others. */
  readonly fixedEpRanks: readonly number[];
  /** One line per observed fact, for the proof's output. */
  readonly facts: readonly string[];
}

/** Most completion-order layer calls explored: 2^n orders per rank become kinds. */
const MAX_LAYER_CALLS = 4;

export function observe(s: Scenario): Observation {
  const v = rankConfig(s, 0).variant;
  const grads = s.fsdp === null || v.unusedExpertGrads ? 'none' : s.packed ? 'any' : 'count';
  const tokens = v.skipEmptySends || v.localCapacity !== null || v.layerMetric;
  const received = v.skipEmptySends || !v.dispatchEdge || grads === 'any';
  const layerCalls = v.completionOrder && s.fsdp === 'experts' ? s.layers * s.microBatches : 0;
  if (layerCalls > MAX_LAYER_CALLS) throw new UsageError(`check: completion-order explores 2^${layerCalls} orders per rank (${s.layers} layers × ${s.microBatches} micro-batches); at most ${MAX_LAYER_CALLS} layer calls`);
  const fixedEpRanks = v.earlyExit ? [s.earlyExitRank ?? s.ep - 1] : [];
  const facts = [
    tokens && 'whether it holds tokens',
    received && 'whether any row reaches it',
    grads === 'count' && 'how many of its local experts get rows (FSDP reduce-scatter size)',
    layerCalls > 0 && 'its completion order per layer call',
    ...fixedEpRanks.map((e) => `that it is EP rank ${e} (early-exit)`),
  ].filter((f): f is string => typeof f === 'string');
  return { tokens, received, grads, layerCalls, fixedEpRanks, facts };
}

/** Every rank kind of the layout, in a fixed order. */
export function rankKinds(s: Scenario, o: Observation): RankKind[] {
  const nLocal = s.experts / s.ep;
  const out: RankKind[] = [];
  for (let schedule = 0; schedule < 2 ** o.layerCalls; schedule++) {
    for (const holdsTokens of [false, true]) for (let usedExperts = 0; usedExperts <= nLocal; usedExperts++) out.push({ holdsTokens, usedExperts, schedule });
  }
  return out;
}

/** The facts of `k` the machine can tell apart: equal keys, equal behaviour. */
export function observedKey(o: Observation, k: RankKind): string {
  const grads = o.grads === 'none' ? 1 : o.grads === 'any' ? Number(k.usedExperts > 0) : k.usedExperts;
  return [o.tokens ? Number(k.holdsTokens) : '', o.received ? Number(k.usedExperts > 0) : '', o.grads !== 'none' ? grads : '', o.layerCalls > 0 && grads > 0 ? k.schedule : ''].join('/');
}

/** A letter of the reduced search: the observable facts, and whether the rank is starved (the search's order reads it). */
export const reducedKey = (o: Observation, k: RankKind) => `${observedKey(o, k)}|${Number(k.usedExperts > 0)}`;
