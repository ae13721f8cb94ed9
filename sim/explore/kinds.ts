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
//   sharedReadyFirst         second-stream      its per-layer-call order of the shared all-gather and D
//   zeroRowExpertHangsKernel kernel-hang        whether one of its local experts gets no rows
//   stopsEarly               early-exit         its EP rank (one rank is singled out)
//   gathersExpertGradsOn*    wrong-group        its EP rank (one rank is singled out)
//   moreMicroBatches         uneven-batches     its global rank and the evaluation batches (not routing:
//                                               explored apart, see evalBatches below)
//
// Nothing else branches on routing: all-to-all splits come from one send matrix, so send and
// receive splits always pair, and two ranks with equal facts issue identical, mutually
// consistent collectives. A rank's kind is (holds tokens, local experts reached, order of the
// racing pair); the observable kind is its projection onto the facts above.
//
// Why the new facts keep that argument. kernel-hang: the guard reads only the rank's own rows
// per expert, through "is one zero" (which expert is first zero names it in the diagnosis and
// changes nothing else), and a rank that stalls issues nothing after: equal facts, equal
// behaviour. second-stream: the order is the rank's own event, read by nothing but its own
// guard, exactly as completion-order's. wrong-group: the guard reads the EP rank, so that rank
// is singled out as early-exit's is; its routing column is still enumerated in full, and as the
// machine reads EP ranks nowhere else, a class with the gather on EP rank w is a class with it
// on w' after swapping the two EP ranks' routing: one w covers every choice.
//
// uneven-batches is the one fact that is not routing: a rank's micro-batch count is its
// round-robin share of E evaluation batches over every rank (shardBatches), fixed by its
// global rank, so permuting ranks would change it. It is explored as its own dimension, every
// E from world (one batch each) to world · micro-batches (the layout's micro-batches bound the
// longest shard; validateScenario takes no other E): those are all the per-rank count vectors
// round-robin sharding gives. That is sound beside the class search only because the variant
// keeps every other safety of the seed, so its guards read no routing fact: the verdict is a
// function of E alone, and one routing class per E decides it (observe refuses a variant that
// would read both).
import type { CollectiveOp } from '../../src/ep/types.js';
import { rankConfig, type Scenario } from '../../machines/scenario.js';
import { UsageError } from '../../src/errors.js';

export interface RankKind {
  readonly holdsTokens: boolean;
  /** Local experts receiving rows (the first `usedExperts` of the rank's block). */
  readonly usedExperts: number;
  /** Order of the racing pair, bit c for layer call c (micro-batch · layers + layer): 1 = race.ops[0] first. */
  readonly schedule: number;
}

/** Two collectives one compute makes ready at once, issued in the order their completions land. */
export interface Race {
  /** The scenario field every engine reads the orders from (machines/scenario.ts firstReadyOf). */
  readonly field: 'firstReady' | 'streamOrder';
  /** ops[0]: issued first where the schedule bit is 1; ops[1] (program order) where it is 0. */
  readonly ops: readonly [CollectiveOp, CollectiveOp];
  /** Layer calls whose order is a choice: 2^calls schedules per rank. */
  readonly calls: number;
  /** completion-order: the guard reads the order only where the rank's experts have gradients. */
  readonly onlyWithGrads: boolean;
}

export interface Observation {
  readonly tokens: boolean;
  readonly received: boolean;
  /** How expertsWithGrads depends on the routing: not at all, zero or not, or the count. */
  readonly grads: 'none' | 'any' | 'count';
  /** The racing pair whose order per layer call is a rank fact (completion-order, second-stream), else null. */
  readonly race: Race | null;
  /** kernel-hang: a rank reaching fewer local experts than this (one gets no rows) stalls, else null. */
  readonly stallsBelow: number | null;
  /** EP ranks the variant singles out (early-exit's, wrong-group's rank): never merged with others. */
  readonly fixedEpRanks: readonly number[];
  /** uneven-batches: every evaluation batch count explored, fewest first, else null. */
  readonly evalBatches: readonly number[] | null;
  /** One line per observed fact, for the proof's output. */
  readonly facts: readonly string[];
}

/** Most layer calls whose order is explored: 2^n orders per rank become kinds. */
const MAX_LAYER_CALLS = 4;

