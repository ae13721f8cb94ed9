// The exhaustive explorer behind `ep-actors check`: can ANY routing hang this layout?
//
// Routing classes. The rank machine's guards read, per rank and layer, whether the rank
// holds tokens (its sends), whether any row reaches it (its receives) and which of its
// local experts get rows (gradient hooks, FSDP sizes). A class fixes those facts for every
// rank: a state (holds tokens, number of local experts that receive rows). Which source
// sends to which destination, and how many rows, changes no guard: every holder sends to
// every used expert in the class's representative routing. Local experts of one rank are
// interchangeable, so a count stands for the set. Classes equal up to a permutation of EP
// ranks (applied to every dp group alike, the variant's distinguished rank held fixed) and
// of dp groups behave alike: only one of each orbit is run (symmetry reduction).
//
// Schedules. Where a compute makes two collectives ready at once (variant
// completion-order), every rank's choice of which goes first is explored.
//
// Order. Classes run fewest starved ranks (receiving no rows) first, then fewest rows, so
// the first counterexample found is a shortest one.
import { UsageError } from '../src/errors.js';
import type { CollectiveOp } from '../src/ep/types.js';
import type { Diagnosis } from '../machines/diagnosis.js';
import type { RankSnapshot } from '../machines/protocol.js';
import { startRank } from '../machines/protocol.js';
import { simulateDes, TransitionMemo } from './des.js';
import { rankConfig, validateScenario, type Scenario } from '../machines/scenario.js';
import { worldSize } from '../machines/mesh.js';

/** One rank's routing facts in a class. */
export interface RankClass {
  readonly holdsTokens: boolean;
  /** Local experts receiving rows (the first `usedExperts` of the rank's block). */
  readonly usedExperts: number;
}

export interface Counterexample {
  readonly classIndex: number;
  readonly ranks: readonly RankClass[];
  readonly starvedRanks: readonly number[];
  readonly rows: number;
  /** Per global rank and layer call, the collective issued first where two were ready (completion-order), else null. */
  readonly firstReady: readonly CollectiveOp[][] | null;
  readonly scenario: Scenario;
  readonly diagnosis: Diagnosis;
}

export interface ExploreResult {
  readonly verdict: 'proved' | 'counterexample';
  /** Routing classes after symmetry reduction, and how many were run. */
  readonly classes: number;
  readonly classesRun: number;
  readonly schedulesRun: number;
  /** Symmetries used: how many rank permutations map the layout to itself. */
  readonly symmetries: number;
  readonly elapsedMs: number;
  readonly counterexample: Counterexample | null;
}

export interface ExploreOptions {
  /** Refuse layouts with more raw assignments than this (symmetry is checked per assignment when dp > 1). */
  readonly maxAssignments?: number;
  readonly onProgress?: (done: number, total: number) => void;
}

/** Global ranks whose behaviour the variant singles out (early-exit's rank, in every dp group). */
function fixedEpRanks(s: Scenario): Set<number> {
  return s.variant === 'early-exit' ? new Set([s.earlyExitRank ?? s.ep - 1]) : new Set();
}

function permutations(items: readonly number[]): number[][] {
  if (items.length <= 1) return [[...items]];
  return items.flatMap((x, i) => permutations([...items.slice(0, i), ...items.slice(i + 1)]).map((p) => [x, ...p]));
}

/** World-rank permutations: EP ranks permuted alike in every dp group (fixed ones kept), dp groups permuted. */
function symmetryGroup(s: Scenario): number[][] {
  const fixed = fixedEpRanks(s);
  const movable = Array.from({ length: s.ep }, (_, e) => e).filter((e) => !fixed.has(e));
  const epPerms = permutations(movable).map((p) => {
    const full = Array.from({ length: s.ep }, (_, e) => e);
    movable.forEach((e, i) => (full[e] = p[i]!));
    return full;
  });
  const dpPerms = permutations(Array.from({ length: s.dp }, (_, d) => d));
  return dpPerms.flatMap((dp) => epPerms.map((ep) => Array.from({ length: s.ep * s.dp }, (_, g) => dp[Math.floor(g / s.ep)]! * s.ep + ep[g % s.ep]!)));
}

/** Non-decreasing sequences of `len` digits below `radix`: one per multiset. */
function* sortedSequences(len: number, radix: number, min = 0): Generator<number[]> {
  if (len === 0) {
    yield [];
    return;
  }
  for (let d = min; d < radix; d++) for (const rest of sortedSequences(len - 1, radix, d)) yield [d, ...rest];
}

/**
 * One digit per world rank (holdsTokens · (nLocal+1) + usedExperts), one assignment per
 * orbit under the symmetry group. With one dp group and no fixed rank the orbits are the
 * multisets; otherwise every assignment is checked for being least in its orbit.
 */
function canonicalAssignments(s: Scenario, group: number[][], maxAssignments: number): number[][] {
  const radix = 2 * (s.experts / s.ep + 1);
  const n = worldSize(s);
  const fixed = fixedEpRanks(s);
  if (s.dp === 1 && fixed.size === 0) return [...sortedSequences(n, radix)];
  const total = radix ** n;
  if (total > maxAssignments) throw new UsageError(`check: ${total} raw routing assignments over ${n} ranks exceed the limit ${maxAssignments}; use fewer ranks or experts per rank`);
  const out: number[][] = [];
  const digits = new Array<number>(n).fill(0);
  const lessThan = (perm: number[]) => {
    for (let i = 0; i < n; i++) {
      // (π·a)[π(g)] = a[g]: compare the permuted assignment with a, position by position.
      const d = digits[perm.indexOf(i)]! - digits[i]!;
      if (d !== 0) return d < 0;
    }
    return false;
  };
  for (let k = 0; k < total; k++) {
    let x = k;
    for (let i = n - 1; i >= 0; i--) [digits[i], x] = [x % radix, Math.floor(x / radix)];
    if (!group.some(lessThan)) out.push([...digits]);
  }
  return out;
}

