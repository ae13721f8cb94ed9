// Routing generators: which experts each token of each rank picks, per micro-batch and
// layer, deterministically from the scenario's seed. Generators:
//   uniform    each token picks top_k distinct experts uniformly
//   zipf:S     expert popularity ∝ 1/(i+1)^S (skewed load)
//   starve:R   no row of global rank R's EP group goes to R's experts (the zero-token rank);
//              starve:R1,R2 starves several ranks
//   hot:E      every token's first choice is expert E, the rest uniform
//   empty:R    global rank R holds no tokens
//   explicit   ids given in the scenario (replay files, case files)
import { UsageError } from '../src/errors.js';
import { ppRankOf, worldSize, type Mesh } from './mesh.js';

/** What the routing generators read of a scenario: the layout, the step's shape and the generator. */
export interface RoutedLayout extends Mesh {
  experts: number;
  topK: number;
  /** Tokens per rank per micro-batch (before a routing generator empties a rank). */
  tokens: number;
  /** MoE layers per rank per step: on every pipeline stage, or the most of any stage when `moeLayers` is given. */
  layers: number;
  /** Pipeline: MoE layers on each stage, one count per stage (absent: `layers` on every stage). */
  moeLayers?: number[];
  microBatches: number;
  /** uniform | zipf:S | starve:R | hot:E | empty:R | explicit (see parseRouting) */
  routing: string;
  seed: number;
  /** Explicit routing: per global rank, per micro-batch, per layer, the T·K global expert ids. */
  explicit?: number[][][][];
}
import { mixSeed, seededRng } from '../src/moe/random.js';

export type RoutingSpec =
  | { kind: 'uniform' }
  | { kind: 'zipf'; s: number }
  | { kind: 'starve'; ranks: number[] }
  | { kind: 'hot'; expert: number }
  | { kind: 'empty'; rank: number }
  | { kind: 'explicit' };

export const ROUTING_HELP = 'uniform | zipf:S | starve:R[,R...] | hot:E | empty:R | explicit';

/** MoE layers on global rank `rank`'s pipeline stage. */
export const layersOnRank = (s: Pick<RoutedLayout, 'ep' | 'dp' | 'layers' | 'moeLayers'>, rank: number): number => s.moeLayers?.[ppRankOf(s, rank)] ?? s.layers;

export function parseRouting(spec: string, s: Pick<RoutedLayout, 'ep' | 'dp' | 'pp' | 'experts' | 'topK' | 'explicit'>): RoutingSpec {
  const [kind, arg] = spec.split(':', 2);
  const num = (what: string) => {
    const n = Number(arg);
    if (arg === undefined || arg === '' || !Number.isFinite(n)) throw new UsageError(`routing '${spec}': ${kind} needs a numeric ${what} (${kind}:${what})`);
    return n;
  };
  const intIn = (what: string, hi: number) => {
    const n = num(what);
    if (!Number.isInteger(n) || n < 0 || n >= hi) throw new UsageError(`routing '${spec}': ${what} must be an integer in [0, ${hi}), got ${arg}`);
    return n;
  };
  switch (kind) {
    case 'uniform':
      return { kind };
    case 'zipf': {
      const z = num('S');
      if (z < 0) throw new UsageError(`routing '${spec}': the zipf exponent must be >= 0`);
      return { kind, s: z };
    }
    case 'starve': {
      const ranks = (arg ?? '').split(',').map((r) => {
        const n = Number(r);
        if (r === '' || !Number.isInteger(n) || n < 0 || n >= worldSize(s)) throw new UsageError(`routing '${spec}': R must be a rank in [0, ${worldSize(s)}), got '${r}'`);
        return n;
      });
      const nLocal = s.experts / s.ep;
      for (let g = 0; g < worldSize(s) / s.ep; g++) {
        const inGroup = new Set(ranks.filter((r) => Math.floor(r / s.ep) === g)).size;
        const left = s.experts - inGroup * nLocal;
        if (left < s.topK) throw new UsageError(`routing '${spec}': starving ${inGroup} rank(s) of EP group ${g} leaves ${left} experts, fewer than top_k (${s.topK})`);
      }
      return { kind, ranks };
    }
    case 'hot':
      return { kind, expert: intIn('E', s.experts) };
    case 'empty':
      return { kind, rank: intIn('R', worldSize(s)) };
    case 'explicit':
      if (!s.explicit) throw new UsageError(`routing 'explicit' needs the scenario's explicit routing table`);
      return { kind };
    default:
      throw new UsageError(`unknown routing generator '${spec}'; one of ${ROUTING_HELP}`);
  }
}

