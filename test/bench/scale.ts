// The issue's scale targets (issue 14): `sim` on 256 worker ranks within 1.5 GB, and the
// discrete-event engine at ep=4096 within 8 s and 1 GB. Each command runs as a child;
// wall time, CPU time (user + system, every thread) and peak RSS of the whole process are
// read at its exit. With SCALE_BASELINE=/path/to/checkout (an older build's dist/cli/main.js)
// the same command of that checkout runs alternately with ours, so both see the same load.
// SCALE_RUNS sets the runs of each (default 3); notes give min/median/max. SCALE_MATCH (a
// regex) keeps the targets whose command matches it (the 256-rank runs take minutes each).
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { median, runChild, type BenchRow, type ChildRun } from './harness.js';

const CLI = join(dirname(fileURLToPath(import.meta.url)), '../../cli/main.js');

const TARGETS: { what: string; args: string[]; timeoutMs: number; seconds: number; megabytes: number }[] = [
  { what: 'sim --engine des --ep 4096 --experts 4096', args: ['sim', '--engine', 'des', '--ep', '4096', '--experts', '4096', '--json'], timeoutMs: 300_000, seconds: 8, megabytes: 1024 },
  // A collective limit of 2 minutes: 256 workers starting on a busy 2-core machine go more than the default 10 s without progress.
  { what: 'sim --ep 256 --experts 256 (worker ranks)', args: ['sim', '--ep', '256', '--experts', '256', '--timeout', '120000', '--json'], timeoutMs: 600_000, seconds: Infinity, megabytes: 1536 },
];

function verdictOf(r: ChildRun): string {
  if (r.error || r.signal) return `killed (${r.signal ?? r.error?.message})`;
  try {
    return (JSON.parse(r.stdout) as { verdict: string }).verdict;
  } catch {
    return `exit ${r.status}: ${r.stderr.trim().split('\n')[0]}`;
  }
}

const spread = (xs: number[], digits: number) => `${Math.min(...xs).toFixed(digits)}/${median(xs).toFixed(digits)}/${Math.max(...xs).toFixed(digits)}`;

function summary(runs: ChildRun[]) {
  const s = runs.map((r) => r.ms / 1000);
  const cpu = runs.map((r) => (r.cpuMs ?? NaN) / 1000);
  const rss = runs.map((r) => r.rssMb ?? NaN);
  return {
    seconds: median(s),
    rss: median(rss),
    note: `wall min/median/max ${spread(s, 1)} s, CPU ${spread(cpu, 1)} s, peak RSS ${spread(rss, 0)} MB, verdict ${[...new Set(runs.map(verdictOf))].join(' | ')}`,
  };
}

export async function bench(): Promise<BenchRow[]> {
  const baseline = process.env.SCALE_BASELINE ? join(process.env.SCALE_BASELINE, 'dist/cli/main.js') : null;
  const runs = Number(process.env.SCALE_RUNS ?? 3);
  const rows: BenchRow[] = [];
  const match = new RegExp(process.env.SCALE_MATCH ?? '');
  for (const t of TARGETS.filter((x) => match.test(x.what))) {
    const ours: ChildRun[] = [];
    const theirs: ChildRun[] = [];
    for (let i = 0; i < runs; i++) {
      ours.push(runChild(CLI, t.args, t.timeoutMs));
      if (baseline) theirs.push(runChild(baseline, t.args, t.timeoutMs));
    }
    const a = summary(ours);
    const b = baseline ? summary(theirs) : null;
    const target = `target ${Number.isFinite(t.seconds) ? `≤ ${t.seconds} s and ` : ''}≤ ${t.megabytes} MB`;
    const note = `${target}; ours: ${a.note}${b ? `; baseline: ${b.note}` : ''}`;
    rows.push({ name: `${t.what}: wall`, value: a.seconds, unit: 's', ...(b && { baseline: { name: 'baseline checkout', value: b.seconds, unit: 's' }, ratio: b.seconds / a.seconds }), note });
    rows.push({ name: `${t.what}: peak RSS`, value: a.rss, unit: 'MB', ...(b && { baseline: { name: 'baseline checkout', value: b.rss, unit: 'MB' }, ratio: b.rss / a.rss }), note });
  }
  return rows;
}
