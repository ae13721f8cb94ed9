import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { explore, mergeResults, UNEXPLORED_VARIANTS, type ExploreResult } from '../sim/explorer.js';
import { alphabet, classesAtLevel, realize, replayScenario, withExtras, type Alphabet, type ColumnClass } from '../sim/explore/classes.js';
import { observe, reducedKey, type Observation } from '../sim/explore/kinds.js';
import { simulateDes } from '../sim/des.js';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { worldSize } from '../machines/mesh.js';
import { VARIANT_NAMES as ALL_VARIANTS, type VariantName } from '../machines/variants.js';

// The cutoff is checked on the variants the explorer covers (it refuses the others).
const VARIANT_NAMES = ALL_VARIANTS.filter((v) => !UNEXPLORED_VARIANTS.includes(v));
import { WRAP_POLICIES } from '../machines/rankMachine.js';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cliPath } from './paths.js';
import { verdictOf } from './differential.js';

const cli = (args: string[], env: NodeJS.ProcessEnv = {}) =>
  spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8', timeout: 120_000, env: { ...process.env, ...env } });

/** A class's verdict: its representative's, under uneven-batches the first that is not ok over every evaluation batch count. */
function classVerdict(s: Scenario, o: Observation, a: Alphabet, cls: ColumnClass): string {
  const r = realize(s, o, a, cls)!;
  const verdicts = (o.evalBatches ?? [undefined]).map((n) => simulateDes(replayScenario(s, o, r, n)).diagnosis.verdict);
  return verdicts.find((v) => v !== 'ok') ?? 'ok';
}

/** Every class of the search, level by level, with its representative's verdict. */
function* everyClass(s: Scenario, o: Observation, a: Alphabet, reduced: boolean): Generator<{ cls: ColumnClass; verdict: string }> {
  for (let level = 0; level <= worldSize(s); level++) {
    for (const { cls } of classesAtLevel(s, o, a, reduced, level)) yield { cls, verdict: classVerdict(s, o, a, cls) };
  }
}

/** The reduced class of an exhaustive one: the set of observable columns it holds, extras repeating one of them. */
function reducedOf(s: Scenario, o: Observation, full: Alphabet, red: Alphabet, cls: ColumnClass): ColumnClass | undefined {
  const keys = red.letters.map((g) => reducedKey(o, g[0]!));
  const code = (c: number) => {
    let out = 0;
    for (let d = 0, x = c; d < s.dp; d++, x = Math.floor(x / full.letters.length)) out += keys.indexOf(reducedKey(o, full.letters[x % full.letters.length]![0]!)) * red.letters.length ** d;
    return out;
  };
  return withExtras(s, o, red, cls.fixed.map(code), [...new Set(cls.columns.map(code))].sort((x, y) => x - y))?.cls;
}

// Layouts for the cross-check: dp=1 up to ep=5, and dp=2 with FSDP under every wrap policy
// (packed and unpacked experts, so expertsWithGrads is seen as zero/non-zero and as a count).
const CROSS: Partial<Scenario>[] = [
  ...[2, 3, 4, 5].map((ep) => ({ ep, experts: 2 * ep, topK: 2, microBatches: 2 })),
  ...WRAP_POLICIES.flatMap((fsdp) => [true, false].map((packed) => ({ ep: 2, dp: 2, experts: 4, topK: 2, fsdp, packed }))),
];
// Which of them a variant runs on: wrong-group needs dp >= 2, uneven-batches micro-batches >= 2,
// and second-stream's 2^calls orders per rank make two layer calls too many for the exhaustive
// search at ep=5 (it gets layouts of its own below).
const runsOn = (l: Partial<Scenario>, v: VariantName) =>
  (v !== 'wrong-group' || (l.dp ?? 1) >= 2) && (v !== 'uneven-batches' || (l.microBatches ?? 1) >= 2) && (v !== 'second-stream' || (l.microBatches ?? 1) * (l.layers ?? 1) === 1);