/**
 * Explicit routing as a top-k router gives it (replay and case files are checked, not
 * trusted): per global rank, micro-batch and layer, whole tokens of top_k distinct experts in
 * [0, experts). The model assumes distinct experts per token; a repeat is refused by name.
 */
export function checkExplicitRouting(s: Pick<RoutedLayout, 'ep' | 'dp' | 'pp' | 'experts' | 'topK' | 'layers' | 'moeLayers' | 'microBatches' | 'explicit'>): void {
  const table = s.explicit;
  const world = worldSize(s);
  if (!Array.isArray(table) || table.length !== world) throw new UsageError(`explicit routing needs one entry per rank (${world}), got ${Array.isArray(table) ? table.length : typeof table}`);
  table.forEach((perRank, r) => {
    const layers = layersOnRank(s, r);
    for (let mb = 0; mb < s.microBatches; mb++) {
      for (let layer = 0; layer < layers; layer++) {
        const where = `explicit routing: rank ${r}, micro-batch ${mb}, layer ${layer}`;
        const ids = perRank?.[mb]?.[layer];
        if (!Array.isArray(ids)) throw new UsageError(`${where}: no expert ids (the table needs ${s.microBatches} micro-batch(es) × ${layers} layer(s) for this rank)`);
        if (ids.length % s.topK !== 0) throw new UsageError(`${where}: ${ids.length} expert ids are not whole tokens of top_k ${s.topK}`);
        for (let t = 0; t < ids.length / s.topK; t++) {
          const token = ids.slice(t * s.topK, (t + 1) * s.topK);
          token.forEach((e, k) => {
            if (!Number.isInteger(e) || e < 0 || e >= s.experts) throw new UsageError(`${where}: token ${t} picks expert ${JSON.stringify(e)}, outside [0, ${s.experts})`);
            if (token.indexOf(e) < k) throw new UsageError(`${where}: token ${t} is sent to expert ${e} twice; a top-k router picks ${s.topK} distinct experts`);
          });
        }
      }
    }
  });
}


/** Per scenario (treated as immutable once routed): its parsed generator and, per EP group, the experts its tokens may pick. */
const plans = new WeakMap<RoutedLayout, { spec: RoutingSpec; allowed: Map<number, number[]> }>();

function planOf(s: RoutedLayout, group: number): { spec: RoutingSpec; allowed: number[] } {
  let plan = plans.get(s);
  if (!plan) plans.set(s, (plan = { spec: parseRouting(s.routing, s), allowed: new Map() }));
  let allowed = plan.allowed.get(group);
  if (!allowed) {
    // Starvation is per EP group: with dp > 1 only the starved rank's group avoids its experts,
    // so its data-parallel peers still compute (what makes FSDP reduce-scatters diverge).
    const spec = plan.spec;
    const nLocal = s.experts / s.ep;
    const starved = new Set(spec.kind === 'starve' ? spec.ranks.filter((r) => Math.floor(r / s.ep) === group).map((r) => r % s.ep) : []);
    allowed = Array.from({ length: s.experts }, (_, e) => e).filter((e) => !starved.has(Math.floor(e / nLocal)));
    plan.allowed.set(group, allowed);
  }
  return { spec: plan.spec, allowed };
}

/** Global expert ids [T·K] (t-major) for one rank, micro-batch and layer. */
export function routeTokens(s: RoutedLayout, rank: number, microBatch: number, layer: number): Int32Array {
  const { spec, allowed } = planOf(s, Math.floor(rank / s.ep));
  if (spec.kind === 'explicit') return Int32Array.from(s.explicit![rank]?.[microBatch]?.[layer] ?? []);
  const tokens = spec.kind === 'empty' && spec.rank === rank ? 0 : s.tokens;
  const rand = seededRng(mixSeed(s.seed, rank, microBatch, layer));
  const weightOf = (e: number) => (spec.kind === 'zipf' ? 1 / (e + 1) ** spec.s : 1);
  const out = new Int32Array(tokens * s.topK);
  for (let t = 0; t < tokens; t++) {
    const chosen = new Set<number>();
    if (spec.kind === 'hot') chosen.add(spec.expert);
    // Uniform picks skip the O(E) weight scan: thousands of ranks route in milliseconds.
    while (chosen.size < s.topK) chosen.add(spec.kind === 'zipf' ? weightedPick(allowed, weightOf, chosen, rand) : uniformPick(allowed, chosen, rand));
    let k = 0;
    for (const e of chosen) out[t * s.topK + k++] = e;
  }
  return out;
}

