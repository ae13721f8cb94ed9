// Benchmark plumbing shared by every benchmark module under test/bench/. A module exports
// `bench(): Promise<BenchRow[]>`; test/bench/index.ts runs them and prints one table.
// Timings are medians over repeated runs; ratios compare against a baseline measured in
// the same run, because this machine is shared and noisy.
import { spawnSync } from 'node:child_process';
import { performance } from 'node:perf_hooks';

export interface BenchRow {
  /** What was measured, e.g. 'EP step fwd+bwd (ts, ep=4 T=1024 D=256 H=512 E=8 k=2)'. */
  name: string;
  value: number;
  unit: string;
  /** The baseline measured side by side, if any, and value/baseline or baseline/value as `ratio` says. */
  baseline?: { name: string; value: number; unit: string };
  ratio?: number;
  note?: string;
}

export interface Timing {
  medianMs: number;
  minMs: number;
  runs: number;
}

/** Run `fn` `warmup` times untimed, then `runs` times; report the median and minimum in ms. */
export async function time(fn: () => unknown, runs = 7, warmup = 2): Promise<Timing> {
  for (let i = 0; i < warmup; i++) await fn();
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await fn();
    samples.push(performance.now() - t0);
  }
  return { medianMs: median(samples), minMs: Math.min(...samples), runs };
}

/** The middle sample (the upper middle of an even count). */
export function median(xs: readonly number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
}

// Preloaded into a child: its peak RSS and CPU time on exit (V8's fatal errors skip it). The
// peak covers every thread of the process, worker-thread ranks included.
const USAGE_HOOK = 'data:text/javascript,process.on("exit",()=>{const u=process.resourceUsage();process.stderr.write("\\nusage="+u.maxRSS+","+(u.userCPUTime+u.systemCPUTime)+"\\n")})';

export interface ChildRun {
  ms: number;
  /** Peak resident memory of the whole process, MB; null when it died before saying. */
  rssMb: number | null;
  /** User + system CPU time of the whole process, ms. */
  cpuMs: number | null;
  status: number | null;
  signal: NodeJS.Signals | null;
  error?: Error;
  stdout: string;
  stderr: string;
}

/** Run `node [nodeArgs] script args` to its end (or `timeoutMs`): wall time, peak RSS, CPU time. */
export function runChild(script: string, args: readonly string[], timeoutMs: number, nodeArgs: readonly string[] = []): ChildRun {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [...nodeArgs, `--import=${USAGE_HOOK}`, script, ...args], { encoding: 'utf8', timeout: timeoutMs, maxBuffer: 1 << 28 });
  const ms = performance.now() - t0;
  const usage = /usage=(\d+),(\d+)/.exec(r.stderr ?? '');
  return {
    ms,
    rssMb: usage ? Number(usage[1]) / 1024 : null,
    cpuMs: usage ? Number(usage[2]) / 1000 : null,
    status: r.status,
    signal: r.signal,
    error: r.error,
    stdout: r.stdout ?? '',
    stderr: r.stderr ?? '',
  };
}