// ep=3, dp=2 for the variants whose FSDP facts differ (completion order there is 142k classes);
// the issue-16 variants on layouts the ones above miss (dp=2 without FSDP, or with micro-batches).
const CROSS_ALL: (readonly [Partial<Scenario>, readonly VariantName[]])[] = [
  ...CROSS.map((l) => [l, VARIANT_NAMES.filter((v) => runsOn(l, v))] as const),
  [{ ep: 3, dp: 2, experts: 6, topK: 2, fsdp: 'experts', packed: false }, ['no-unused-expert-grads', 'no-dispatch-edge']],
  [{ ep: 3, experts: 6, topK: 2 }, ['second-stream', 'kernel-hang']],
  [{ ep: 3, dp: 2, experts: 6, topK: 2 }, ['wrong-group', 'kernel-hang']],
  [{ ep: 2, dp: 2, experts: 4, topK: 2, fsdp: 'block', microBatches: 2 }, ['uneven-batches', 'wrong-group']],
];

test('cutoff: every class of the exhaustive search has the verdict of its reduced class, for every variant and wrap policy', () => {
  let compared = 0;
  for (const [layout, variants] of CROSS_ALL) {
    for (const variant of variants) {
      const s = validateScenario({ ...layout, variant });
      const o = observe(s);
      const full = alphabet(s, o, false);
      const red = alphabet(s, o, true);
      const reducedVerdict = new Map<string, string>();
      let hangs = 0;
      for (const { cls, verdict } of everyClass(s, o, full, false)) {
        const rc = reducedOf(s, o, full, red, cls);
        assert.ok(rc, `${variant} ${JSON.stringify(layout)}: the reduced class of ${JSON.stringify(cls)} has no routing`);
        const key = JSON.stringify(rc);
        if (!reducedVerdict.has(key)) reducedVerdict.set(key, classVerdict(s, o, red, rc));
        assert.is(reducedVerdict.get(key) === 'ok', verdict === 'ok', `${variant} ${JSON.stringify(layout)}: class ${JSON.stringify(cls)} is ${verdict}, its reduced class ${reducedVerdict.get(key)}`);
        if (verdict !== 'ok') hangs++;
        compared++;
      }
      // The search itself: same verdict, and a counterexample as short, with and without the cutoff.
      const [a, b] = [explore(s), explore(s, { reduce: false })];
      assert.is(a.verdict, b.verdict, `${variant} ${JSON.stringify(layout)}`);
      assert.is(b.verdict === 'proved', hangs === 0);
      if (b.counterexample) {
        assert.is(a.counterexample!.starvedRanks.length, b.counterexample.starvedRanks.length, `${variant} ${JSON.stringify(layout)}: starved`);
        assert.ok(a.counterexample!.rows >= b.counterexample.rows, `${variant} ${JSON.stringify(layout)}: rows`);
      }
    }
  }
  assert.ok(compared > 5000, `${compared} classes compared`);
});

test('a class holding fewer kinds passes where one holding more passes (the one-class proof rests on it)', () => {
  let pairs = 0;
  // Plus ep=4, dp=2, where one class can hold every column kind of the seed (2 x 2 kinds).
  const wide = (['block', 'experts'] as const).map((fsdp) => [{ ep: 4, dp: 2, experts: 8, topK: 2, fsdp, packed: false }, VARIANT_NAMES.filter((v) => v !== 'completion-order' && v !== 'second-stream' && runsOn({ dp: 2 }, v))] as const);
  for (const [layout, variants] of [...CROSS_ALL, ...wide]) {
    for (const variant of variants) {
      const s = validateScenario({ ...layout, variant });
      const o = observe(s);
      const red = alphabet(s, o, true);
      const classes = [...everyClass(s, o, red, true)].map(({ cls, verdict }) => ({ fixed: cls.fixed.join(), set: new Set(cls.columns), verdict }));
      for (const big of classes.filter((c) => c.verdict === 'ok')) {
        for (const small of classes) {
          if (small === big || small.fixed !== big.fixed || ![...small.set].every((c) => big.set.has(c))) continue;
          assert.is(small.verdict, 'ok', `${variant} ${JSON.stringify(layout)}: {${[...small.set]}} hangs inside {${[...big.set]}}, which passes`);
          pairs++;
        }
      }
    }
  }
  assert.ok(pairs > 100, `${pairs} pairs`);
});

test('the cutoff search finds hazards the exhaustive one finds (some variants hang, some prove) in the cross-check layouts', () => {
  const verdicts = new Set(VARIANT_NAMES.filter((v) => runsOn(CROSS.at(-1)!, v)).map((variant) => explore(validateScenario({ ...CROSS.at(-1)!, variant })).verdict));
  assert.equal([...verdicts].sort(), ['counterexample', 'proved']);
});

