// Benchmark plumbing shared by every benchmark module under test/bench/. A module exports
// `bench(): Promise<BenchRow[]>`; test/bench/index.ts runs them and prints one table.
// Timings are medians over repeated runs; ratios compare against a baseline measured in
// the same run, because this machine is shared and noisy.
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
