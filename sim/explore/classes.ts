// Routing classes by construction. A rank's kind is what the machine can tell of its routing
// (./kinds.ts); a column is the kinds of one EP index across the dp groups (EP ranks are
// permuted alike in every group, so a column moves as a whole); a class is a multiset of
// columns, up to a permutation of the dp groups, plus the columns the variant singles out.
//
// Two alphabets. Exhaustive: a letter per rank kind, every multiset enumerated. Reduced: a
// letter per observable kind (split by starved or not, which orders the search), and a
// class is the SET of columns present (cutoff 1): the guards read a rank's own facts only
// and two ranks of one kind issue identical, mutually consistent collectives, so a second
// rank of a kind adds no behaviour; extra EP ranks repeat one present column.
//
// Order: classes stream one starved level at a time (ranks receiving no rows), and within a
// level by rows, so the first counterexample is a shortest one. Only one level's classes
// (as column codes) are ever held, and their count is bounded by the caller.
import type { CollectiveOp } from '../../src/ep/types.js';
import { UsageError } from '../../src/errors.js';
import type { Scenario } from '../../machines/scenario.js';
import { reducedKey, rankKinds, type Observation, type RankKind } from './kinds.js';

export interface Alphabet {
  /** Per letter, the rank kinds it stands for, the cheapest realization first. */
  readonly letters: readonly (readonly RankKind[])[];
  readonly dp: number;
  /** Column codes: one letter per dp group, base letters.length, group 0 least significant. */
  readonly columns: number;
  /** Ranks of each column that receive no rows whatever the realization. */
  readonly starved: Int32Array;
  /** For every permutation of the dp groups but the identity, the image of each column code. */
  readonly rowPerms: readonly Int32Array[];
}

/** Largest column alphabet explored (letters^dp). */
const MAX_COLUMNS = 1 << 16;

export function alphabet(s: Scenario, o: Observation, reduced: boolean): Alphabet {
  const kinds = rankKinds(s, o);
  // Cheapest realization first: not starved, holding no tokens, reaching few experts.
  const byCost = (a: RankKind, b: RankKind) =>
    Number(a.usedExperts === 0) - Number(b.usedExperts === 0) || Number(a.holdsTokens) - Number(b.holdsTokens) || a.usedExperts - b.usedExperts || a.schedule - b.schedule;
  let letters: RankKind[][];
  if (reduced) {
    const groups = new Map<string, RankKind[]>();
    for (const k of kinds) groups.set(reducedKey(o, k), [...(groups.get(reducedKey(o, k)) ?? []), k]);
    letters = [...groups.values()].map((g) => g.sort(byCost));
  } else {
    letters = kinds.map((k) => [k]);
  }
  const L = letters.length;
  const columns = L ** s.dp;
  if (columns > MAX_COLUMNS) throw new UsageError(`check: ${columns} column kinds (${L} rank kinds per dp group, dp=${s.dp}) are too many to enumerate; use fewer experts per rank, layers or dp groups`);
  const starvedLetter = letters.map((g) => g.every((k) => k.usedExperts === 0));
  const starved = new Int32Array(columns);
  for (let c = 0; c < columns; c++) for (let d = 0, x = c; d < s.dp; d++, x = Math.floor(x / L)) starved[c]! += Number(starvedLetter[x % L]);
  const rowPerms = permutations(s.dp)
    .slice(1)
    .map((perm) => {
      const map = new Int32Array(columns);
      for (let c = 0; c < columns; c++) {
        let image = 0;
        for (let d = 0; d < s.dp; d++) image += letterOf(L, c, d) * L ** perm[d]!;
        map[c] = image;
      }
      return map;
    });
  return { letters, dp: s.dp, columns, starved, rowPerms };
}

const letterOf = (L: number, code: number, d: number) => Math.floor(code / L ** d) % L;

/** Permutations of 0..n-1, the identity first. */
function permutations(n: number): number[][] {
  if (n > 6) throw new UsageError(`check: dp=${n}: every class is checked against all dp! orders of the dp groups; at most dp=6`);
  const out: number[][] = [];
  const rec = (prefix: number[], rest: number[]) => {
    if (rest.length === 0) out.push(prefix);
    rest.forEach((x, i) => rec([...prefix, x], [...rest.slice(0, i), ...rest.slice(i + 1)]));
  };
  rec([], Array.from({ length: n }, (_, i) => i));
  return out;
}

/** A class: codes of the singled-out columns, and the other columns' codes, sorted. */
export interface ColumnClass {
  readonly fixed: readonly number[];
  readonly columns: readonly number[];
}

