// `npm run bench [-- NAME...] [--json]`: runs every benchmark module in this folder (each
// compiled file exporting `bench`), one after another so they don't disturb each other's
// timings, then prints one table, or with --json an array of rows {module, name, value,
// unit, baseline?: {name, value, unit}, ratio?, note}. Every time ratio is baseline/ours and
// every throughput ratio ours/baseline: above 1, we are faster. Each row's note ends with
// the machine's load average over its module's run: on a shared machine it explains most
// of the spread. A module that throws becomes a row and makes the exit 1.
import { readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { performance } from 'node:perf_hooks';
import { loadavg } from 'node:os';
import type { BenchRow } from './harness.js';

const NOT_BENCHMARKS = new Set(['harness', 'index']);

interface Module {
  name: string;
  file: string;
}

function discover(): Module[] {
  const dir = dirname(fileURLToPath(import.meta.url));
  return readdirSync(dir)
    .filter((f) => f.endsWith('.js'))
    .map((f) => ({ name: f.slice(0, -3), file: join(dir, f) }))
    .filter((m) => !NOT_BENCHMARKS.has(m.name))
    .sort((a, b) => a.name.localeCompare(b.name));
}

function fmt(v: number | undefined): string {
  if (v === undefined || !Number.isFinite(v)) return '-';
  const a = Math.abs(v);
  if (a >= 100) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  if (a === 0) return '0';
  return v.toPrecision(3);
}

function table(rows: (BenchRow & { module: string })[]): string {
  const head = ['name', 'value', 'baseline', 'ratio', 'note'];
  const body = rows.map((r) => [
    `${r.module}: ${r.name}`,
    `${fmt(r.value)} ${r.unit}`.trim(),
    r.baseline ? `${fmt(r.baseline.value)} ${r.baseline.unit} (${r.baseline.name})` : '-',
    r.ratio === undefined ? '-' : `${fmt(r.ratio)}x`,
    r.note ?? '',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (i === 1 || i === 3 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!)))
      .join(' | ')
      .trimEnd();
  return [line(head), widths.map((w) => '-'.repeat(w)).join('-|-'), ...body.map(line)].join('\n');
}

async function main(): Promise<number> {
  const argv = process.argv.slice(2);
  const json = argv.includes('--json');
  const filters = argv.filter((a) => !a.startsWith('--'));
  const all = discover();
  const unknown = filters.filter((f) => !all.some((m) => m.name === f));
  if (unknown.length) {
    process.stderr.write(`bench: no module named ${unknown.join(', ')}; have: ${all.map((m) => m.name).join(', ')}\n`);
    return 1;
  }
  const chosen = filters.length ? all.filter((m) => filters.includes(m.name)) : all;

  const rows: (BenchRow & { module: string })[] = [];
  let failed = false;
  for (const m of chosen) {
    const t0 = performance.now();
    try {
      const mod = (await import(pathToFileURL(m.file).href)) as { bench?: unknown };
      // Helper modules (e.g. a codec shared by benchmarks) may live here without `bench`.
      if (typeof mod.bench !== 'function') continue;
      process.stderr.write(`bench: ${m.name} ...\n`);
      const load0 = loadavg()[0]!;
      const got = (await (mod.bench as () => Promise<BenchRow[]>)()) ?? [];
      const load = `load ${load0.toFixed(1)}→${loadavg()[0]!.toFixed(1)}`;
      for (const r of got) rows.push({ module: m.name, ...r, note: r.note ? `${r.note}; ${load}` : load });
      process.stderr.write(`bench: ${m.name} done, ${got.length} row(s) in ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
    } catch (e) {
      failed = true;
      const msg = e instanceof Error ? e.message : String(e);
      process.stderr.write(`bench: ${m.name} FAILED: ${e instanceof Error && e.stack ? e.stack : msg}\n`);
      rows.push({ module: m.name, name: 'FAILED', value: NaN, unit: '', note: msg.split('\n')[0] });
    }
  }

  if (json) process.stdout.write(JSON.stringify(rows, null, 2) + '\n');
  else process.stdout.write(table(rows) + '\n');
  return failed ? 1 : 0;
}

process.exitCode = await main();
