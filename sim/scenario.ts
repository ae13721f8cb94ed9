// A scenario: the layout (dp × ep mesh, FSDP), the model sizes, the step shape (layers,
// micro-batches), the routing generator and the variant. Both engines take one; `sim`,
// `check --replay` and sweeps read and write it as JSON.
import { UsageError } from '../src/errors.js';
import { WRAP_POLICIES, type RankConfig, type WrapPolicy } from '../machines/rankMachine.js';
import { isVariantName, makeVariant, VARIANT_NAMES, type VariantName } from '../machines/variants.js';
import { parseRouting } from './routing.js';
import type { FirstReady } from '../machines/driver.js';
import type { CollectiveOp } from '../src/ep/types.js';
import { seededRng } from '../src/moe/random.js';

export interface Scenario {
  ep: number;
  dp: number;
  fsdp: WrapPolicy | null;
  experts: number;
  topK: number;
  /** Tokens per rank per micro-batch (before a routing generator empties a rank). */
  tokens: number;
  dim: number;
  hidden: number;
  layers: number;
  microBatches: number;
  /** uniform | zipf:S | starve:R | hot:E | empty:R | explicit (see sim/routing.ts) */
  routing: string;
  variant: VariantName;
  /** early-exit: the EP rank that stops and after how many layer calls; local-capacity: factor. */
  earlyExitRank?: number;
  earlyExitAfterLayers?: number;
  capacityFactor?: number;
  packed: boolean;
  activation: 'silu' | 'gelu' | 'relu';
  seed: number;
  /** Explicit routing: per global rank, per micro-batch, per layer, the T·K global expert ids. */
  explicit?: number[][][][];
  /**
   * completion-order: per global rank, per layer call (micro-batch · layers + layer), which
   * of bwd.dispatch and the experts reduce-scatter the rank issues first. Absent, each is
   * drawn from the seed. Every engine follows it, so a counterexample replays anywhere.
   */
  firstReady?: CollectiveOp[][];
}

export const DEFAULT_SCENARIO: Scenario = {
  ep: 4,
  dp: 1,
  fsdp: null,
  experts: 8,
  topK: 2,
  tokens: 16,
  dim: 8,
  hidden: 16,
  layers: 1,
  microBatches: 1,
  routing: 'uniform',
  variant: 'seed',
  packed: true,
  activation: 'silu',
  seed: 1,
};

/** Fill defaults and check every constraint, naming the field, its value and the fix. */
export function validateScenario(partial: Partial<Scenario>): Scenario {
  const s: Scenario = { ...DEFAULT_SCENARIO, ...partial };
  const positive = ['ep', 'dp', 'experts', 'topK', 'dim', 'hidden', 'layers', 'microBatches'] as const;
  for (const k of positive) {
    if (!Number.isSafeInteger(s[k]) || s[k] < 1) throw new UsageError(`${k} must be a positive integer, got ${s[k]}`);
  }
  if (!Number.isSafeInteger(s.tokens) || s.tokens < 0) throw new UsageError(`tokens must be a non-negative integer, got ${s.tokens}`);
  if (s.experts % s.ep !== 0) throw new UsageError(`num_experts (${s.experts}) must be divisible by ep (${s.ep})`);
  if (s.topK > s.experts) throw new UsageError(`top_k (${s.topK}) must not exceed num_experts (${s.experts})`);
  if (!isVariantName(s.variant)) throw new UsageError(`unknown variant '${s.variant}'; one of ${VARIANT_NAMES.join(', ')}`);
  if (s.fsdp !== null && !WRAP_POLICIES.includes(s.fsdp)) throw new UsageError(`unknown FSDP wrap policy '${s.fsdp}'; one of ${WRAP_POLICIES.join(', ')}`);
  if (s.fsdp !== null && s.dp < 2) throw new UsageError(`FSDP needs a data-parallel dimension: dp must be at least 2, got ${s.dp}`);
  if (s.earlyExitRank !== undefined && (s.earlyExitRank < 0 || s.earlyExitRank >= s.ep)) throw new UsageError(`earlyExitRank must be an EP rank in [0, ${s.ep}), got ${s.earlyExitRank}`);
  if (s.firstReady !== undefined) {
    const ok = Array.isArray(s.firstReady) && s.firstReady.length === s.ep * s.dp && s.firstReady.every((row) => Array.isArray(row) && row.length === s.layers * s.microBatches && row.every((o) => o === 'bwd.dispatch' || o === 'fsdp.reduce_scatter'));
    if (!ok) throw new UsageError(`firstReady must list, for each of the ${s.ep * s.dp} ranks, ${s.layers * s.microBatches} entries of 'bwd.dispatch' or 'fsdp.reduce_scatter' (one per layer call)`);
  }
  parseRouting(s.routing, s); // throws a UsageError naming the generator and what is wrong
  return s;
}

/** The rank machine's input for global rank `rank` of the scenario. */
export function rankConfig(s: Scenario, rank: number): RankConfig {
  const swiglu = s.activation === 'silu';
  return {
    rank,
    epRank: rank % s.ep,
    dpRank: Math.floor(rank / s.ep),
    ep: s.ep,
    dp: s.dp,
    layers: s.layers,
    microBatches: s.microBatches,
    numExperts: s.experts,
    topK: s.topK,
    packed: s.packed,
    fsdp: s.fsdp,
    paramsPerExpert: (swiglu ? 3 : 2) * s.dim * s.hidden,
    // Attention q, k, v, o projections plus the router: what a block holds besides experts.
    attentionParams: 4 * s.dim * s.dim + s.dim * s.experts,
    variant: makeVariant(s.variant, {
      earlyExitRank: s.earlyExitRank ?? s.ep - 1,
      earlyExitAfterLayers: s.earlyExitAfterLayers,
      capacityFactor: s.capacityFactor,
    }),
  };
}

export const worldSize = (s: Scenario) => s.ep * s.dp;

/** The scenario's completion orders, or each drawn from its seed: arbitrary, but the same on every engine and every run. */
export function firstReadyOf(s: Scenario): FirstReady {
  const table = s.firstReady;
  if (table) return (rank, layer, microBatch) => table[rank]?.[microBatch * s.layers + layer] ?? 'fsdp.reduce_scatter';
  return (rank, layer, microBatch) => (seededRng((s.seed * 7919 + rank * 104729 + layer * 31 + microBatch) >>> 0)() < 0.5 ? 'bwd.dispatch' : 'fsdp.reduce_scatter');
}
