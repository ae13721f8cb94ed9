// The exhaustive explorer behind `ep-actors check`: can ANY routing hang this layout?
//
// Routing classes are built directly (./explore/classes.ts), one starved level at a time
// and by rows within a level, so the first counterexample is a shortest one and memory is
// one level's column codes, never the rank permutations. Each class runs once through the
// discrete-event engine with a representative routing (every layer and micro-batch routed
// alike; under completion-order and second-stream, each rank's order of the racing pair is
// part of its kind; under uneven-batches, once per evaluation batch count, fewest first).
//
// Cutoff (reduced mode, the default). The machine's guards read only a rank's own facts
// (./explore/kinds.ts), and two ranks with the same observable facts issue identical,
// mutually consistent collectives; so a class's verdict depends only on which observable
// column kinds it holds, not how many of each: a cutoff of 1. Further, a class holding a
// subset of another's kinds can only hang if the other does (its ranks issue the same
// sequences over sub-communicators: a mismatch, a member missing or a wait-for cycle there
// is one in the larger class too), so when every kind fits in one class and that class
// passes, every class passes: one run proves the layout. Otherwise, and to find a
// shortest counterexample, the sets of kinds are searched in order.
//
// The issue-16 facts (./explore/kinds.ts says why each keeps the argument above): a rank
// whose local expert gets no rows (kernel-hang) is a kind, and a stall is a finding like a
// hang: a class holding that kind stalls wherever the kind's rank reaches its expert backward,
// so the superset argument holds (a larger class stalls there too, or hangs before). The
// second stream's order is a kind as completion-order's is. The wrong-group rank is singled out
// as early-exit's. Evaluation batch counts are not a rank kind: each class runs once per count,
// and a class passes only if every count does; with no routing fact read under that variant,
// the verdict depends on the count alone, so the first class at level 0 finds the fewest
// batches that hang.
//
// Sharding: within a starved level, shard i/n keeps the classes enumerated at positions ≡ i
// (mod n), so each holds 1/n of a level; its results merge (mergeResults) into one proof or
// counterexample by the search-order key (level, rows, position).
import { getHeapStatistics } from 'node:v8';
import type { CollectiveOp } from '../src/ep/types.js';
import { UsageError } from '../src/errors.js';
import type { Diagnosis } from '../machines/diagnosis.js';
import type { RankSnapshot } from '../machines/snapshot.js';
import { startRank } from '../machines/snapshot.js';
import { simulateDes, TransitionMemo } from './des.js';
import { rankConfig, validateScenario, type Scenario } from '../machines/scenario.js';
import { ppOf, worldSize } from '../machines/mesh.js';
import { alphabet, classesAtLevel, realize, replayScenario, withExtras, type Realized } from './explore/classes.js';
import { observe } from './explore/kinds.js';
import type { VariantName } from '../machines/variants.js';

export const RESULT_FORMAT = 'ep-actors.check/1';
export const DEFAULT_MAX_CLASSES = 1_000_000;
/** Most ranks a class runs with: the engine holds every rank's routing facts (ep=4096: ~40 s and 2 GB a class). */
export const MAX_WORLD = 4096;
/** Heap in use past which the transition memo starts over (it only saves time). */
const MEMO_HEAP = 256 * 2 ** 20;
/** Initial snapshots kept for reuse across evaluation batch counts (measured: ~1.3 kB each at ep=64, so ~20 MB). */
const MAX_INITIAL_SNAPSHOTS = 1 << 14;

/** One rank's routing facts in a class. */
export interface RankClass {
  readonly holdsTokens: boolean;
  readonly usedExperts: number;
}

export interface Shard {
  readonly index: number;
  readonly count: number;
}

/**
 * A class's place in the search order: starved ranks, rows, then its position in the level's
 * enumeration (the same in every shard, so shards need not share a level to agree on it).
 */
export type OrderKey = readonly [level: number, rows: number, seq: number];

const before = (x: OrderKey, y: OrderKey) => x[0] - y[0] || x[1] - y[1] || x[2] - y[2];

export interface Counterexample {
  readonly key: OrderKey;
  readonly ranks: readonly RankClass[];
  readonly starvedRanks: readonly number[];
  readonly rows: number;
  /** Per global rank and layer call, the collective issued first where two were ready (completion-order, second-stream), else null. */
  readonly firstReady: readonly CollectiveOp[][] | null;
  /** uneven-batches: the evaluation batches whose round-robin shards hang, else null. */
  readonly evalBatches: number | null;
  readonly scenario: Scenario;
  readonly diagnosis: Diagnosis;
}

