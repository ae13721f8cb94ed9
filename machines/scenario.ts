// A scenario: the layout (pp × dp × ep mesh, FSDP, MoE layers per pipeline stage), the model
// sizes, the step shape (layers, micro-batches), the routing generator and the variant. Both engines take one; `sim`,
// `check --replay` and sweeps read and write it as JSON.
import { totalmem } from 'node:os';
import type { CaseMeta } from '../src/case.js';
import { UsageError } from '../src/errors.js';
import { ACTIVATIONS, type CollectiveOp } from '../src/ep/types.js';
import { dpRankOf, epRankOf, ppOf, ppRankOf, worldSize } from './mesh.js';
import { WRAP_POLICIES, type RankConfig, type WrapPolicy } from './rankMachine.js';
import { isVariantName, makeVariant, VARIANT_NAMES, type VariantName } from './variants.js';
import { checkExplicitRouting, layersOnRank, parseRouting, type RoutedLayout } from './routing.js';
import type { FirstReady } from './driver.js';
import { mixSeed, seededRng } from '../src/moe/random.js';

export interface Scenario extends RoutedLayout {
  fsdp: WrapPolicy | null;
  dim: number;
  hidden: number;
  variant: VariantName;
  /** early-exit: the EP rank that stops and after how many layer calls; local-capacity: factor. */
  earlyExitRank?: number;
  earlyExitAfterLayers?: number;
  capacityFactor?: number;
  /** wrong-group: the EP rank that gathers the experts' gradients on its dp communicator. */
  wrongGroupRank?: number;
  /** uneven-batches: evaluation batches sharded over every rank (default ep · dp · microBatches − 1). */
  evalBatches?: number;
  packed: boolean;
  activation: 'silu' | 'gelu' | 'relu';
  /**
   * completion-order: per global rank, per layer call (micro-batch · layers + layer), which
   * of bwd.dispatch and the experts reduce-scatter the rank issues first. Absent, each is
   * drawn from the seed. Every engine follows it, so a counterexample replays anywhere.
   */
  firstReady?: CollectiveOp[][];
  /**
   * second-stream: per global rank, per layer call, which of the shared expert's all-gather
   * and fwd.combine the rank issues first. Absent, each is drawn from the seed.
   */
  streamOrder?: CollectiveOp[][];
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

/** Every field a scenario file may hold; firstReady is the issue order `check --replay` found (sim/explorer.ts). */
export const SCENARIO_FIELDS: readonly string[] = [...Object.keys(DEFAULT_SCENARIO), 'pp', 'moeLayers', 'earlyExitRank', 'earlyExitAfterLayers', 'capacityFactor', 'wrongGroupRank', 'evalBatches', 'explicit', 'streamOrder', 'firstReady'];

/** Refuses a key of `obj` outside `known`, naming it and the known key it resembles (a typo must not run on defaults). */
export function checkKeys(obj: object, known: readonly string[], where: string): void {
  for (const key of Object.keys(obj)) {
    if (known.includes(key)) continue;
    const near = closest(key, known);
    throw new UsageError(`${where}unknown field '${key}'${near ? `; did you mean '${near}'?` : ` (one of ${known.join(', ')})`}`);
  }
}

/** The known key nearest `key` ignoring case, '-' and '_' (top_k → topK), or undefined when none is near. */
function closest(key: string, known: readonly string[]): string | undefined {
  const norm = (k: string) => k.toLowerCase().replace(/[-_]/g, '');
  const a = norm(key);
  let best: { key: string; d: number } | undefined;
  for (const k of known) {
    const d = editDistance(a, norm(k));
    if (!best || d < best.d) best = { key: k, d };
  }
  return best && best.d <= Math.max(1, Math.floor(a.length / 3)) ? best.key : undefined;
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) row[j] = Math.min(prev[j]! + 1, row[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = row;
  }
  return prev[b.length]!;
}

/** Fill defaults and check every constraint, naming the field, its value and the fix. */
export function validateScenario(partial: Partial<Scenario>): Scenario {
  checkKeys(partial, SCENARIO_FIELDS, 'scenario: ');
  const s: Scenario = { ...DEFAULT_SCENARIO, ...partial, ...pipelineDefaults(partial) };
  const positive = ['ep', 'dp', 'experts', 'topK', 'dim', 'hidden', 'layers', 'microBatches'] as const;
  for (const k of positive) {
    if (!Number.isSafeInteger(s[k]) || s[k] < 1) throw new UsageError(`${k} must be a positive integer, got ${s[k]}`);
  }
  for (const k of ['tokens', 'seed'] as const) {
    if (!Number.isSafeInteger(s[k]) || s[k] < 0) throw new UsageError(`${k} must be a non-negative integer, got ${s[k]}`);
  }
  checkPipeline(s);
  if (!ACTIVATIONS.includes(s.activation)) throw new UsageError(`activation must be one of ${ACTIVATIONS.join(', ')}, got '${s.activation}'`);
  if (typeof s.packed !== 'boolean') throw new UsageError(`packed must be true or false, got ${JSON.stringify(s.packed)}`);
  if (typeof s.routing !== 'string') throw new UsageError(`routing must be a string such as 'uniform' or 'starve:1', got ${JSON.stringify(s.routing)}`);
  if (s.experts % s.ep !== 0) throw new UsageError(`num_experts (${s.experts}) must be divisible by ep (${s.ep})`);
  if (s.topK > s.experts) throw new UsageError(`top_k (${s.topK}) must not exceed num_experts (${s.experts})`);
  if (!isVariantName(s.variant)) throw new UsageError(`unknown variant '${s.variant}'; one of ${VARIANT_NAMES.join(', ')}`);
  if (s.fsdp !== null && !WRAP_POLICIES.includes(s.fsdp)) throw new UsageError(`unknown FSDP wrap policy '${s.fsdp}'; one of ${WRAP_POLICIES.join(', ')}`);
  if (s.fsdp !== null && s.dp < 2) throw new UsageError(`FSDP needs a data-parallel dimension: dp must be at least 2, got ${s.dp}`);
  if (s.earlyExitRank !== undefined && (s.earlyExitRank < 0 || s.earlyExitRank >= s.ep)) throw new UsageError(`earlyExitRank must be an EP rank in [0, ${s.ep}), got ${s.earlyExitRank}`);
  if (s.wrongGroupRank !== undefined && (!Number.isSafeInteger(s.wrongGroupRank) || s.wrongGroupRank < 0 || s.wrongGroupRank >= s.ep)) throw new UsageError(`wrongGroupRank must be an EP rank in [0, ${s.ep}), got ${s.wrongGroupRank}`);
  if (s.variant === 'wrong-group' && s.dp < 2) throw new UsageError(`variant wrong-group issues a collective on the data-parallel communicator: dp must be at least 2, got ${s.dp}`);
  if (s.variant === 'stage-metric' && ppOf(s) < 2) throw new UsageError(`variant stage-metric all-reduces over the pipeline group: pp must be at least 2, got ${ppOf(s)}`);
  if (s.variant === 'uneven-batches' && s.microBatches < 2) throw new UsageError(`variant uneven-batches runs a shard of the evaluation batches as micro-batches: microBatches must be at least 2, got ${s.microBatches}`);
  // Evaluation batches are sharded over one stage's ranks (the data-parallel world).
  const world = s.ep * s.dp;
  if (s.evalBatches !== undefined && (!Number.isSafeInteger(s.evalBatches) || s.evalBatches < world || s.evalBatches > world * s.microBatches)) {
    throw new UsageError(`evalBatches must give every one of the ${world} ranks of a stage at least one batch and at most microBatches (${s.microBatches}): an integer in [${world}, ${world * s.microBatches}], got ${s.evalBatches}`);
  }
  checkOrderTable(s, 'firstReady', ['bwd.dispatch', 'fsdp.reduce_scatter']);
  checkOrderTable(s, 'streamOrder', ['shared.all_gather', 'fwd.combine']);
  parseRouting(s.routing, s); // throws a UsageError naming the generator and what is wrong
  if (s.routing === 'explicit') checkExplicitRouting(s);
  checkFitsMemory(s, { tensors: false }); // every engine materializes the routing
  return s;
}

/** Given MoE layer counts per stage, pp defaults to their number and (valid counts) layers to their largest. */
function pipelineDefaults({ moeLayers: m, pp, layers }: Partial<Scenario>): Partial<Scenario> {
  if (!Array.isArray(m)) return {};
  const valid = m.every((n) => Number.isSafeInteger(n) && n >= 0);
  return { pp: pp ?? m.length, ...(valid ? { layers: layers ?? Math.max(1, ...m) } : {}) };
}

/** The pipeline: pp stages and the MoE layers on each (`moeLayers`, one count per stage); `layers` is the most of any stage. */
function checkPipeline(s: Scenario): void {
  const m = s.moeLayers;
  if (m !== undefined && (!Array.isArray(m) || m.length === 0)) throw new UsageError(`moeLayers must list each pipeline stage's number of MoE layers (e.g. [0, 1, 1, 0]), got ${JSON.stringify(m)}`);
  const pp = ppOf(s);
  if (!Number.isSafeInteger(pp) || pp < 1) throw new UsageError(`pp must be a positive integer, got ${s.pp}`);
  if (m === undefined) return;
  if (m.length !== pp || !m.every((n) => Number.isSafeInteger(n) && n >= 0)) {
    throw new UsageError(`moeLayers must give each of the ${pp} pipeline stage(s) its number of MoE layers (${pp} non-negative integers), got ${JSON.stringify(m)}`);
  }
  const most = Math.max(...m);
  if (most === 0) throw new UsageError(`moeLayers ${m.join(',')}: no pipeline stage holds an MoE layer`);
  if (s.layers !== most) throw new UsageError(`layers (${s.layers}) must be the most MoE layers of any stage (${most}) when moeLayers (${m.join(',')}) is given; leave layers out`);
}

/** A completion-order table: for each rank, one of `ops` per layer call. */
function checkOrderTable(s: Scenario, field: 'firstReady' | 'streamOrder', ops: readonly CollectiveOp[]): void {
  const t = s[field];
  if (t === undefined) return;
  const ok = Array.isArray(t) && t.length === worldSize(s) && t.every((row) => Array.isArray(row) && row.length === s.layers * s.microBatches && row.every((o) => ops.includes(o)));
  if (!ok) throw new UsageError(`${field} must list, for each of the ${worldSize(s)} ranks, ${s.layers * s.microBatches} entries of ${ops.map((o) => `'${o}'`).join(' or ')} (one per layer call)`);
}

/** What one rank holds at its peak, estimated, by part, with the scenario fields each grows with. */
function rankMemory(s: Scenario, tensors: boolean): { what: string; bytes: number; fields: (keyof Scenario)[] }[] {
  const f32 = 4;
  const rows = s.tokens * s.topK;
  const parts: { what: string; bytes: number; fields: (keyof Scenario)[] }[] = [{ what: 'routing', bytes: 4 * rows, fields: ['tokens', 'topK'] }];
  if (!tensors) return parts;
  const perExpert = (s.activation === 'silu' ? 3 : 2) * s.dim * s.hidden;
  // Every rank draws all experts, keeps its share and that share's grads (actors/inputs.ts).
  parts.push({ what: 'expert weights', bytes: f32 * perExpert * (s.experts + (2 * s.experts) / s.ep), fields: ['experts', 'dim', 'hidden'] });
  // Saved for backward per layer call, with balanced routing: x and its grad, rows sent and received, expert hidden rows.
  parts.push({ what: 'activations', bytes: f32 * s.layers * (2 * s.tokens * s.dim + 2 * rows * s.dim + 3 * rows * s.hidden), fields: ['tokens', 'topK', 'dim', 'hidden', 'layers'] });
  return parts;
}

const flagOf = (field: string) => `--${field.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`;
const gib = (bytes: number) => (bytes >= 2 ** 40 ? `${(bytes / 2 ** 40).toFixed(1)} TiB` : `${(bytes / 2 ** 30).toFixed(1)} GiB`);

/**
 * Refuses a scenario whose ranks cannot fit in this machine's memory (all ranks run here),
 * naming the memory needed and the flags to lower, instead of a rank crashing mid-step.
 * `tensors`: ranks compute on real tensors (actors, processes); otherwise only routing is held.
 */
export function checkFitsMemory(s: Scenario, { tensors }: { tensors: boolean }, available = totalmem()): void {
  const parts = rankMemory(s, tensors);
  const perRank = parts.reduce((a, p) => a + p.bytes, 0);
  const all = perRank * worldSize(s);
  if (all <= available) return;
  const top = parts.reduce((a, p) => (p.bytes > a.bytes ? p : a));
  const grown = top.fields.filter((f) => (s[f] as number) > (DEFAULT_SCENARIO[f] as number));
  const flags = (grown.length ? grown : top.fields).map((f) => `${flagOf(f)} ${s[f] as number}`).join(', ');
  throw new UsageError(
    `too large for this machine: ${worldSize(s)} rank(s) need about ${gib(all)} (${gib(perRank)} each, mostly ${top.what}) and this machine has ${gib(available)} of memory; lower ${flags}`,
  );
}

/** The rank machine's input for global rank `rank` of the scenario. */
export function rankConfig(s: Scenario, rank: number): RankConfig {
  const swiglu = s.activation === 'silu';
  return {
    rank,
    epRank: epRankOf(s, rank),
    dpRank: dpRankOf(s, rank),
    ppRank: ppRankOf(s, rank),
    ep: s.ep,
    dp: s.dp,
    pp: ppOf(s),
    layers: layersOnRank(s, rank),
    stageLayers: s.moeLayers ?? Array.from({ length: ppOf(s) }, () => s.layers),
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
      wrongGroupRank: s.wrongGroupRank ?? s.ep - 1,
      evalBatches: s.evalBatches ?? s.ep * s.dp * s.microBatches - 1,
    }),
  };
}


