// Sweeps: many scenarios from one spec (a grid, random samples, or both), split into
// shards for batch schedulers, run over a piscina pool of discrete-event engines.
//
// Spec (JSON): {
//   "base":    { ...scenario fields },                 every scenario starts from these
//   "grid":    { "field": [v1, v2, ...], ... },        the cartesian product of the lists
//   "samples": { "count": N, "seed": S, "fields": { "field": [v1, v2, ...] } }
//                                                      N scenarios, each field drawn from its list
// }
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import { UsageError } from '../src/errors.js';
import { seededRng } from '../src/moe/random.js';
import type { VerdictKind } from '../machines/diagnosis.js';
import { checkKeys, SCENARIO_FIELDS, validateScenario, type Scenario } from '../machines/scenario.js';

type Values = Record<string, readonly unknown[]>;

export interface SweepSpec {
  base?: Partial<Scenario>;
  grid?: Values;
  samples?: { count: number; seed?: number; fields: Values };
}

export interface SweepResult {
  readonly index: number;
  readonly scenario: Scenario;
  readonly verdict: VerdictKind;
  readonly communicator: string | null;
  readonly position: number | null;
  readonly culprits: number[];
  readonly cause: string;
  readonly collectives: number;
  readonly simulatedMs: number;
}

function checkValues(where: string, v: unknown): Values {
  if (v === undefined) return {};
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new UsageError(`sweep spec: ${where} must be an object of field → list of values`);
  checkKeys(v, SCENARIO_FIELDS, `sweep spec: ${where}: `);
  for (const [k, list] of Object.entries(v)) {
    if (!Array.isArray(list) || list.length === 0) throw new UsageError(`sweep spec: ${where}.${k} must be a non-empty list, got ${JSON.stringify(list)}`);
  }
  return v as Values;
}

/** Every scenario of the spec, validated, in a fixed order (grid first, then samples). */
export function expandSweep(spec: SweepSpec): Scenario[] {
  if (typeof spec !== 'object' || spec === null || Array.isArray(spec)) throw new UsageError('sweep spec: not a JSON object');
  checkKeys(spec, ['base', 'grid', 'samples'], 'sweep spec: ');
  if (spec.base !== undefined) {
    if (typeof spec.base !== 'object' || spec.base === null || Array.isArray(spec.base)) throw new UsageError('sweep spec: base must be an object of scenario fields');
    checkKeys(spec.base, SCENARIO_FIELDS, 'sweep spec: base: ');
  }
  if (spec.samples !== undefined) checkKeys(spec.samples, ['count', 'seed', 'fields'], 'sweep spec: samples: ');
  const grid = checkValues('grid', spec.grid);
  const out: Partial<Scenario>[] = [];
  let combos: Record<string, unknown>[] = [{}];
  for (const [k, list] of Object.entries(grid)) combos = combos.flatMap((c) => list.map((v) => ({ ...c, [k]: v })));
  if (spec.grid) out.push(...combos.map((c) => ({ ...spec.base, ...c })));
  if (spec.samples) {
    const { count, seed = 1 } = spec.samples;
    if (!Number.isSafeInteger(count) || count < 1) throw new UsageError(`sweep spec: samples.count must be a positive integer, got ${count}`);
    const fields = checkValues('samples.fields', spec.samples.fields);
    const rand = seededRng(seed);
    for (let i = 0; i < count; i++) {
      const drawn = Object.fromEntries(Object.entries(fields).map(([k, list]) => [k, list[Math.floor(rand() * list.length)]]));
      out.push({ ...spec.base, ...drawn });
    }
  }
  if (out.length === 0) throw new UsageError('sweep spec: give a "grid", "samples" or both');
  return out.map((p, i) => {
    try {
      return validateScenario(p);
    } catch (e) {
      throw new UsageError(`sweep spec: scenario ${i} (${JSON.stringify(p)}): ${(e as Error).message}`);
    }
  });
}