test('classes by construction are exactly the orbits of raw per-rank assignments under rank and dp-group permutations', () => {
  // Brute force: every assignment of (holds tokens, local experts reached) to every rank,
  // feasible when a group with tokens reaches at least top_k experts and one without reaches none.
  const perms = (n: number): number[][] => (n === 0 ? [[]] : perms(n - 1).flatMap((p) => Array.from({ length: n }, (_, i) => [...p.slice(0, i), n - 1, ...p.slice(i)])));
  for (const layout of [{ ep: 4, experts: 8, topK: 2 }, { ep: 2, dp: 2, experts: 4, topK: 2, fsdp: 'block' as const }, { ep: 3, experts: 6, topK: 3, variant: 'early-exit' as const }]) {
    const s = validateScenario(layout);
    const nLocal = s.experts / s.ep;
    const radix = 2 * (nLocal + 1);
    const n = worldSize(s);
    const fixed = observe(s).fixedEpRanks;
    const epPerms = perms(s.ep).filter((p) => fixed.every((e) => p[e] === e));
    const orbits = new Set<string>();
    for (let x = 0; x < radix ** n; x++) {
      const digits = Array.from({ length: n }, (_, g) => Math.floor(x / radix ** g) % radix);
      const feasible = Array.from({ length: s.dp }, (_, d) => digits.slice(d * s.ep, (d + 1) * s.ep)).every((grp) => {
        const held = grp.some((k) => k > nLocal);
        const used = grp.reduce((u, k) => u + (k % (nLocal + 1)), 0);
        return held ? used >= s.topK : used === 0;
      });
      if (!feasible) continue;
      let least = '';
      for (const pd of perms(s.dp)) for (const pe of epPerms) {
        const image = Array.from({ length: n }, (_, g) => digits[pd[Math.floor(g / s.ep)]! * s.ep + pe[g % s.ep]!]!).join(',');
        if (!least || image < least) least = image;
      }
      orbits.add(least);
    }
    const r = explore(s, { reduce: false });
    assert.is(r.verdict, 'proved', JSON.stringify(layout));
    assert.is(r.classesRun, orbits.size, JSON.stringify(layout));
  }
});

test('seed at ep=64, 256 experts, top-8 is proved by one class holding every kind', () => {
  const r = explore(validateScenario({ ep: 64, experts: 256, topK: 8 }));
  assert.is(r.verdict, 'proved');
  assert.ok(r.reduction.everyKindAtOnce);
  assert.is(r.classesRun, 1);
});

test('no-dispatch-edge: the shortest counterexample starves exactly one rank, and replays', () => {
  for (const layout of [{ ep: 4, experts: 8, topK: 2 }, { ep: 12, experts: 24, topK: 2 }, { ep: 64, experts: 256, topK: 8 }]) {
    const r = explore(validateScenario({ ...layout, variant: 'no-dispatch-edge' }));
    assert.is(r.verdict, 'counterexample');
    const c = r.counterexample!;
    assert.is(c.starvedRanks.length, 1);
    assert.equal(c.diagnosis.culprits, c.starvedRanks);
    assert.is(c.diagnosis.verdict, 'missing');
    // The scenario written by --replay reproduces it, through JSON and validation.
    const replay = validateScenario(JSON.parse(JSON.stringify(c.scenario)));
    assert.is(replay.routing, 'explicit');
    const again = simulateDes(replay).diagnosis;
    assert.is(again.verdict, 'missing');
    assert.equal(again.culprits, c.starvedRanks);
  }
});

test('check --replay writes a scenario that sim reproduces on both engines', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-check-'));
  const file = join(dir, 'replay.json');
  const check = cli(['check', '--ep', '4', '--experts', '8', '--top-k', '2', '--variant', 'no-dispatch-edge', '--replay', file, '--json']);
  assert.is(check.status, 2, check.stderr);
  for (const engine of ['actors', 'des']) {
    const sim = cli(['sim', '--scenario', file, '--engine', engine, '--json']);
    assert.is(sim.status, 2, `${engine}: ${sim.stderr}`);
    const d = JSON.parse(sim.stdout);
    assert.is(d.verdict, 'missing', engine);
    assert.is(d.culprits.length, 1, engine);
  }
});

test('skip-empty-sends: shortest counterexample has no starved rank, one rank holding tokens', () => {
  const c = explore(validateScenario({ ep: 4, experts: 8, topK: 2, variant: 'skip-empty-sends' })).counterexample!;
  assert.is(c.starvedRanks.length, 0);
  assert.is(c.ranks.filter((k) => k.holdsTokens).length, 1);
});

