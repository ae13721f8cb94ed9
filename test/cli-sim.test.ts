// `ep-actors sim` end to end: exit codes, the JSON diagnosis, the trace file, bad usage.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot, cliPath } from './paths.js';
import { checkFitsMemory, validateScenario } from '../machines/scenario.js';
import { missing, onPath } from './tools.js';

const cli = (...args: string[]) => spawnSync(process.execPath, [cliPath, 'sim', ...args], { encoding: 'utf8', timeout: 60_000 });
const goldenCase = join(repoRoot, 'test/fixtures/golden/ep4_gelu_unpacked_starve1.safetensors');

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
  const file = `case:${goldenCase}`;
  const hang = cli('--routing', file, '--variant', 'no-dispatch-edge', '--json');
  assert.is(hang.status, 2, hang.stderr);
  assert.equal(JSON.parse(hang.stdout).culprits, [1]);
  const ok = cli('--routing', file, '--json');
  assert.is(ok.status, 0, ok.stderr);
});

test('bad usage exits 1 with one line naming the problem, before anything runs', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-sim-bad-'));
  const scenarioFile = (s: object) => {
    const f = join(dir, `s${readdirSync(dir).length}.json`);
    writeFileSync(f, JSON.stringify(s));
    return f;
  };
  const cases: [string[], RegExp][] = [
    [['--ep', '4', '--experts', '6'], /num_experts \(6\) must be divisible by ep \(4\)/],
    [['--variant', 'nope'], /unknown variant 'nope'/],
    [['--routing', 'starve:9'], /starve:9/],
    [['--ep', 'four'], /--ep must be an integer/],
    [['--ep', '-1'], /--ep must be at least 1, got -1/],
    [['--bogus'], /Unknown option '--bogus'/],
    [['stray'], /unexpected argument 'stray'/],
    [['--dp', '1', '--fsdp'], /FSDP needs a data-parallel dimension/],
    [['--routing', 'case:/nonexistent.safetensors'], /--routing case:\/nonexistent\.safetensors: .*cannot read/],
    [['--routing', `case:${goldenCase}`, '--ep', '8'], /--ep conflicts with --routing case:.*the case file sets the layout/],
    [['--engine', 'des', '--backend', 'native'], /--backend applies to real ranks .*--engine des simulates them/],
    [['--engine', 'des', '--timeout', '100'], /--timeout applies to real ranks/],
    [['--engine', 'des', '--compute-timeout', '100'], /--compute-timeout watches real ranks' compute: the des engine simulates it/],
    [['--capacity-factor', '2'], /--capacity-factor applies to --variant local-capacity/],
    [['--variant', 'no-dispatch-edge', '--early-exit-rank', '1'], /--early-exit-rank applies to --variant early-exit/],
    [['--scenario', scenarioFile({ ep: 4, top_k: 1 })], /unknown field 'top_k'; did you mean 'topK'\?/],
    // A token routed to one expert twice: a top-k router never does it.
    [['--scenario', scenarioFile({ ep: 2, experts: 4, routing: 'explicit', explicit: [[[[0, 1, 2, 3]]], [[[1, 2, 3, 3]]]] })], /rank 1, micro-batch 0, layer 0: token 1 is sent to expert 3 twice/],
    // Sizes no machine holds: a usage error naming the flag and the memory, not a rank crash.
    [['--dim', '10000000000'], /too large for this machine: 4 rank\(s\) need about [\d.]+ [GT]iB .*lower --dim 10000000000$/m],
    [['--tokens', '1000000000000'], /too large for this machine: .* lower --tokens 1000000000000$/m],
    [['--tokens', '1000000000000', '--engine', 'des'], /too large for this machine: .*mostly routing.* lower --tokens 1000000000000$/m],
  ];
  try {
    for (const [args, pattern] of cases) {
      const r = cli(...args);
      assert.is(r.status, 1, `${args.join(' ')}: ${r.stdout}`);
      assert.match(r.stderr.split('\n')[0]!, pattern);
      assert.not.match(r.stderr, /^\s+at /m, 'no stack trace');
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('model sizes bound real ranks only: the des engine simulates a huge --dim', () => {
  const r = cli('--dim', '10000000000', '--engine', 'des', '--json');
  assert.is(r.status, 0, r.stderr);
  assert.is(JSON.parse(r.stdout).verdict, 'ok');
});

test('the memory bound names the flags that grew and the memory they need', () => {
  const s = validateScenario({ dim: 1024, hidden: 4096 });
  assert.throws(() => checkFitsMemory(s, { tensors: true }, 2 ** 30), /4 rank\(s\) need about [\d.]+ GiB \([\d.]+ GiB each, mostly expert weights\) and this machine has 1\.0 GiB of memory; lower --dim 1024, --hidden 4096/);
  checkFitsMemory(s, { tensors: false }, 2 ** 30); // routing alone fits
});

test('a bad output path is refused before the run: one line, exit 1, no file written, so no verdict is lost', () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-sim-out-'));
  try {
    const r = cli('--routing', 'starve:1', '--variant', 'no-dispatch-edge', '--trace', join(dir, 't.json'), '--inspect', join(dir, 'i.jsonl'), '--report', '/nonexistent/r.html');
    assert.is(r.status, 1, r.stdout);
    assert.is(r.stderr, 'ep-actors: --report /nonexistent/r.html: the folder /nonexistent does not exist\n');
    assert.is(r.stdout, '');
    assert.equal(readdirSync(dir), []);
    const asFolder = cli('--trace', dir);
    assert.is(asFolder.status, 1);
    assert.match(asFolder.stderr, /--trace .* is a folder, not a file/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('--inspect - keeps stdout JSON Lines only; the verdict goes to stderr', () => {
  const r = cli('--routing', 'starve:1', '--variant', 'no-dispatch-edge', '--inspect', '-');
  assert.is(r.status, 2, r.stderr);
  const lines = r.stdout.trimEnd().split('\n');
  assert.ok(lines.length > 10, `${lines.length} inspection events`);
  for (const l of lines) assert.ok(typeof JSON.parse(l).rank === 'number', l);
  assert.match(r.stderr, /verdict: MISSING on ep, position 5/);
});

test('a long sim shows progress on a terminal, and none in a pipe', () => {
  if (!onPath('script')) throw missing('script', 'this test needs it for a terminal', 'apt-get install bsdutils');
  const script = spawnSync('script', ['-qec', `${JSON.stringify(process.execPath)} ${cliPath} sim --ep 4 --layers 2 --timeout 60000`, '/dev/null'], { encoding: 'utf8', timeout: 60_000 });
  assert.is(script.status, 0, script.stdout);
  assert.match(script.stdout, /\] \d+\/16 layer calls/);
  assert.match(script.stdout, /verdict: ok/);
  const piped = cli('--ep', '4', '--layers', '2');
  assert.not.match(piped.stderr + piped.stdout, /layer calls/);
});

test.run();
