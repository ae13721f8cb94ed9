import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readSafetensors, writeSafetensors } from '../src/codec/safetensors.js';
import { Tensor, relativeError } from '../src/tensor.js';
import { goldenDir } from './paths.js';
import { runCli } from './cli.js';
import { loadNative } from '../src/native/backend.js';

const golden = join(goldenDir, 'ep4_silu_packed.safetensors');
const goldenBytes = readFileSync(golden);
const goldenFile = readSafetensors(goldenBytes, golden);

const run = (...args: string[]) => runCli(['run', ...args]);

function tmp(): string {
  return mkdtempSync(join(tmpdir(), 'ep-actors-run-'));
}

test('run: golden case end to end, output file matches the expected tensors', async () => {
  const dir = tmp();
  try {
    const out = join(dir, 'out.safetensors');
    const r = await run('--case', golden, '--out', out);
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stdout, /ep=4, 8 experts, top-2, silu/);
    const got = readSafetensors(readFileSync(out), out);
    const expected = [...goldenFile.tensors.keys()].filter((k) => k.startsWith('expected.'));
    assert.is(got.tensors.size, expected.length);
    for (const key of expected) {
      const name = key.slice('expected.'.length);
      const t = got.tensors.get(name);
      assert.ok(t, `missing ${name}`);
      assert.ok(relativeError(t!, goldenFile.tensors.get(key)!) <= 1e-5, name);
    }
    assert.is(got.metadata.ep, '4');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('run --json prints one JSON object; --help explains', async () => {
  const dir = tmp();
  try {
    const r = await run('--case', golden, '--out', join(dir, 'o.safetensors'), '--json');
    assert.is(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout);
    assert.is(j.ep, 4);
    // By default the native kernels where the addon loaded, else ts with a note saying why.
    const native = loadNative() !== null;
    assert.is(j.backend, native ? 'native' : 'ts');
    assert.is(/note: using the TypeScript kernels/.test(r.stderr), !native, r.stderr);
    const without = await runCli(['run', '--case', golden, '--out', join(dir, 'o.safetensors'), '--json'], { env: { ...process.env, EP_ACTORS_NO_NATIVE: '1' } });
    assert.is(without.code, 0, without.stderr);
    assert.is(JSON.parse(without.stdout).backend, 'ts');
    assert.is(without.stderr, 'note: using the TypeScript kernels: the native addon is not available (disabled by EP_ACTORS_NO_NATIVE=1)\n');
    const badOut = await run('--case', golden, '--out', join(dir, 'no/such/o.safetensors'));
    assert.is(badOut.code, 1);
    assert.match(badOut.stderr, /^ep-actors: --out .*no\/such\/o\.safetensors: the folder .* does not exist\n$/);
    assert.equal(j.tokensPerRank, [12, 12, 12, 12]);
    assert.is(j.rowsReceivedPerRank.reduce((a: number, b: number) => a + b, 0), 96);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const h = await run('--help');
  assert.is(h.code, 0);
  assert.match(h.stdout, /--case FILE/);
  assert.is((await run('--case', golden)).code, 1); // --out missing
});

/** A copy of the golden case with `edit` applied to its tensors and metadata. */
function edited(edit: (tensors: Map<string, Tensor>, meta: Record<string, string>) => void): Uint8Array {
  const tensors = new Map([...goldenFile.tensors].map(([k, t]) => [k, new Tensor(t.dtype, t.shape, t.data.slice() as typeof t.data)]));
  const meta = { ...goldenFile.metadata };
  edit(tensors, meta);
  return writeSafetensors(tensors, meta);
}

const bad: [string, () => Uint8Array, RegExp][] = [
  ['truncated file', () => goldenBytes.subarray(0, goldenBytes.length - 100), /bad\.safetensors/],
  ['missing tensor', () => edited((t) => t.delete('rank1.grad_out')), /rank1\.grad_out is missing/],
  ['index out of range', () => edited((t) => ((t.get('rank2.indices')!.data as BigInt64Array)[3] = 8n)), /rank2\.indices\[1, 1\] = 8 is outside \[0, 8\)/],
  ['negative index', () => edited((t) => ((t.get('rank0.indices')!.data as BigInt64Array)[0] = -1n)), /rank0\.indices\[0, 0\] = -1/],
  ['non-finite weight', () => edited((t) => ((t.get('rank3.weights')!.data as Float32Array)[5] = NaN)), /rank3\.weights\[2, 1\] = NaN/],
  ['NaN input', () => edited((t) => ((t.get('rank1.x')!.data as Float32Array)[21] = NaN)), /rank1\.x\[1, 5\] = NaN: inputs must be finite/],
  ['infinite output grad', () => edited((t) => ((t.get('rank0.grad_out')!.data as Float32Array)[0] = -Infinity)), /rank0\.grad_out\[0, 0\] = -Infinity/],
  ['NaN expert weight', () => edited((t) => ((t.get('experts.down_w')!.data as Float32Array)[32 * 16 + 3] = NaN)), /experts\.down_w\[1, 0, 3\] = NaN/],
  [
    'a token sent to one expert twice',
    () => edited((t) => {
      const ids = t.get('rank2.indices')!.data as BigInt64Array;
      ids[3] = ids[2]!;
    }),
    /rank2\.indices\[1\]: rank 2 sends token 1 to expert \d+ twice \(columns 0 and 1\)/,
  ],
  ['E % ep', () => edited((_, m) => (m.ep = '3')), /num_experts \(8\) must be divisible by ep \(3\)/],
  ['top_k > E', () => edited((_, m) => (m.top_k = '9')), /top_k \(9\) exceeds num_experts \(8\)/],
  ['unknown activation', () => edited((_, m) => (m.activation = 'tanh')), /activation 'tanh' is unknown/],
  ['missing metadata', () => edited((_, m) => delete m.hidden), /metadata hidden is missing/],
  ['shapes disagree', () => edited((t) => t.set('rank1.x', Tensor.zeros('f32', [12, 15]))), /rank1\.x has shape \[12, 15\], expected \[12, 16\]/],
];

// The bad cases run concurrently (process start-up dominates); each test awaits its own.
const badRuns = bad.map(([, make]) => {
  const dir = tmp();
  const input = join(dir, 'bad.safetensors');
  writeFileSync(input, make());
  return { dir, result: run('--case', input, '--out', join(dir, 'out.safetensors')) };
});

bad.forEach(([what, , message], i) => {
  test(`run: ${what} → exit 1, one line naming it, no output file`, async () => {
    const { dir, result } = badRuns[i]!;
    try {
      const r = await result;
      assert.is(r.code, 1);
      const lines = r.stderr.trimEnd().split('\n');
      assert.is(lines.length, 1, r.stderr);
      assert.match(lines[0]!, /^ep-actors: /);
      assert.match(lines[0]!, message);
      assert.equal(readdirSync(dir), ['bad.safetensors']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

test.run();