test('completion-order: orders explored as kinds, the crossing order found and replayed with its orders by sim', () => {
  const r = explore(validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'experts', variant: 'completion-order' }));
  assert.is(r.verdict, 'counterexample');
  const c = r.counterexample!;
  assert.is(c.diagnosis.verdict, 'cycle');
  assert.ok(c.firstReady && new Set(c.firstReady.flat()).size === 2);
  const file = join(mkdtempSync(join(tmpdir(), 'ep-check-')), 'order.json');
  writeFileSync(file, JSON.stringify(c.scenario));
  const sim = cli(['sim', '--scenario', file, '--engine', 'des', '--json']);
  assert.is(JSON.parse(sim.stdout).verdict, 'cycle', sim.stderr);
  assert.is(explore(validateScenario({ ep: 2, dp: 2, experts: 4, fsdp: 'experts' })).verdict, 'proved');
});

test('early-exit keeps its distinguished rank apart: it is the culprit', () => {
  const r = explore(validateScenario({ ep: 4, experts: 8, microBatches: 2, variant: 'early-exit' }));
  assert.equal(r.reduction.observed, ['that it is EP rank 3 (early-exit)']);
  assert.is(r.counterexample!.diagnosis.culprits[0], 3);
});

test('per-rank classes lose nothing: every zero/non-zero pattern of rows per (source, destination) pair agrees with the explorer', () => {
  // ep=3, 2 experts per rank, top-1: a non-zero pair (s, d) sends one token from s to
  // expert (s + d) mod 2 of rank d. 2^9 patterns cover every pair-level routing class.
  const ep = 3;
  const base = { ep, experts: 2 * ep, topK: 1 };
  for (const variant of ['seed', 'no-dispatch-edge', 'skip-empty-sends', 'local-capacity'] as const) {
    let pairHangs = 0;
    for (let mask = 0; mask < 1 << (ep * ep); mask++) {
      const explicit = Array.from({ length: ep }, (_, s) => {
        const ids: number[] = [];
        for (let d = 0; d < ep; d++) if (mask & (1 << (s * ep + d))) ids.push(2 * d + ((s + d) % 2));
        return [[ids]];
      });
      const tokens = Math.max(...explicit.map((r) => r[0]![0]!.length));
      const verdict = simulateDes(validateScenario({ ...base, variant, tokens, routing: 'explicit', explicit })).diagnosis.verdict;
      if (verdict !== 'ok') pairHangs++;
    }
    const r = explore(validateScenario({ ...base, variant }));
    assert.is(r.verdict === 'proved', pairHangs === 0, `${variant}: explorer ${r.verdict}, ${pairHangs} of 512 pair patterns hang`);
  }
});

test('top-k >= E - n_local + 1 under FSDP: no-dispatch-edge is proved, and every concrete routing agrees; at top-2 both find the hang', () => {
  // ep=2, dp=2, 4 experts: each rank routes zero or one token to any top_k of the 4 experts.
  const subsets = (k: number) => Array.from({ length: 16 }, (_, m) => m).filter((m) => m.toString(2).split('1').length - 1 === k);
  for (const fsdp of WRAP_POLICIES) {
    for (const topK of [3, 2]) {
      const base = { ep: 2, dp: 2, experts: 4, topK, fsdp, variant: 'no-dispatch-edge' as const };
      const choices = [null, ...subsets(topK)];
      let hangs = 0;
      for (let x = 0; x < choices.length ** 4; x++) {
        const explicit = Array.from({ length: 4 }, (_, g) => {
          const m = choices[Math.floor(x / choices.length ** g) % choices.length];
          return [[m === null ? [] : [0, 1, 2, 3].filter((e) => m & (1 << e))]];
        });
        if (simulateDes(validateScenario({ ...base, tokens: 1, routing: 'explicit', explicit })).diagnosis.verdict !== 'ok') hangs++;
      }
      const r = explore(validateScenario(base));
      assert.is(r.verdict, topK === 3 ? 'proved' : 'counterexample', `${fsdp} top-${topK}`);
      assert.is(hangs === 0, r.verdict === 'proved', `${fsdp} top-${topK}: ${hangs} concrete routings hang, explorer ${r.verdict}`);
    }
  }
});

