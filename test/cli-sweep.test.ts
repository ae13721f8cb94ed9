// `ep-actors sweep` end to end: results, and bad usage as one line before any work.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli } from './cli.js';

const dir = mkdtempSync(join(tmpdir(), 'ep-sweep-'));
const spec = (name: string, s: object) => {
  const f = join(dir, name);
  writeFileSync(f, JSON.stringify(s));
  return f;
};
const good = spec('good.json', { base: { ep: 4, experts: 8 }, grid: { variant: ['seed', 'no-dispatch-edge'], routing: ['starve:1'] } });

test('sweep --out writes one JSON line per scenario and the summary on stdout', async () => {
  const out = join(dir, 'r.jsonl');
  const r = await runCli(['sweep', '--spec', good, '--out', out, '--workers', '1', '--json']);
  assert.is(r.code, 2, r.stderr);
  const rows = readFileSync(out, 'utf8').trimEnd().split('\n').map((l) => JSON.parse(l));
  assert.equal(rows.map((x) => x.verdict).sort(), ['missing', 'ok']);
  assert.equal(JSON.parse(r.stdout).verdicts, { ok: 1, missing: 1 });
});

test('bad usage is one line, exit 1, and nothing written', async () => {
  const cases: [string[], RegExp][] = [
    [['--spec', good, '--out', '/nonexistent/dir/s.jsonl'], /^ep-actors: --out \/nonexistent\/dir\/s\.jsonl: the folder \/nonexistent\/dir does not exist$/],
    [['--spec', spec('typo.json', { base: { top_k: 4 }, grid: { ep: [4] } }), '--out', join(dir, 'typo.jsonl')], /^ep-actors: sweep spec: base: unknown field 'top_k'; did you mean 'topK'\?$/],
    [['--spec', spec('colour.json', { grid: { ep: [4] }, colour: 'red' }), '--out', join(dir, 'colour.jsonl')], /^ep-actors: sweep spec: unknown field 'colour'/],
  ];
  for (const [args, message] of cases) {
    const r = await runCli(['sweep', ...args]);
    assert.is(r.code, 1, r.stdout);
    assert.is(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
    assert.match(r.stderr.trimEnd(), message);
  }
  assert.not.ok(readdirSync(dir).some((f) => f.endsWith('.jsonl') && f !== 'r.jsonl'), 'no result file was started');
});

/** This process's environment without Slurm's, plus `slurm` as SLURM_ARRAY_TASK_* variables. */
const slurmEnv = (slurm: Record<string, string>): NodeJS.ProcessEnv => ({
  ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('SLURM_'))),
  ...Object.fromEntries(Object.entries(slurm).map(([k, v]) => [`SLURM_ARRAY_TASK_${k}`, v])),
});

test('--shard auto: each task of a Slurm array runs its own shard, whatever the array counts from', async () => {
  // sbatch --array=0-1, --array=1-2 and --array=0-4:4 are each two tasks: shards 0/2 and 1/2.
  const arrays = [
    [{ ID: '0', COUNT: '2' }, { ID: '1', COUNT: '2' }],
    [{ ID: '1', MIN: '1', MAX: '2', COUNT: '2' }, { ID: '2', MIN: '1', MAX: '2', COUNT: '2' }],
    [{ ID: '0', MIN: '0', MAX: '4', STEP: '4', COUNT: '2' }, { ID: '4', MIN: '0', MAX: '4', STEP: '4', COUNT: '2' }],
  ];
  for (const tasks of arrays) {
    const indices: number[] = [];
    for (const [k, task] of tasks.entries()) {
      const r = await runCli(['sweep', '--spec', good, '--shard', 'auto', '--workers', '1', '--json'], { env: slurmEnv(task) });
      assert.ok(r.code === 0 || r.code === 2, r.stderr);
      // Without --out the results are stdout's JSON Lines and the summary is on stderr.
      assert.equal(JSON.parse(r.stderr).shard, { index: k, count: 2 }, JSON.stringify(task));
      indices.push(...r.stdout.trimEnd().split('\n').map((l) => JSON.parse(l).index));
    }
    assert.equal(indices.sort(), [0, 1], 'every scenario in exactly one task');
  }
});

test('--shard auto outside a Slurm array, or in an inconsistent one, is one line naming the variable; nothing written', async () => {
  const cases: [Record<string, string>, RegExp][] = [
    [{}, /^ep-actors: --shard auto reads the Slurm job array \(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT\) and SLURM_ARRAY_TASK_ID is not set: run it as a task of sbatch --array=0-\(N-1\), or give --shard I\/N$/],
    [{ ID: '3' }, /SLURM_ARRAY_TASK_COUNT is not set/],
    [{ ID: '2', COUNT: '2' }, /^ep-actors: --shard auto: SLURM_ARRAY_TASK_ID=2, _MIN=0, _STEP=1, _COUNT=2: the task id is not one of the array's 2 ids/],
    [{ ID: '0', MIN: '1', COUNT: '2' }, /the task id is not one of the array's 2 ids/],
    [{ ID: '3', MIN: '1', MAX: '7', COUNT: '3' }, /the array is not one evenly spaced range \(a list such as --array=1,3,7\?\); give --shard I\/N$/],
    [{ ID: 'one', COUNT: '2' }, /^ep-actors: --shard auto: SLURM_ARRAY_TASK_ID='one' is not a whole number$/],
  ];
  for (const [task, message] of cases) {
    const out = join(dir, 'auto.jsonl');
    const r = await runCli(['sweep', '--spec', good, '--shard', 'auto', '--out', out], { env: slurmEnv(task) });
    assert.is(r.code, 1, JSON.stringify(task));
    assert.is(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
    assert.match(r.stderr.trimEnd(), message);
    assert.not.ok(existsSync(out), 'no result file was started');
  }
  const help = await runCli(['sweep', '--help']);
  assert.match(help.stdout, /--shard auto {4}the shard of this Slurm job array task/);
});

test.after(() => rmSync(dir, { recursive: true, force: true }));

test.run();