interface ClassCase {
  readonly ranks: RankClass[];
  readonly starved: number[];
  readonly rows: number;
  readonly explicit: number[][][][];
}

/** The representative routing of a class, or null when no routing has these facts. */
function concretize(s: Scenario, digits: readonly number[]): ClassCase | null {
  const nLocal = s.experts / s.ep;
  const ranks = digits.map((d) => ({ holdsTokens: d >= nLocal + 1, usedExperts: d % (nLocal + 1) }));
  const explicit: number[][][][] = [];
  const starved: number[] = [];
  let rows = 0;
  for (let d = 0; d < s.dp; d++) {
    const members = ranks.slice(d * s.ep, (d + 1) * s.ep);
    const used = members.flatMap((r, e) => Array.from({ length: r.usedExperts }, (_, i) => e * nLocal + i));
    const holders = members.filter((r) => r.holdsTokens).length;
    // Every token picks top_k distinct experts; rows reach an expert only from a holder.
    if (holders > 0 ? used.length < s.topK : used.length > 0) return null;
    const tokens = holders > 0 ? Math.ceil(used.length / s.topK) : 0;
    const ids = Array.from({ length: tokens * s.topK }, (_, i) => used[(Math.floor(i / s.topK) * s.topK + (i % s.topK)) % used.length]!);
    members.forEach((r, e) => {
      if (r.usedExperts === 0) starved.push(d * s.ep + e);
      const mine = r.holdsTokens ? ids : [];
      rows += mine.length;
      explicit.push(Array.from({ length: s.microBatches }, () => Array.from({ length: s.layers }, () => [...mine])));
    });
  }
  return { ranks, starved, rows, explicit };
}

/** Whether the variant makes the rank's issue order depend on completion order. */
const hasSchedules = (s: Scenario) => s.variant === 'completion-order' && s.fsdp === 'experts';

function* schedules(s: Scenario): Generator<CollectiveOp[][] | null> {
  if (!hasSchedules(s)) {
    yield null;
    return;
  }
  // One choice per (rank, layer·micro-batch): which of B′ and the reduce-scatter goes first.
  const n = worldSize(s);
  const slots = n * s.layers * s.microBatches;
  if (slots > 20) throw new UsageError(`check: ${2 ** slots} completion orders (${n} ranks × ${s.layers * s.microBatches} layer calls) are too many to explore; use fewer ranks or layers`);
  for (let k = 0; k < 2 ** slots; k++) {
    yield Array.from({ length: n }, (_, r) =>
      Array.from({ length: s.layers * s.microBatches }, (_, c) => ((k >> (r * s.layers * s.microBatches + c)) & 1 ? 'bwd.dispatch' : 'fsdp.reduce_scatter') as CollectiveOp),
    );
  }
}

/** Explore every routing class (and completion order) of the layout `s` under its variant. */
export function explore(layout: Scenario, opts: ExploreOptions = {}): ExploreResult {
  const t0 = performance.now();
  const s = validateScenario({ ...layout, routing: 'uniform', explicit: undefined });
  const group = symmetryGroup(s);
  const cases = canonicalAssignments(s, group, opts.maxAssignments ?? 2_000_000)
    .map((digits) => concretize(s, digits))
    .filter((c): c is ClassCase => c !== null)
    .sort((a, b) => a.starved.length - b.starved.length || a.rows - b.rows);
  // Classes of one layout share every rank's initial snapshot (the config, not the routing).
  const initial: RankSnapshot[] = Array.from({ length: worldSize(s) }, (_, r) => startRank(rankConfig(s, r)));
  const memo = new TransitionMemo();
  let schedulesRun = 0;
  for (let i = 0; i < cases.length; i++) {
    const c = cases[i]!;
    const scenario: Scenario = { ...s, routing: 'explicit', explicit: c.explicit, tokens: Math.max(0, ...c.explicit.map((r) => r[0]![0]!.length / s.topK)) };
    for (const order of schedules(s)) {
      schedulesRun++;
      const firstReady = order ? (rank: number, layer: number, mb: number) => order[rank]![mb * s.layers + layer]! : undefined;
      const { diagnosis } = simulateDes(scenario, { initial, firstReady, memo });
      if (diagnosis.verdict !== 'ok') {
        return {
          verdict: 'counterexample',
          classes: cases.length,
          classesRun: i + 1,
          schedulesRun,
          symmetries: group.length,
          elapsedMs: performance.now() - t0,
          counterexample: { classIndex: i, ranks: c.ranks, starvedRanks: c.starved, rows: c.rows, firstReady: order, scenario: order ? { ...scenario, firstReady: order } : scenario, diagnosis },
        };
      }
    }
    opts.onProgress?.(i + 1, cases.length);
  }
  return { verdict: 'proved', classes: cases.length, classesRun: cases.length, schedulesRun, symmetries: group.length, elapsedMs: performance.now() - t0, counterexample: null };
}