test('shards split the search and merge into the unsharded answer', () => {
  for (const variant of ['seed', 'no-dispatch-edge'] as const) {
    const s = validateScenario({ ep: 4, experts: 8, topK: 2, variant });
    const whole = explore(s, { reduce: false });
    const parts: ExploreResult[] = [0, 1, 2].map((index) => explore(s, { reduce: false, shard: { index, count: 3 } }));
    const m = mergeResults(JSON.parse(JSON.stringify(parts)));
    assert.is(m.verdict, whole.verdict, variant);
    if (whole.counterexample) {
      assert.equal(m.counterexample!.key, whole.counterexample.key);
      assert.ok(m.shortest);
    } else {
      assert.is(m.classesRun, whole.classesRun);
    }
    assert.throws(() => mergeResults(parts.slice(1)), /shard 0\/3 missing/);
    assert.throws(() => mergeResults([parts[0]!, parts[0]!, parts[1]!]), /given twice/);
  }
});

test('check --shard (and a Slurm array task) writes results that check --merge joins; --replay from the merge replays', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-check-'));
  const flags = ['check', '--ep', '4', '--experts', '8', '--top-k', '2', '--variant', 'no-dispatch-edge', '--exhaustive', '--json'];
  const files = [0, 1].map((i) => {
    const run = i === 0 ? cli([...flags, '--shard', '0/2']) : cli(flags, { SLURM_ARRAY_TASK_ID: '2', SLURM_ARRAY_TASK_MIN: '1', SLURM_ARRAY_TASK_COUNT: '2' });
    assert.ok(run.status === 0 || run.status === 2, run.stderr);
    const file = join(dir, `part${i}.json`);
    writeFileSync(file, run.stdout);
    assert.is(JSON.parse(run.stdout).shard.index, i);
    return file;
  });
  const replay = join(dir, 'replay.json');
  const merged = cli(['check', '--merge', ...files, '--replay', replay]);
  assert.is(merged.status, 2, merged.stderr);
  assert.match(merged.stdout, /merged 2 shard/);
  assert.is(simulateDes(validateScenario(JSON.parse(spawnSync('cat', [replay], { encoding: 'utf8' }).stdout))).diagnosis.verdict, 'missing');
  const bad = cli(['check', '--merge', files[0]!]);
  assert.is(bad.status, 1);
  assert.match(bad.stderr, /shard 1\/2 missing/);
});

test('past the limits: one line, exit 1, no V8 fatal error', () => {
  const cases: [string[], RegExp][] = [
    [['--ep', '64', '--experts', '256', '--top-k', '8', '--exhaustive', '--max-classes', '20000'], /starved level 0 alone holds more than --max-classes/],
    [['--ep', '4', '--experts', '8', '--exhaustive', '--max-classes', '40'], /--max-classes 40 reached; split the run with --shard/],
    [['--ep', '2', '--dp', '7', '--experts', '4'], /at most dp=6/],
    [['--ep', '2', '--dp', '2', '--fsdp', '--wrap', 'experts', '--layers', '5', '--variant', 'completion-order', '--experts', '4'], /at most 4 layer calls/],
    [['--ep', '4', '--shard', '4/4'], /--shard must be I\/N/],
    [['--ep', '65536', '--experts', '65536', '--top-k', '1'], /up to 4096 ranks/],
  ];
  for (const [args, line] of cases) {
    const r = cli(['check', ...args]);
    assert.is(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, line);
    assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
  }
  // A heap too small for one level's classes: stopped by the guard, not by V8.
  const r = cli(['check', '--ep', '16', '--experts', '64', '--top-k', '2', '--exhaustive', '--max-classes', '100000000'], { NODE_OPTIONS: '--max-old-space-size=64' });
  assert.is(r.status, 1, r.stderr);
  assert.match(r.stderr, /the heap is nearly full; give node more heap/);
  assert.not.match(r.stderr, /FATAL|heap out of memory/);
});

test('every variant is explored (proved or a counterexample) unless the explorer refuses it, in one line; so are pipelines', () => {
  for (const variant of ALL_VARIANTS) {
    // stage-metric needs two pipeline stages.
    const pp = variant === 'stage-metric' ? ['--pp', '2'] : [];
    const r = cli(['check', '--ep', '4', '--dp', '2', ...pp, '--experts', '8', '--micro-batches', '2', '--variant', variant]);
    if (UNEXPLORED_VARIANTS.includes(variant)) {
      assert.is(r.status, 1, `${variant}: ${r.stdout}`);
      assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.match(r.stderr, new RegExp(`check does not explore variant ${variant} yet`));
    } else {
      assert.ok(r.status === 0 || r.status === 2, `${variant}: exit ${r.status}: ${r.stderr}`);
      assert.match(r.stdout, /^(proved|counterexample)/, variant);
    }
  }
  const pipeline = cli(['check', '--ep', '4', '--pp', '2', '--experts', '8']);
  assert.is(pipeline.status, 1, pipeline.stdout);
  assert.is(pipeline.stderr.trim().split('\n').length, 1, pipeline.stderr);
  assert.match(pipeline.stderr, /check does not explore pipeline stages yet \(pp=2\)/);
});