export interface Reduction {
  /** Ranks of one observable kind that matter (1), or null for the exhaustive search. */
  readonly cutoff: 1 | null;
  /** What the guards observe per rank, from the variant and layout. */
  readonly observed: readonly string[];
  /** Rank kinds the search tells apart, and column kinds (one rank kind per dp group). */
  readonly rankKinds: number;
  readonly columnKinds: number;
  /** The proof came from one class holding every kind (see the header). */
  readonly everyKindAtOnce: boolean;
}

export interface Stop {
  /** max-classes: that many run; level: one starved level holds more than that; memory: the heap is nearly full. */
  readonly reason: 'max-classes' | 'level' | 'memory';
  /** Every class of this shard before this key was run and passed; none from it on. */
  readonly key: OrderKey;
}

export interface ExploreResult {
  readonly format: typeof RESULT_FORMAT;
  readonly layout: Scenario;
  readonly shard: Shard;
  readonly verdict: 'proved' | 'counterexample' | 'stopped';
  readonly reduction: Reduction;
  /** Engine runs: one per class (under uneven-batches, one per class and evaluation batch count); --max-classes bounds it. */
  readonly classesRun: number;
  /** Starved levels searched to the end (a level holds the classes with that many starved ranks). */
  readonly levelsDone: number;
  readonly elapsedMs: number;
  readonly counterexample: Counterexample | null;
  readonly stopped: Stop | null;
}

export interface Progress {
  readonly level: number;
  readonly maxLevel: number;
  readonly levelDone: number;
  readonly levelSize: number;
  readonly classesRun: number;
  readonly elapsedMs: number;
}

export interface ExploreOptions {
  /** Apply the cutoff (default); false: every class of rank kinds, no reduction. */
  readonly reduce?: boolean;
  readonly shard?: Shard;
  /** Most classes to run, and to hold for one starved level (default DEFAULT_MAX_CLASSES). */
  readonly maxClasses?: number;
  /** Stop when the V8 heap passes this fraction of its limit (default 0.7). */
  readonly heapFraction?: number;
  readonly onProgress?: (p: Progress) => void;
}

/**
 * Variants whose guards read facts the class search does not enumerate yet: refused rather
 * than wrongly proved. stage-metric: its guard reads the stage's MoE-layer count (a layout
 * fact per pipeline stage), which the search does not vary.
 */
export const UNEXPLORED_VARIANTS: readonly VariantName[] = ['stage-metric'];