/** The class is the least of its images under the dp-group permutations. */
function canonical(a: Alphabet, cls: ColumnClass): boolean {
  for (const map of a.rowPerms) {
    const f = cls.fixed.map((c) => map[c]!);
    const m = cls.columns.map((c) => map[c]!).sort((x, y) => x - y);
    const orig = [...cls.fixed, ...cls.columns];
    const image = [...f, ...m];
    const i = orig.findIndex((v, j) => v !== image[j]);
    if (i >= 0 && image[i]! < orig[i]!) return false;
  }
  return true;
}

function* fixedChoices(a: Alphabet, count: number): Generator<number[]> {
  if (count === 0) {
    yield [];
    return;
  }
  for (let c = 0; c < a.columns; c++) for (const rest of fixedChoices(a, count - 1)) yield [c, ...rest];
}

/**
 * Every canonical class with `level` starved ranks that some routing has, with its plan.
 * Exhaustive: multisets of the movable columns. Reduced: sets S of columns (see withExtras);
 * the level is then additive in each column's excess over the least-starved one.
 */
export function* classesAtLevel(s: Scenario, o: Observation, a: Alphabet, reduced: boolean, level: number): Generator<{ cls: ColumnClass; plan: Plan }> {
  const movable = s.ep - o.fixedEpRanks.length;
  const order = Array.from({ length: a.columns }, (_, c) => c).sort((x, y) => a.starved[x]! - a.starved[y]! || x - y);
  const st = order.map((c) => a.starved[c]!);
  for (const fixed of fixedChoices(a, o.fixedEpRanks.length)) {
    const budget = level - fixed.reduce((n, c) => n + a.starved[c]!, 0);
    if (budget < 0) continue;
    const picked: number[] = [];
    const emit = function* (cls: ColumnClass) {
      const p = canonical(a, cls) ? plan(s, o, a, cls) : null;
      if (p) yield { cls, plan: p };
    };
    if (movable === 0) {
      if (budget === 0) yield* emit({ fixed, columns: [] });
      continue;
    }
    if (!reduced) {
      // Non-decreasing positions in `order`: one sequence per multiset.
      const multisets = function* (pos: number, left: number, b: number): Generator<{ cls: ColumnClass; plan: Plan }> {
        if (left === 0) {
          if (b === 0) yield* emit({ fixed, columns: picked.map((i) => order[i]!).sort((x, y) => x - y) });
          return;
        }
        if (b > left * a.dp) return;
        for (let i = pos; i < order.length; i++) {
          if (st[i]! * left > b) break; // every later column starves at least as many
          picked.push(i);
          yield* multisets(i, left - 1, b - st[i]!);
          picked.pop();
        }
      };
      yield* multisets(0, movable, budget);
      continue;
    }
    for (let m = 0; m <= a.dp; m++) {
      const excess = budget - movable * m;
      if (excess < 0) break;
      const first = st.indexOf(m);
      if (first < 0) continue;
      // Sets of positions from `first` on (columns starving >= m), holding one that starves m.
      const sets = function* (pos: number, b: number): Generator<{ cls: ColumnClass; plan: Plan }> {
        for (let i = pos; i < order.length && picked.length < movable; i++) {
          const e = st[i]! - m;
          if (e > b) break;
          picked.push(i);
          if (b === e && st[picked[0]!] === m) {
            const set = picked.map((j) => order[j]!).sort((x, y) => x - y);
            const found = canonical(a, { fixed, columns: set }) ? withExtras(s, o, a, fixed, set) : null;
            if (found) yield found;
          }
          yield* sets(i + 1, b - e);
          picked.pop();
        }
      };
      yield* sets(first, excess);
    }
  }
}

/**
 * The reduced class holding exactly the columns `set` (sorted): EP ranks beyond |S| repeat
 * one column of S that starves fewest, the one giving a routing with the fewest rows.
 */
export function withExtras(s: Scenario, o: Observation, a: Alphabet, fixed: readonly number[], set: readonly number[]): { cls: ColumnClass; plan: Plan } | null {
  const extras = s.ep - o.fixedEpRanks.length - set.length;
  const least = Math.min(...set.map((c) => a.starved[c]!));
  let best: { cls: ColumnClass; plan: Plan } | null = null;
  for (const bulk of set.filter((c) => a.starved[c] === least)) {
    const cls = { fixed, columns: [...set, ...Array.from({ length: extras }, () => bulk)].sort((x, y) => x - y) };
    const p = plan(s, o, a, cls);
    if (p && (!best || p.rows < best.plan.rows)) best = { cls, plan: p };
  }
  return best;
}

/** The rank kinds a class's representative gives every rank, and what that costs. */
export interface Plan {
  readonly kinds: readonly RankKind[];
  readonly starved: readonly number[];
  readonly rows: number;
  /** Tokens each holder of dp group d holds (one capacity level per group). */
  readonly perHolder: readonly number[];
}