// Issue 16's classes against brute force: every concrete routing of a tiny layout (each rank
// holds 0..maxTokens tokens, each picking top_k distinct experts, every layer and micro-batch
// routed alike, as the explorer routes them) times every value of the variant's own
// dimension, run through the engine. The explorer's counterexample must sit at the least
// (starved ranks, rows) of the hanging ones, and the seed must hang nowhere in that space.

const combinations = (n: number, k: number): number[][] =>
  k === 0 ? [[]] : combinations(n, k - 1).flatMap((c) => Array.from({ length: n - (c.at(-1) ?? -1) - 1 }, (_, i) => [...c, (c.at(-1) ?? -1) + 1 + i]));

/** Multisets of `size` of 0..n-1, each sorted. */
const multisets = (n: number, size: number): number[][] =>
  size === 0 ? [[]] : multisets(n, size - 1).flatMap((m) => Array.from({ length: n - (m.at(-1) ?? 0) }, (_, i) => [...m, (m.at(-1) ?? 0) + i]));

/** Every concrete routing of the layout, with the variant's dimension `extras` crossed in. */
function* concrete(base: Partial<Scenario>, maxTokens: number, extras: readonly Partial<Scenario>[]): Generator<{ scenario: Scenario; starved: number; rows: number; extra: Partial<Scenario> }> {
  const s = validateScenario(base);
  const picks = combinations(s.experts, s.topK);
  const options = Array.from({ length: maxTokens + 1 }, (_, t) => multisets(picks.length, t).map((m) => m.flatMap((i) => picks[i]!))).flat();
  const world = worldSize(s);
  const nLocal = s.experts / s.ep;
  for (let x = 0; x < options.length ** world; x++) {
    const ids = Array.from({ length: world }, (_, g) => options[Math.floor(x / options.length ** g) % options.length]!);
    let starved = 0;
    for (let g = 0; g < world; g++) {
      const group = ids.slice(Math.floor(g / s.ep) * s.ep, Math.floor(g / s.ep) * s.ep + s.ep).flat();
      if (!group.some((e) => Math.floor(e / nLocal) === g % s.ep)) starved++;
    }
    const explicit = ids.map((r) => Array.from({ length: s.microBatches }, () => Array.from({ length: s.layers }, () => [...r])));
    const tokens = Math.max(...ids.map((r) => r.length / s.topK));
    for (const extra of extras) yield { scenario: validateScenario({ ...base, ...extra, routing: 'explicit', explicit, tokens }), starved, rows: ids.flat().length, extra };
  }
}

/** The least (starved, rows) of the hanging concrete runs and those runs, or null when none hangs. */
function bruteShortest(base: Partial<Scenario>, maxTokens: number, extras: readonly Partial<Scenario>[]) {
  let best: { starved: number; rows: number; runs: Partial<Scenario>[] } | null = null;
  let runs = 0;
  for (const c of concrete(base, maxTokens, extras)) {
    runs++;
    if (best && (c.starved > best.starved || (c.starved === best.starved && c.rows > best.rows))) continue;
    if (simulateDes(c.scenario).diagnosis.verdict === 'ok') continue;
    if (!best || c.starved < best.starved || c.rows < best.rows) best = { starved: c.starved, rows: c.rows, runs: [] };
    best.runs.push(c.extra);
  }
  return { best, runs };
}

/** Every table of per-rank, per-layer-call orders of the shared all-gather and fwd.combine. */
const streamOrders = (world: number, calls: number): Partial<Scenario>[] =>
  Array.from({ length: 2 ** (world * calls) }, (_, m) => ({
    streamOrder: Array.from({ length: world }, (_, g) => Array.from({ length: calls }, (_, c) => ((m >> (g * calls + c)) & 1 ? 'shared.all_gather' : 'fwd.combine'))),
  }));