export function observe(s: Scenario): Observation {
  const v = rankConfig(s, 0).variant;
  const grads = s.fsdp === null || v.unusedExpertGrads ? 'none' : s.packed ? 'any' : 'count';
  const tokens = v.skipEmptySends || v.localCapacity !== null || v.layerMetric;
  const received = v.skipEmptySends || !v.dispatchEdge || grads === 'any';
  const calls = s.layers * s.microBatches;
  const race: Race | null =
    v.completionOrder && s.fsdp === 'experts' ? { field: 'firstReady', ops: ['bwd.dispatch', 'fsdp.reduce_scatter'], calls, onlyWithGrads: true }
    : v.secondStream ? { field: 'streamOrder', ops: ['shared.all_gather', 'fwd.combine'], calls, onlyWithGrads: false }
    : null;
  if (race && calls > MAX_LAYER_CALLS) throw new UsageError(`check: ${s.variant} explores 2^${calls} orders per rank (${s.layers} layers × ${s.microBatches} micro-batches); at most ${MAX_LAYER_CALLS} layer calls`);
  const stallsBelow = v.kernelHang ? s.experts / s.ep : null;
  const fixedEpRanks = [v.earlyExit?.rank, v.wrongGroup?.rank].filter((e): e is number => e !== undefined);
  const world = s.ep * s.dp;
  const evalBatches = v.unevenBatches ? Array.from({ length: world * (s.microBatches - 1) + 1 }, (_, i) => world + i) : null;
  if (evalBatches && (tokens || received || grads !== 'none' || race || stallsBelow !== null || fixedEpRanks.length)) {
    throw new Error(`explorer: variant ${s.variant} reads routing facts and evaluation batch counts at once; the class search cannot explore both`);
  }
  const facts = [
    tokens && 'whether it holds tokens',
    received && 'whether any row reaches it',
    grads === 'count' && 'how many of its local experts get rows (FSDP reduce-scatter size)',
    race?.field === 'firstReady' && 'its completion order per layer call',
    race?.field === 'streamOrder' && "its order of the shared expert's all-gather and fwd.combine per layer call (second-stream)",
    stallsBelow !== null && 'whether one of its local experts gets no rows (kernel-hang: its expert backward never returns)',
    v.earlyExit && `that it is EP rank ${v.earlyExit.rank} (early-exit)`,
    v.wrongGroup && `that it is EP rank ${v.wrongGroup.rank} (wrong-group: it gathers its experts' gradients on its dp communicator; any other EP rank is the same class up to swapping routing)`,
    evalBatches && `its micro-batch count: its round-robin share of E evaluation batches over ${world} ranks, every E in [${world}, ${evalBatches.at(-1)}] (uneven-batches)`,
  ].filter((f): f is string => typeof f === 'string');
  return { tokens, received, grads, race, stallsBelow, fixedEpRanks, evalBatches, facts };
}

/** Every rank kind of the layout, in a fixed order. */
export function rankKinds(s: Scenario, o: Observation): RankKind[] {
  const nLocal = s.experts / s.ep;
  const out: RankKind[] = [];
  for (let schedule = 0; schedule < 2 ** (o.race?.calls ?? 0); schedule++) {
    for (const holdsTokens of [false, true]) for (let usedExperts = 0; usedExperts <= nLocal; usedExperts++) out.push({ holdsTokens, usedExperts, schedule });
  }
  return out;
}

/** The facts of `k` the machine can tell apart: equal keys, equal behaviour. */
export function observedKey(o: Observation, k: RankKind): string {
  const grads = o.grads === 'none' ? 1 : o.grads === 'any' ? Number(k.usedExperts > 0) : k.usedExperts;
  const order = o.race && (!o.race.onlyWithGrads || grads > 0) ? k.schedule : '';
  const stalls = o.stallsBelow !== null ? Number(k.usedExperts < o.stallsBelow) : '';
  return [o.tokens ? Number(k.holdsTokens) : '', o.received ? Number(k.usedExperts > 0) : '', o.grads !== 'none' ? grads : '', order, stalls].join('/');
}

/** A letter of the reduced search: the observable facts, and whether the rank is starved (the search's order reads it). */
export const reducedKey = (o: Observation, k: RankKind) => `${observedKey(o, k)}|${Number(k.usedExperts > 0)}`;
