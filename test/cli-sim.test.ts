// `ep-actors sim` end to end: exit codes, the JSON diagnosis, the trace file, bad usage.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from './paths.js';

const cli = (...args: string[]) => spawnSync(process.execPath, [join(repoRoot, 'dist/src/cli.js'), 'sim', ...args], { encoding: 'utf8', timeout: 60_000 });

test('a starved rank under no-dispatch-edge exits 2 with a JSON diagnosis naming ep, rank 1 and bwd.dispatch', () => {
  const r = cli('--ep', '4', '--experts', '8', '--top-k', '2', '--routing', 'starve:1', '--variant', 'no-dispatch-edge', '--json');
  assert.is(r.status, 2, r.stderr);
  const d = JSON.parse(r.stdout);
  assert.is(d.verdict, 'missing');
  assert.is(d.communicator, 'ep');
  assert.is(d.position, 5);
  assert.equal(d.hangs, [{ verdict: 'missing', communicator: 'ep', position: 5, culprits: [1], detail: d.hangs[0].detail }]);
  assert.equal(d.culprits, [1]);
  assert.match(d.cause, /bwd\.dispatch/);
  assert.is(d.ranks.length, 4);
  for (const key of ['rank', 'state', 'op', 'phase', 'layer', 'microBatch']) assert.ok(key in d.ranks[0], key);
  assert.ok(d.detectedAfterMs < 5000, `detected after ${d.detectedAfterMs} ms, well before the 10 s collective limit`);
});

test('the seed exits 0 and --trace writes a Chrome trace with a lane per rank', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-sim-'));
  const trace = join(dir, 't.json');
  const r = cli('--ep', '4', '--routing', 'starve:1', '--trace', trace);
  assert.is(r.status, 0, r.stderr);
  assert.match(r.stdout, /verdict: ok/);
  const t = JSON.parse(readFileSync(trace, 'utf8'));
  const lanes = new Set(t.traceEvents.filter((e: { ph: string }) => e.ph === 'X').map((e: { tid: number }) => e.tid));
  assert.equal([...lanes].sort(), [0, 1, 2, 3]);
});

test('the des engine gives the same verdict', () => {
  const r = cli('--ep', '4', '--routing', 'starve:1', '--variant', 'no-dispatch-edge', '--engine', 'des', '--json');
  assert.is(r.status, 2, r.stderr);
  assert.equal(JSON.parse(r.stdout).culprits, [1]);
});

test('routing from a case file: the golden zero-token case hangs without the dispatch edge and passes with the seed', () => {
  const file = `case:${join(repoRoot, 'test/fixtures/golden/ep4_gelu_unpacked_starve1.safetensors')}`;
  const hang = cli('--routing', file, '--variant', 'no-dispatch-edge', '--json');
  assert.is(hang.status, 2, hang.stderr);
  assert.equal(JSON.parse(hang.stdout).culprits, [1]);
  const ok = cli('--routing', file, '--json');
  assert.is(ok.status, 0, ok.stderr);
});

test('bad usage exits 1 with a message naming the problem', () => {
  const cases: [string[], RegExp][] = [
    [['--ep', '4', '--experts', '6'], /num_experts \(6\) must be divisible by ep \(4\)/],
    [['--variant', 'nope'], /unknown variant 'nope'/],
    [['--routing', 'starve:9'], /starve:9/],
    [['--ep', 'four'], /--ep must be an integer/],
    [['--bogus'], /Unknown option '--bogus'/],
    [['--dp', '1', '--fsdp'], /FSDP needs a data-parallel dimension/],
    [['--routing', 'case:/nonexistent.safetensors'], /--routing case:\/nonexistent\.safetensors: .*cannot read/],
  ];
  for (const [args, pattern] of cases) {
    const r = cli(...args);
    assert.is(r.status, 1, `${args.join(' ')}: ${r.stdout}`);
    assert.match(r.stderr, pattern);
  }
});

test.run();