interface Issue16Case {
  readonly layout: Partial<Scenario>;
  readonly maxTokens: number;
  /** The variant's own dimension, as scenario fields the brute force crosses in. */
  readonly extras: readonly Partial<Scenario>[];
  /** The explorer's finding, or 'ok' where it must prove the layout. */
  readonly verdict: string;
}

const ISSUE16: Record<'kernel-hang' | 'wrong-group' | 'uneven-batches' | 'second-stream', readonly Issue16Case[]> = {
  // Two local experts: one without rows stalls with no rank starved; one expert: only a starved rank stalls.
  'kernel-hang': [
    { layout: { ep: 2, experts: 4, topK: 1 }, maxTokens: 2, extras: [{}], verdict: 'stall' },
    { layout: { ep: 2, experts: 2, topK: 1 }, maxTokens: 2, extras: [{}], verdict: 'stall' },
  ],
  // Which EP rank gathers on the dp communicator; ep=1 has no EP peer to miss it.
  'wrong-group': [
    { layout: { ep: 2, dp: 2, experts: 2, topK: 1 }, maxTokens: 1, extras: [{ wrongGroupRank: 0 }, { wrongGroupRank: 1 }], verdict: 'missing' },
    { layout: { ep: 1, dp: 2, experts: 2, topK: 1 }, maxTokens: 2, extras: [{ wrongGroupRank: 0 }], verdict: 'ok' },
  ],
  // Every evaluation batch count; with EP groups of one rank and no FSDP no communicator spans unequal shards.
  'uneven-batches': [
    { layout: { ep: 2, dp: 2, experts: 2, topK: 1, microBatches: 2 }, maxTokens: 1, extras: [4, 5, 6, 7, 8].map((evalBatches) => ({ evalBatches })), verdict: 'missing' },
    { layout: { ep: 1, dp: 2, experts: 2, topK: 1, microBatches: 2 }, maxTokens: 1, extras: [2, 3, 4].map((evalBatches) => ({ evalBatches })), verdict: 'ok' },
  ],
  // Every per-rank order of the shared all-gather and fwd.combine, at one and at two layer calls.
  'second-stream': [
    { layout: { ep: 2, dp: 2, experts: 2, topK: 1 }, maxTokens: 1, extras: streamOrders(4, 1), verdict: 'mismatch' },
    { layout: { ep: 2, experts: 4, topK: 2, layers: 2 }, maxTokens: 1, extras: streamOrders(2, 2), verdict: 'mismatch' },
  ],
};

for (const [variant, cases] of Object.entries(ISSUE16)) {
  test(`${variant}: check's counterexample is the shortest brute force finds over every routing and ${variant === 'kernel-hang' ? 'expert' : 'the variant\'s own dimension'}; the seed is proved at the same layout`, () => {
    for (const { layout, maxTokens, extras, verdict } of cases) {
      const where = `${variant} ${JSON.stringify(layout)}`;
      const base = { ...layout, variant: variant as VariantName };
      const r = explore(validateScenario(base));
      const brute = bruteShortest(base, maxTokens, extras);
      assert.ok(brute.runs >= 16, `${where}: ${brute.runs} runs`);
      if (verdict === 'ok') {
        assert.is(r.verdict, 'proved', where);
        assert.is(brute.best, null, `${where}: brute force hangs at ${JSON.stringify(brute.best)}`);
      } else {
        assert.is(r.verdict, 'counterexample', where);
        const c = r.counterexample!;
        assert.is(c.diagnosis.verdict, verdict, `${where}: ${c.diagnosis.cause}`);
        assert.ok(brute.best, `${where}: brute force finds no hang`);
        assert.equal([c.key[0], c.key[1]], [brute.best!.starved, brute.best!.rows], `${where}: explorer (starved, rows) vs brute force`);
        assert.is(c.starvedRanks.length, c.key[0]);
        if (variant === 'uneven-batches') assert.is(c.evalBatches, Math.min(...brute.best!.runs.map((e) => e.evalBatches!)), `${where}: fewest evaluation batches`);
        // What check writes with --replay reproduces it, through JSON and validation.
        assert.equal(verdictOf(simulateDes(validateScenario(JSON.parse(JSON.stringify(c.scenario)))).diagnosis), verdictOf(c.diagnosis), where);
      }
      const seed = { ...layout, variant: 'seed' as const };
      assert.is(explore(validateScenario(seed)).verdict, 'proved', `seed ${JSON.stringify(layout)}`);
      assert.is(bruteShortest(seed, maxTokens, [{}]).best, null, `seed ${JSON.stringify(layout)} hangs somewhere`);
    }
  });
}