/** Salt that keeps the completion-order draw apart from the routing draw of the same seed, rank and layer call. */
const FIRST_READY_STREAM = 1;

/** The scenario's completion orders, or each drawn from its seed: arbitrary, but the same on every engine and every run. */
export function firstReadyOf(s: Scenario): FirstReady {
  const orders = { backward: { table: s.firstReady, ops: ['bwd.dispatch', 'fsdp.reduce_scatter'], salt: 0 }, forward: { table: s.streamOrder, ops: ['shared.all_gather', 'fwd.combine'], salt: 1 } } as const;
  return (rank, layer, microBatch, phase) => {
    const { table, ops, salt } = orders[phase];
    const call = microBatch * s.layers + layer;
    if (table) return table[rank]?.[call] ?? ops[1];
    return seededRng(mixSeed(s.seed, rank, microBatch, layer, FIRST_READY_STREAM + salt))() < 0.5 ? ops[0] : ops[1];
  };
}

/** The scenario a case runs as: its layout, one layer, one micro-batch, the seed's protocol unless told otherwise. */
export function caseScenario(meta: CaseMeta, variant: Scenario['variant'] = 'seed'): Scenario {
  return validateScenario({
    ep: meta.ep, dp: 1, experts: meta.numExperts, topK: meta.topK, dim: meta.dim, hidden: meta.hidden,
    layers: 1, microBatches: 1, variant, packed: meta.packed, activation: meta.activation,
  });
}