/** A class's concrete routing: the representative the engine runs. */
export interface Realized extends Plan {
  /** Per global rank, per micro-batch, per layer, the expert ids its tokens pick. */
  readonly explicit: number[][][][];
  readonly tokens: number;
  /** Per global rank and layer call, which of the racing pair it issues first (o.race), else null. */
  readonly firstReady: CollectiveOp[][] | null;
}

/**
 * Choose one rank kind per rank (the cheapest its letter allows), then repair each EP group:
 * rows reach experts only from a holder, and every token picks top_k distinct experts. Null
 * when no routing has these facts. Every holder of a group holds the same number of tokens
 * (one capacity level), the fewest that reach every used expert.
 */
export function plan(s: Scenario, o: Observation, a: Alphabet, cls: ColumnClass): Plan | null {
  const L = a.letters.length;
  const world: number[] = [];
  let next = 0;
  for (let e = 0; e < s.ep; e++) {
    const fi = o.fixedEpRanks.indexOf(e);
    world.push(fi >= 0 ? cls.fixed[fi]! : cls.columns[next++]!);
  }
  const kinds: RankKind[] = [];
  const perHolder: number[] = [];
  let rows = 0;
  for (let d = 0; d < s.dp; d++) {
    const options = world.map((code) => a.letters[letterOf(L, code, d)]!);
    const group = options.map((opts) => opts[0]!);
    const held = () => group.filter((k) => k.holdsTokens).length;
    const used = () => group.reduce((n, k) => n + k.usedExperts, 0);
    const same = (k: RankKind, e: number, h: boolean, u: number) => k.holdsTokens === h && k.usedExperts === u && k.schedule === group[e]!.schedule;
    if (used() > 0 && held() === 0) {
      // Someone must hold the tokens: the first rank whose letter allows it, keeping its reach.
      const e = options.findIndex((opts, i) => opts.some((k) => same(k, i, true, group[i]!.usedExperts)));
      if (e < 0) return null;
      group[e] = options[e]!.find((k) => same(k, e, true, group[e]!.usedExperts))!;
    }
    for (let e = 0; e < s.ep && held() > 0 && used() < s.topK; e++) {
      // Reach more experts, within what each rank's letter allows.
      const wider = options[e]!.filter((k) => k.holdsTokens === group[e]!.holdsTokens && k.schedule === group[e]!.schedule && k.usedExperts > group[e]!.usedExperts);
      const need = s.topK - used();
      const pick = wider.find((k) => k.usedExperts - group[e]!.usedExperts >= need) ?? wider.at(-1);
      if (pick) group[e] = pick;
    }
    const H = held();
    const U = used();
    if (H > 0 ? U < s.topK : U > 0) return null;
    perHolder.push(H > 0 ? Math.ceil(Math.ceil(U / s.topK) / H) : 0);
    rows += H * perHolder[d]! * s.topK;
    kinds.push(...group);
  }
  const starved = kinds.flatMap((k, g) => (k.usedExperts === 0 ? [g] : []));
  return { kinds, starved, rows, perHolder };
}

/** The plan as explicit routing: token t of a group picks top_k consecutive used experts from t·top_k. */
export function realize(s: Scenario, o: Observation, a: Alphabet, cls: ColumnClass): Realized | null {
  const p = plan(s, o, a, cls);
  if (!p) return null;
  const nLocal = s.experts / s.ep;
  const explicit: number[][][][] = [];
  for (let d = 0; d < s.dp; d++) {
    const group = p.kinds.slice(d * s.ep, (d + 1) * s.ep);
    const experts = group.flatMap((k, e) => Array.from({ length: k.usedExperts }, (_, i) => e * nLocal + i));
    let token = 0;
    for (const k of group) {
      const ids: number[] = [];
      // Consecutive picks are distinct (top_k <= used experts) and together reach every one.
      if (k.holdsTokens) for (let t = 0; t < p.perHolder[d]!; t++, token++) for (let i = 0; i < s.topK; i++) ids.push(experts[(token * s.topK + i) % experts.length]!);
      explicit.push(Array.from({ length: s.microBatches }, () => Array.from({ length: s.layers }, () => [...ids])));
    }
  }
  const race = o.race;
  const firstReady = race ? p.kinds.map((k) => Array.from({ length: race.calls }, (_, c) => race.ops[(k.schedule >> c) & 1 ? 0 : 1])) : null;
  return { ...p, explicit, tokens: Math.max(0, ...p.perHolder), firstReady };
}

/** The scenario that replays a realized class: explicit routing, its orders of the racing pair, and under uneven-batches the evaluation batches. */
export const replayScenario = (s: Scenario, o: Observation, r: Realized, evalBatches?: number): Scenario => ({
  ...s,
  routing: 'explicit',
  explicit: r.explicit,
  tokens: r.tokens,
  ...(o.race && r.firstReady ? { [o.race.field]: r.firstReady } : {}),
  ...(evalBatches !== undefined ? { evalBatches } : {}),
});