test('wrong-group: which EP rank gathers on the other communicator changes nothing but the culprit (one rank covers every choice)', () => {
  const keys = [0, 1, 2, 3].map((w) => {
    const c = explore(validateScenario({ ep: 4, dp: 2, experts: 8, variant: 'wrong-group', wrongGroupRank: w })).counterexample!;
    assert.equal([...c.diagnosis.culprits], [w]);
    return c.key.slice(0, 2);
  });
  for (const k of keys) assert.equal(k, keys[0]);
});

test('uneven-batches: the counterexample names the fewest evaluation batches that hang; a count that splits no communicator passes', () => {
  // ep=2, dp=2: 6 batches give each EP group equal shards (ok without FSDP), not each dp group.
  const plain = explore(validateScenario({ ep: 2, dp: 2, experts: 4, microBatches: 2, variant: 'uneven-batches' }));
  assert.is(plain.counterexample!.evalBatches, 5);
  const sixOk = simulateDes(validateScenario({ ep: 2, dp: 2, experts: 4, microBatches: 2, variant: 'uneven-batches', evalBatches: 6 })).diagnosis.verdict;
  assert.is(sixOk, 'ok');
  // With FSDP the dp communicator spans the two EP groups' unequal shards.
  const fsdp = explore(validateScenario({ ep: 2, dp: 2, experts: 4, microBatches: 2, fsdp: 'block', variant: 'uneven-batches' }));
  assert.is(fsdp.counterexample!.evalBatches, 5);
  // EP groups of one rank, no FSDP: no communicator spans two shards. Every class ran every count, 3 to 9.
  const proof = explore(validateScenario({ ep: 1, dp: 3, experts: 2, topK: 1, microBatches: 3, variant: 'uneven-batches' }));
  assert.is(proof.verdict, 'proved');
  assert.ok(proof.classesRun > 0 && proof.classesRun % 7 === 0, `${proof.classesRun} runs`);
});

test('check --replay of each issue-16 counterexample: sim reproduces it on des and on worker ranks; a stall is reported as a stall', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-check-'));
  const layouts: Record<keyof typeof ISSUE16, string[]> = {
    'kernel-hang': ['--ep', '4', '--experts', '8', '--top-k', '2'],
    'wrong-group': ['--ep', '4', '--dp', '2', '--experts', '8'],
    'uneven-batches': ['--ep', '2', '--dp', '2', '--experts', '4', '--micro-batches', '3'],
    'second-stream': ['--ep', '4', '--experts', '8', '--layers', '2'],
  };
  for (const [variant, flags] of Object.entries(layouts)) {
    const file = join(dir, `${variant}.json`);
    const check = cli(['check', ...flags, '--variant', variant, '--replay', file]);
    assert.is(check.status, 2, `${variant}: ${check.stderr}`);
    assert.match(check.stdout, new RegExp(`wrote ${file}`));
    const headline = check.stdout.split('\n')[0]!;
    if (variant === 'kernel-hang') assert.match(headline, /^counterexample: a stall in compute \(rank.*\), not a collective mismatch/);
    else assert.match(headline, /^counterexample: a hang in the collectives \((missing|mismatch)\)/);
    const expected = verdictOf(simulateDes(validateScenario(JSON.parse(readFileSync(file, 'utf8')))).diagnosis);
    assert.is(expected.verdict, variant === 'kernel-hang' ? 'stall' : variant === 'second-stream' ? 'mismatch' : 'missing', variant);
    for (const engine of ['des', 'actors']) {
      const sim = cli(['sim', '--scenario', file, '--engine', engine, '--json', ...(engine === 'actors' ? ['--compute-timeout', '3000'] : [])]);
      assert.is(sim.status, 2, `${variant} ${engine}: ${sim.stderr}`);
      const d = JSON.parse(sim.stdout);
      assert.equal({ verdict: d.verdict, communicator: d.communicator, position: d.position, culprits: d.culprits }, { verdict: expected.verdict, communicator: expected.communicator, position: expected.position, culprits: expected.culprits }, `${variant} ${engine}: ${d.cause}`);
    }
    const seed = cli(['check', ...flags, '--variant', 'seed']);
    assert.is(seed.status, 0, `seed at the ${variant} layout: ${seed.stdout}`);
  }
});

test.run();