/**
 * weightedPick with every weight 1, in O(K log K) instead of O(E): it draws the same
 * number and returns the same expert (the floor(x)-th untaken allowed one), so routings
 * stay identical while thousands of ranks route in milliseconds. `allowed` is ascending.
 */
function uniformPick(allowed: readonly number[], taken: Set<number>, rand: () => number): number {
  const takenAt: number[] = [];
  for (const e of taken) {
    const at = lowerBound(allowed, e);
    if (allowed[at] === e) takenAt.push(at);
  }
  takenAt.sort((a, b) => a - b);
  let at = Math.floor(rand() * (allowed.length - takenAt.length));
  for (const p of takenAt) if (p <= at) at++;
  return allowed[at]!;
}

function lowerBound(xs: readonly number[], x: number): number {
  let [lo, hi] = [0, xs.length];
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (xs[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function weightedPick(allowed: readonly number[], weightOf: (e: number) => number, taken: Set<number>, rand: () => number): number {
  let total = 0;
  for (const e of allowed) if (!taken.has(e)) total += weightOf(e);
  let x = rand() * total;
  for (const e of allowed) {
    if (taken.has(e)) continue;
    x -= weightOf(e);
    if (x < 0) return e;
  }
  return allowed.filter((e) => !taken.has(e)).at(-1)!;
}

/** Rows a rank sends to each EP peer: bincount of expert // n_local. */
export function sendCountsOf(indices: ArrayLike<number>, numExperts: number, ep: number): number[] {
  const nLocal = numExperts / ep;
  const counts = new Array<number>(ep).fill(0);
  for (let i = 0; i < indices.length; i++) counts[Math.floor(indices[i]! / nLocal)]!++;
  return counts;
}

// ---- summaries of a step's routing, for reports and run records ----

export interface ReportRouting {
  /** Per source global rank, per destination EP rank: rows sent, summed over layers and micro-batches. */
  readonly sendRows: readonly (readonly number[])[];
  /** Per global expert id: rows routed to it, summed the same way. */
  readonly rowsPerExpert: readonly number[];
}

/** Rows per source→destination pair and per expert over every layer and micro-batch. */
export function routingOf(s: RoutedLayout): ReportRouting {
  const rows = Array.from({ length: worldSize(s) }, (_, r) => rankRouting(s, generatedIndices(s, r)));
  const rowsPerExpert = new Array<number>(s.experts).fill(0);
  for (const r of rows) r.rowsPerExpert.forEach((c, e) => (rowsPerExpert[e]! += c));
  return { sendRows: rows.map((r) => r.sendRows), rowsPerExpert };
}

/** One rank's routing summed over `indices` lists: rows it sends each EP rank and routes to each expert. */
export function rankRouting(s: Pick<RoutedLayout, 'ep' | 'experts'>, indices: Iterable<ArrayLike<number>>): { sendRows: number[]; rowsPerExpert: number[] } {
  const sendRows = new Array<number>(s.ep).fill(0);
  const rowsPerExpert = new Array<number>(s.experts).fill(0);
  for (const idx of indices) {
    sendCountsOf(idx, s.experts, s.ep).forEach((c, j) => (sendRows[j]! += c));
    for (let i = 0; i < idx.length; i++) rowsPerExpert[idx[i]!]!++;
  }
  return { sendRows, rowsPerExpert };
}

/** A rank's generated expert indices, every micro-batch and every layer of its stage. */
export function* generatedIndices(s: RoutedLayout, rank: number): Generator<Int32Array> {
  const layers = layersOnRank(s, rank);
  for (let mb = 0; mb < s.microBatches; mb++) for (let layer = 0; layer < layers; layer++) yield routeTokens(s, rank, mb, layer);
}