/** Parse `I/N` (0 <= I < N): this machine runs the scenarios whose index is I modulo N. */
export function parseShard(spec: string): { index: number; count: number } {
  const m = /^(\d+)\/(\d+)$/.exec(spec);
  const [index, count] = m ? [Number(m[1]), Number(m[2])] : [NaN, NaN];
  if (!(count >= 1 && index >= 0 && index < count)) throw new UsageError(`--shard must be I/N with 0 <= I < N (e.g. 0/4), got '${spec}'`);
  return { index, count };
}

/**
 * The shard of this Slurm array task: task k of the array (k = (ID - MIN) / STEP, counting
 * from 0 whatever the array's first id) is shard k/COUNT. SLURM_ARRAY_TASK_MIN and _STEP
 * default to 0 and 1. An array that is not one evenly spaced range (--array=1,3,7) has no
 * such k, and is refused like a missing or inconsistent variable: one line, naming it.
 */
export function slurmArrayShard(env: NodeJS.ProcessEnv, flag: string): { index: number; count: number } {
  const read = (name: string, fallback?: number): number => {
    const v = env[`SLURM_ARRAY_TASK_${name}`];
    if (v === undefined && fallback !== undefined) return fallback;
    if (v === undefined) throw new UsageError(`${flag} reads the Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) and SLURM_ARRAY_TASK_${name} is not set: run it as a task of sbatch --array=0-(N-1), or give --shard I/N`);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(Number(v))) throw new UsageError(`${flag}: SLURM_ARRAY_TASK_${name}='${v}' is not a whole number`);
    return Number(v);
  };
  const [id, count, min, step] = [read('ID'), read('COUNT'), read('MIN', 0), read('STEP', 1)];
  const max = env.SLURM_ARRAY_TASK_MAX === undefined ? undefined : read('MAX');
  const array = `SLURM_ARRAY_TASK_ID=${id}, _MIN=${min}, _STEP=${step}, _COUNT=${count}${max === undefined ? '' : `, _MAX=${max}`}`;
  if (count < 1 || step < 1) throw new UsageError(`${flag}: ${array}: the count and step must be at least 1`);
  if (max !== undefined && max !== min + (count - 1) * step) throw new UsageError(`${flag}: ${array}: the array is not one evenly spaced range (a list such as --array=1,3,7?); give --shard I/N`);
  const k = (id - min) / step;
  if (!Number.isInteger(k) || k < 0 || k >= count) throw new UsageError(`${flag}: ${array}: the task id is not one of the array's ${count} ids (MIN + k*STEP for k in 0..${count - 1})`);
  return { index: k, count };
}

export const inShard = (i: number, shard: { index: number; count: number }) => i % shard.count === shard.index;

/** Run `scenarios` (indices kept) over `workers` threads; results arrive in completion order. */
export async function runSweep(
  scenarios: readonly { index: number; scenario: Scenario }[],
  opts: { workers?: number; onResult?: (r: SweepResult) => void } = {},
): Promise<SweepResult[]> {
  const threads = opts.workers ?? availableParallelism();
  const pool = new Piscina({ filename: new URL('./sweepWorker.js', import.meta.url).href, minThreads: threads, maxThreads: threads });
  try {
    return await Promise.all(
      scenarios.map(async (job) => {
        const r = (await pool.run(job)) as SweepResult;
        opts.onResult?.(r);
        return r;
      }),
    );
  } finally {
    await pool.destroy();
  }
}

/** Verdict counts, as table rows: verdict, count, share. */
export function summarize(results: readonly SweepResult[]): string {
  const counts = new Map<string, number>();
  for (const r of results) counts.set(r.verdict, (counts.get(r.verdict) ?? 0) + 1);
  const rows = [...counts].sort((a, b) => b[1] - a[1]);
  const lines = rows.map(([v, n]) => `${v.padEnd(9)} ${String(n).padStart(7)}  ${((100 * n) / Math.max(results.length, 1)).toFixed(1).padStart(5)}%`);
  return ['verdict     count  share', ...lines, `${'total'.padEnd(9)} ${String(results.length).padStart(7)}`].join('\n');
}
