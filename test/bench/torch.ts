// The PyTorch baseline for an EP step: the seed's algorithm on PyTorch + gloo, one process
// per rank (test/bench/torch_ep_step.py). Other benchmarks (ep.ts) compare against it, so the
// measurement is memoised per options: one run of the script per `npm run bench`.
import { syntheticCase, type CaseData } from '../../src/case.js';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { BenchRow } from './harness.js';
import { loadNative } from '../../src/native/backend.js';

export interface TorchEpOptions {
  ep: number;
  tokens: number;
  dim: number;
  hidden: number;
  experts: number;
  topK: number;
  /** Torch and OpenBLAS threads per rank process; ours gets the same count per rank. */
  threads: number;
  /** Steps run untimed, then timed (the median is of the timed ones); ours runs as many. */
  warmup: number;
  timed: number;
}

export type TorchEpResult =
  | { medianMs: number; minMs: number; countsUs: number; torch: string; blas: string }
  | { skipped: string };

export const DEFAULT_EP_OPTIONS: TorchEpOptions = {
  ep: 4,
  tokens: 1024,
  dim: 256,
  hidden: 512,
  experts: 8,
  topK: 2,
  threads: 1,
  warmup: 3,
  timed: 10,
};

// Debian's python3-torch lives under the system python; a pyenv python3 on PATH won't see it.
const PYTHONS = ['/usr/bin/python3', 'python3'];
const TIMEOUT_MS = 300_000;

/** The .py stays in the source tree; compiled code runs from dist/test/bench/. */
function scriptPath(): string {
  const candidates = [new URL('./torch_ep_step.py', import.meta.url), new URL('../../../test/bench/torch_ep_step.py', import.meta.url)].map((u) => fileURLToPath(u));
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`torch_ep_step.py not found (looked at ${candidates.join(', ')})`);
  return found;
}

function runPython(python: string, args: string[]): Promise<{ stdout: string; stderr: string; error?: Error }> {
  return new Promise((resolve) => {
    execFile(python, args, { timeout: TIMEOUT_MS, maxBuffer: 16 << 20 }, (error, stdout, stderr) => {
      resolve({ stdout, stderr, error: error ?? undefined });
    });
  });
}

/** The last line of stdout that parses as a JSON object (the script prints exactly one). */
function lastJson(stdout: string): Record<string, unknown> | undefined {
  const lines = stdout.trim().split('\n').reverse();
  for (const line of lines) {
    const t = line.trim();
    if (!t.startsWith('{')) continue;
    try {
      return JSON.parse(t) as Record<string, unknown>;
    } catch {
      /* not ours */
    }
  }
  return undefined;
}

async function measure(o: TorchEpOptions): Promise<TorchEpResult> {
  const script = scriptPath();
  const args = [
    script,
    `--ep=${o.ep}`,
    `--tokens=${o.tokens}`,
    `--dim=${o.dim}`,
    `--hidden=${o.hidden}`,
    `--experts=${o.experts}`,
    `--top-k=${o.topK}`,
    `--threads=${o.threads}`,
    `--warmup=${o.warmup}`,
    `--iters=${o.timed}`,
  ];
  const reasons: string[] = [];
  for (const python of PYTHONS) {
    const r = await runPython(python, args);
    const j = lastJson(r.stdout);
    if (j && typeof j.median_ms === 'number' && typeof j.min_ms === 'number' && typeof j.counts_median_us === 'number') {
      return { medianMs: j.median_ms, minMs: j.min_ms, countsUs: j.counts_median_us, torch: String(j.torch), blas: String(j.blas) };
    }
    // A python without torch says so and exits 0; try the next interpreter before giving up.
    if (j && typeof j.skipped === 'string') reasons.push(`${python}: ${j.skipped}`);
    else if (r.error) {
      const tail = r.stderr.trim().split('\n').slice(-3).join(' | ');
      reasons.push(`${python}: ${r.error.message.split('\n')[0]}${tail ? ` (${tail})` : ''}`);
    } else reasons.push(`${python}: no JSON result on stdout`);
  }
  return { skipped: reasons.join('; ') };
}

const cache = new Map<string, Promise<TorchEpResult>>();

/**
 * Median/min ms of one EP step (fwd+bwd, max over ranks) on PyTorch + gloo; memoised.
 * `fresh` measures again and keeps that: on a shared machine the load drifts within a run,
 * so a row measures its baseline right next to its own numbers.
 */
export function torchEpStep(opts?: Partial<TorchEpOptions>, fresh = false): Promise<TorchEpResult> {
  const o: TorchEpOptions = { ...DEFAULT_EP_OPTIONS, ...opts };
  const key = JSON.stringify([o.ep, o.tokens, o.dim, o.hidden, o.experts, o.topK, o.threads, o.warmup, o.timed]);
  let p = cache.get(key);
  if (!p || fresh) {
    p = measure(o);
    cache.set(key, p);
  }
  return p;
}

/**
 * Gives every CPU kernel of this process (its worker-thread ranks included) at most as many
 * threads as each torch process has, so each rank computes on `o.threads` threads as torch's do.
 */
export function pinKernelThreads(o: TorchEpOptions = DEFAULT_EP_OPTIONS): void {
  loadNative()?.setThreads(o.threads);
}

/** The EP step's inputs for our side of the comparison: the same sizes, seeded, f32, SwiGLU. */
export function epStepCase(o: TorchEpOptions = DEFAULT_EP_OPTIONS): CaseData<'f32'> {
  return syntheticCase(
    { ep: o.ep, numExperts: o.experts, topK: o.topK, dim: o.dim, hidden: o.hidden, activation: 'silu', packed: true, gradientScale: false, dtype: 'f32', tokensPerRank: new Array<number>(o.ep).fill(o.tokens) },
    1,
  );
}

export function epStepLabel(impl: string, o: TorchEpOptions = DEFAULT_EP_OPTIONS): string {
  return `EP step fwd+bwd (${impl}, ep=${o.ep} T=${o.tokens} D=${o.dim} H=${o.hidden} E=${o.experts} k=${o.topK}, ${o.threads} thread${o.threads === 1 ? '' : 's'}/rank)`;
}

export async function bench(): Promise<BenchRow[]> {
  const r = await torchEpStep();
  const name = epStepLabel('torch+gloo f32');
  if ('skipped' in r) return [{ name, value: NaN, unit: 'ms', note: `skipped: ${r.skipped}` }];
  return [{ name, value: r.medianMs, unit: 'ms', note: `min ${r.minMs.toFixed(1)} ms; torch ${r.torch}; ${r.blas}` }];
}
