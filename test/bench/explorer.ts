// `check` at the layouts real MoE jobs use (issue 17): wall time (median of 3 runs) and peak
// RSS of the command, before and after. Before is an older checkout's CLI, given as
// EXPLORER_BASELINE=/path/to/checkout (its dist/src/cli.js), run once with a 1 GiB heap
// and a 30 s limit, since it enumerates rank permutations and may not finish at all.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { median, runChild, type BenchRow } from './harness.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '../../cli/main.js');

interface Run {
  ms: number;
  rssMb: number | null;
  verdict: string;
  classes: number | null;
}

function check(cli: string, args: string[], heapMb: number | null, timeoutMs: number): Run {
  const r = runChild(cli, ['check', ...args, '--json'], timeoutMs, heapMb ? [`--max-old-space-size=${heapMb}`] : []);
  const { ms, rssMb } = r;
  if (r.error || r.signal) return { ms, rssMb, verdict: r.signal === "SIGTERM" ? `timed out after ${(timeoutMs / 1000).toFixed(0)} s` : `killed (${r.signal ?? r.error?.message}) after ${(ms / 1000).toFixed(1)} s`, classes: null };
  if (r.status !== 0 && r.status !== 2) return { ms, rssMb, verdict: /heap out of memory/.test(r.stderr) ? `out of memory after ${(ms / 1000).toFixed(1)} s` : `exit ${r.status}: ${r.stderr.trim().split('\n')[0]}`, classes: null };
  const json = JSON.parse(r.stdout) as { verdict: string; classesRun: number };
  return { ms, rssMb, verdict: json.verdict, classes: json.classesRun };
}

const ROWS: { what: string; args: string[] }[] = [
  { what: 'seed, ep=8 E=16 top-2', args: ['--ep', '8', '--experts', '16', '--top-k', '2'] },
  { what: 'seed, ep=8 E=16 top-2, --exhaustive (the old search space)', args: ['--ep', '8', '--experts', '16', '--top-k', '2', '--exhaustive'] },
  { what: 'no-dispatch-edge, ep=12 E=24 top-2', args: ['--ep', '12', '--experts', '24', '--top-k', '2', '--variant', 'no-dispatch-edge'] },
  { what: 'seed, ep=16 E=32 top-2', args: ['--ep', '16', '--experts', '32', '--top-k', '2'] },
  { what: 'no-dispatch-edge, ep=16 E=32 top-2', args: ['--ep', '16', '--experts', '32', '--top-k', '2', '--variant', 'no-dispatch-edge'] },
  ...['seed', 'no-dispatch-edge', 'no-unused-expert-grads', 'skip-empty-sends', 'early-exit', 'local-capacity', 'completion-order', 'layer-metric'].map((variant) => ({
    what: `${variant}, ep=64 E=256 top-8`,
    args: ['--ep', '64', '--experts', '256', '--top-k', '8', '--variant', variant],
  })),
  { what: 'no-unused-expert-grads, ep=64 dp=2 FSDP experts unpacked E=256 top-8', args: ['--ep', '64', '--dp', '2', '--fsdp', '--wrap', 'experts', '--unpacked', '--experts', '256', '--top-k', '8', '--variant', 'no-unused-expert-grads'] },
  // Issue 16's classes at the same size, with the dimension each needs (dp for wrong-group, micro-batches for uneven-batches).
  ...['kernel-hang', 'second-stream'].map((variant) => ({ what: `${variant}, ep=64 E=256 top-8`, args: ['--ep', '64', '--experts', '256', '--top-k', '8', '--variant', variant] })),
  { what: 'wrong-group, ep=64 dp=2 E=256 top-8', args: ['--ep', '64', '--dp', '2', '--experts', '256', '--top-k', '8', '--variant', 'wrong-group'] },
  { what: 'uneven-batches, ep=64 E=256 top-8, 4 micro-batches', args: ['--ep', '64', '--experts', '256', '--top-k', '8', '--micro-batches', '4', '--variant', 'uneven-batches'] },
  { what: 'second-stream, ep=64 E=256 top-8, 2 layers x 2 micro-batches (16 orders per rank)', args: ['--ep', '64', '--experts', '256', '--top-k', '8', '--layers', '2', '--micro-batches', '2', '--variant', 'second-stream'] },
];

export async function bench(): Promise<BenchRow[]> {
  const baseline = process.env.EXPLORER_BASELINE ? join(process.env.EXPLORER_BASELINE, 'dist/src/cli.js') : null;
  return ROWS.map(({ what, args }) => {
    const runs = [0, 1, 2].map(() => check(CLI, args, null, 120_000));
    const ms = median(runs.map((r) => r.ms));
    const rss = Math.max(...runs.map((r) => r.rssMb ?? 0));
    const row: BenchRow = { name: `check ${what}`, value: ms, unit: 'ms', note: `${runs[0]!.verdict}, ${runs[0]!.classes} class(es) run, peak RSS ${rss.toFixed(0)} MB` };
    if (!baseline) return row;
    // The old explorer had no cutoff: its default search is this one's --exhaustive.
    const oldArgs = args.filter((a) => a !== '--exhaustive');
    const first = check(baseline, oldArgs, 1024, 30_000);
    const old = first.classes === null || first.ms > 10_000 ? [first] : [first, check(baseline, oldArgs, 1024, 30_000), check(baseline, oldArgs, 1024, 30_000)];
    const oldMs = median(old.map((r) => r.ms));
    const oldNote = `before: ${first.verdict}${first.classes !== null ? `, ${first.classes} classes` : ''}${first.rssMb ? `, peak RSS ${first.rssMb.toFixed(0)} MB` : ''}`;
    row.note = `${row.note}; ${oldNote}`;
    if (first.classes !== null) {
      row.baseline = { name: 'before', value: oldMs, unit: 'ms' };
      row.ratio = oldMs / ms;
    }
    return row;
  });
}
