// `ep-actors sweep --spec FILE`: many scenarios over a piscina pool of discrete-event
// engines; JSON Lines results, a verdict summary, `--shard I/N|auto` for batch schedulers.
import { createWriteStream } from 'node:fs';
import { finished } from 'node:stream/promises';
import { readFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import { resolve } from 'node:path';
import { helpAsked, intOption, noPositionals, outputFile, parse, requiredString } from './args.js';
import { progressBar } from './progress.js';
import { UsageError } from '../src/errors.js';
import { expandSweep, inShard, parseShard, runSweep, slurmArrayShard, summarize, type SweepSpec } from '../sim/sweep.js';

const HELP = `usage: ep-actors sweep --spec FILE [--out FILE] [--shard I/N|auto] [--workers N] [--json]

Run many scenarios through the discrete-event engine over a pool of worker threads.

  --spec FILE     JSON: {"base": {scenario fields}, "grid": {"field": [values]},
                  "samples": {"count": N, "seed": S, "fields": {"field": [values]}}};
                  the grid is the cartesian product, samples draw each field from its list
  --out FILE      JSON Lines, one result per scenario (default: stdout)
  --shard I/N     run only scenarios whose index is I modulo N (0 <= I < N), so N machines
                  split one sweep; indices are the spec's, so shards' outputs concatenate
  --shard auto    the shard of this Slurm job array task: task k of SLURM_ARRAY_TASK_COUNT,
                  k = (SLURM_ARRAY_TASK_ID - _MIN) / _STEP, so sbatch --array=0-3 and
                  --array=1-4 both run shards 0/4..3/4; a missing or inconsistent variable,
                  or an array that is not one evenly spaced range, is refused
  --workers N     pool threads (default: the cores, ${availableParallelism()} here)
  --json          print the summary as one JSON object
  -h, --help      this text

A progress bar is drawn on stderr when it is a terminal.
exit codes: 0 every scenario ok, 2 some scenario hangs or mismatches, 1 bad usage`;

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse(argv, { spec: { type: 'string' }, out: { type: 'string' }, shard: { type: 'string' }, workers: { type: 'string' }, json: { type: 'boolean' } }, HELP);
  if (helpAsked(values, HELP)) return 0;
  noPositionals(positionals, HELP);
  const specPath = requiredString(values, 'spec', HELP);
  let spec: SweepSpec;
  try {
    spec = JSON.parse(await readFile(resolve(specPath), 'utf8')) as SweepSpec;
  } catch (e) {
    throw new UsageError(`--spec ${specPath}: ${(e as Error).message}`);
  }
  const shard = values.shard === 'auto' ? slurmArrayShard(process.env, '--shard auto') : parseShard(typeof values.shard === 'string' ? values.shard : '0/1');
  const workers = intOption(values.workers, 'workers', availableParallelism(), 1, 256);
  const jobs = expandSweep(spec).flatMap((scenario, index) => (inShard(index, shard) ? [{ index, scenario }] : []));
  const outPath = outputFile(values, 'out');

  const file = outPath === undefined ? null : createWriteStream(outPath);
  // A write that fails after the check (a full disk, say) ends the sweep with one line, not an unhandled 'error' event.
  let writeError: Error | undefined;
  file?.on('error', (e) => (writeError ??= e));
  const out = file ?? process.stdout;
  const bar = progressBar(jobs.length, 'scenarios');
  let done = 0;
  const t0 = performance.now();
  const results = await runSweep(jobs, {
    workers,
    onResult(r) {
      out.write(JSON.stringify(r) + '\n');
      bar.update(++done);
    },
  });
  bar.clear();
  if (file) await finished(file.end()).catch((e: Error) => (writeError ??= e));
  if (writeError) throw new Error(`--out ${String(values.out)}: ${writeError.message}`);
  const seconds = (performance.now() - t0) / 1000;
  const failing = results.filter((r) => r.verdict !== 'ok').length;
  const report = file ? process.stdout : process.stderr;
  if (values.json) {
    const verdicts = Object.fromEntries([...new Set(results.map((r) => r.verdict))].map((v) => [v, results.filter((r) => r.verdict === v).length]));
    report.write(JSON.stringify({ scenarios: results.length, shard, workers, seconds, verdicts }) + '\n');
  } else {
    report.write(`${summarize(results)}\n${results.length} scenarios (shard ${shard.index}/${shard.count}) in ${seconds.toFixed(2)} s on ${workers} worker(s)\n`);
  }
  return failing > 0 ? 2 : 0;
}