/** Explore every routing class (with its orders and batch counts) of the layout under its variant. */
export function explore(layout: Scenario, opts: ExploreOptions = {}): ExploreResult {
  const t0 = performance.now();
  // Routing and evaluation batch counts are what the search chooses.
  const s = validateScenario({ ...layout, routing: 'uniform', explicit: undefined, evalBatches: undefined });
  if (UNEXPLORED_VARIANTS.includes(s.variant)) {
    throw new UsageError(`check does not explore variant ${s.variant} yet: its guards read facts the class search does not enumerate, so a proof would not hold; run it with sim or sweep`);
  }
  // The classes route the EP groups of one stage (plan and realize cover dp × ep ranks).
  if (ppOf(s) > 1) throw new UsageError(`check does not explore pipeline stages yet (pp=${ppOf(s)}): its classes route the dp × ep ranks of one stage, so a proof would not hold; run pipelines with sim or sweep`);
  if (worldSize(s) > MAX_WORLD) throw new UsageError(`check: ${worldSize(s)} ranks (ep=${s.ep} × dp=${s.dp}); every class runs at full size through the engine, up to ${MAX_WORLD} ranks`);
  const o = observe(s);
  const reduced = opts.reduce ?? true;
  const a = alphabet(s, o, reduced);
  const shard = opts.shard ?? { index: 0, count: 1 };
  const limit = opts.maxClasses ?? DEFAULT_MAX_CLASSES;
  const heapLimit = getHeapStatistics().heap_size_limit;
  const heapCap = (opts.heapFraction ?? 0.7) * heapLimit;
  const movable = s.ep - o.fixedEpRanks.length;
  const maxLevel = worldSize(s);
  // A held class costs about an object, a typed array and a slot (measured: ~200 bytes + 2 per column).
  const heldBytes = 256 + 2 * movable;
  // Classes of one layout share every rank's initial snapshot (the config, not the routing);
  // the evaluation batch count is config, so each count has its own (kept while they are few).
  const initials = new Map<number | undefined, readonly RankSnapshot[]>();
  const initialFor = (evalBatches: number | undefined) => {
    const known = initials.get(evalBatches);
    if (known) return known;
    const sc = evalBatches === undefined ? s : { ...s, evalBatches };
    const snaps = Array.from({ length: worldSize(s) }, (_, r) => startRank(rankConfig(sc, r)));
    if ((initials.size + 1) * snaps.length <= MAX_INITIAL_SNAPSHOTS) initials.set(evalBatches, snaps);
    return snaps;
  };
  let memo = new TransitionMemo();
  let classesRun = 0;
  let levelsDone = 0;
  let everyKindAtOnce = false;

  const heapUsed = () => getHeapStatistics().used_heap_size;
  // Each class runs once per evaluation batch count (uneven-batches), else once.
  const counts = o.evalBatches ?? [undefined];
  const run = (r: Realized, evalBatches: number | undefined) => {
    classesRun++;
    // The memo only saves time: start a new one before it crowds the heap.
    if (classesRun % 64 === 0 && heapUsed() > Math.min(heapCap / 3, MEMO_HEAP)) memo = new TransitionMemo();
    const scenario = replayScenario(s, o, r, evalBatches);
    return { scenario, diagnosis: simulateDes(scenario, { initial: initialFor(evalBatches), memo }).diagnosis };
  };
  const counterexample = (key: OrderKey, r: Realized, scenario: Scenario, diagnosis: Diagnosis): Counterexample => ({
    key,
    ranks: r.kinds.map((k) => ({ holdsTokens: k.holdsTokens, usedExperts: k.usedExperts })),
    starvedRanks: r.starved,
    rows: r.rows,
    firstReady: r.firstReady,
    evalBatches: scenario.evalBatches ?? null,
    scenario,
    diagnosis,
  });
  const finish = (verdict: ExploreResult['verdict'], ce: Counterexample | null, stopped: Stop | null): ExploreResult => ({
    format: RESULT_FORMAT,
    layout: s,
    shard,
    verdict,
    reduction: { cutoff: reduced ? 1 : null, observed: o.facts, rankKinds: a.letters.length, columnKinds: a.columns, everyKindAtOnce },
    classesRun,
    levelsDone,
    elapsedMs: performance.now() - t0,
    counterexample: ce,
    stopped,
  });

  if (reduced && a.columns <= movable) {
    // Every column kind at once (per choice of the singled-out columns): if these pass, all do.
    const all = Array.from({ length: a.columns }, (_, c) => c);
    const reps = (o.fixedEpRanks.length ? all.map((c) => [c]) : [[]]).map((fixed) => withExtras(s, o, a, fixed, all));
    if (reps.every((r) => r !== null) && reps.length * counts.length <= limit) {
      everyKindAtOnce = reps.every((r) => counts.every((n) => run(realize(s, o, a, r!.cls)!, n).diagnosis.verdict === 'ok'));
      if (everyKindAtOnce) {
        levelsDone = maxLevel + 1;
        return finish('proved', null, null);
      }
    }
  }

  let lastReport = 0;
  for (let level = 0; level <= maxLevel; level++) {
    // This shard's classes of the level (every count-th in enumeration order), as column codes
    // (a dp group's letters fit 16 bits, MAX_COLUMNS), then run by rows.
    const held: { fixed: readonly number[]; columns: Uint16Array; rows: number; seq: number }[] = [];
    const stopHere = (reason: Stop['reason']) => finish('stopped', null, { reason, key: [level, -1, -1] });
    // The level may take half of the heap still free below the cap.
    const maxHeld = Math.max(0, (heapCap - heapUsed()) / 2 / heldBytes);
    let seq = 0;
    for (const { cls, plan } of classesAtLevel(s, o, a, reduced, level)) {
      if (seq++ % shard.count !== shard.index) continue;
      if (held.length >= limit) return stopHere('level');
      if (held.length >= maxHeld || (held.length % 1024 === 1023 && heapUsed() > heapCap)) return stopHere('memory');
      held.push({ fixed: cls.fixed, columns: Uint16Array.from(cls.columns), rows: plan.rows, seq: seq - 1 });
    }
    held.sort((x, y) => x.rows - y.rows || x.seq - y.seq);
    for (let i = 0; i < held.length; i++) {
      const key: OrderKey = [level, held[i]!.rows, held[i]!.seq];
      const r = realize(s, o, a, { fixed: held[i]!.fixed, columns: [...held[i]!.columns] })!;
      for (const n of counts) {
        if (classesRun >= limit) return finish('stopped', null, { reason: 'max-classes', key });
        if (classesRun % 256 === 255 && heapUsed() > heapCap) return finish('stopped', null, { reason: 'memory', key });
        const { scenario, diagnosis } = run(r, n);
        if (diagnosis.verdict !== 'ok') return finish('counterexample', counterexample(key, r, scenario, diagnosis), null);
      }
      const now = performance.now();
      if (opts.onProgress && now - lastReport > 200) {
        lastReport = now;
        opts.onProgress({ level, maxLevel, levelDone: i + 1, levelSize: held.length, classesRun, elapsedMs: now - t0 });
      }
    }
    levelsDone = level + 1;
  }
  return finish('proved', null, null);
}

/** Every class of the shard before this key was run and passed (null: all of them). */
const coveredBelow = (r: ExploreResult): OrderKey | null => r.counterexample?.key ?? r.stopped?.key ?? null;

export interface MergedResult {
  readonly verdict: ExploreResult['verdict'];
  readonly layout: Scenario;
  readonly shards: number;
  readonly reduction: Reduction;
  readonly classesRun: number;
  /** The sum over shards: machine time, not wall time. */
  readonly elapsedMs: number;
  readonly counterexample: Counterexample | null;
  /** False when a shard stopped before the counterexample's position, so a shorter one may exist. */
  readonly shortest: boolean | null;
  /** Shards that stopped at a limit, and where. */
  readonly stopped: readonly (Stop & { shard: number })[];
}

/** Merge the results of every shard of one run into one proof or counterexample. */
export function mergeResults(parts: readonly ExploreResult[]): MergedResult {
  if (parts.length === 0) throw new UsageError('check --merge: no results to merge');
  const first = parts[0]!;
  const key = (r: ExploreResult) => JSON.stringify([r.layout, r.reduction.cutoff]);
  for (const p of parts) {
    if (p.format !== RESULT_FORMAT) throw new UsageError(`check --merge: not a check result (format '${String(p.format)}', want '${RESULT_FORMAT}')`);
    if (key(p) !== key(first)) throw new UsageError(`check --merge: shard ${p.shard.index}/${p.shard.count} explored another layout or mode than shard ${first.shard.index}/${first.shard.count}`);
    if (p.shard.count !== first.shard.count) throw new UsageError(`check --merge: shards of ${p.shard.count} and of ${first.shard.count} mixed`);
  }
  const seen = new Set<number>();
  for (const p of parts) {
    if (seen.has(p.shard.index)) throw new UsageError(`check --merge: shard ${p.shard.index}/${p.shard.count} given twice`);
    seen.add(p.shard.index);
  }
  const missing = Array.from({ length: first.shard.count }, (_, i) => i).filter((i) => !seen.has(i));
  if (missing.length) throw new UsageError(`check --merge: shard${missing.length > 1 ? 's' : ''} ${missing.map((i) => `${i}/${first.shard.count}`).join(', ')} missing`);
  const best = parts
    .map((p) => p.counterexample)
    .filter((c): c is Counterexample => c !== null)
    .sort((x, y) => before(x.key, y.key))[0];
  // A proof from one class holding every kind covers every shard.
  const proof = parts.find((p) => p.verdict === 'proved' && p.reduction.everyKindAtOnce);
  const stopped = proof ? [] : parts.flatMap((p) => (p.stopped ? [{ ...p.stopped, shard: p.shard.index }] : []));
  const verdict = best ? 'counterexample' : stopped.length ? 'stopped' : 'proved';
  return {
    verdict,
    layout: first.layout,
    shards: first.shard.count,
    reduction: proof?.reduction ?? first.reduction,
    classesRun: parts.reduce((n, p) => n + p.classesRun, 0),
    elapsedMs: parts.reduce((n, p) => n + p.elapsedMs, 0),
    counterexample: best ?? null,
    shortest: best ? parts.every((p) => coveredBelow(p) === null || before(coveredBelow(p)!, best.key) >= 0) : null,
    stopped,
  };
}
