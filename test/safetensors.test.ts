import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtemp, mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  readSafetensors,
  readSafetensorsFile,
  SafetensorsError,
  writeSafetensors,
  writeSafetensorsFileAtomic,
} from '../src/codec/safetensors.js';
import { DTYPES, Tensor, type DType } from '../src/tensor.js';
import { goldenDir } from './paths.js';

const goldenFiles = readdirSync(goldenDir).filter((f) => f.endsWith('.safetensors')).sort();

const isSafetensorsError = (re: RegExp) => (e: unknown) => e instanceof SafetensorsError && re.test(e.message);

function sample(dtype: DType, shape: number[]): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return Tensor.from(dtype, shape, Array.from({ length: n }, (_, i) => (i % 5) - 2));
}

function assertSameTensors(got: Map<string, Tensor>, want: Map<string, Tensor>, what: string): void {
  assert.equal([...got.keys()].sort(), [...want.keys()].sort(), `${what}: names`);
  for (const [name, w] of want) {
    const g = got.get(name)!;
    assert.is(g.dtype, w.dtype, `${what}: ${name} dtype`);
    assert.equal([...g.shape], [...w.shape], `${what}: ${name} shape`);
    assert.equal(Array.from(g.data as ArrayLike<number>), Array.from(w.data as ArrayLike<number>), `${what}: ${name} data`);
  }
}

/** A file from a raw header (any JSON value, or text) and a data buffer of `data` bytes. */
function raw(header: unknown, data = 0, pad = ''): Uint8Array {
  const json = new TextEncoder().encode((typeof header === 'string' ? header : JSON.stringify(header)) + pad);
  const out = new Uint8Array(8 + json.length + data);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  return out;
}

function entry(dtype: string, shape: unknown, offsets: unknown) {
  return { dtype, shape, data_offsets: offsets };
}

test('golden files: every one reads, and shapes match their metadata', async () => {
  assert.ok(goldenFiles.length >= 6, 'golden files present');
  for (const f of goldenFiles) {
    const { tensors, metadata } = await readSafetensorsFile(join(goldenDir, f));
    const [ep, E, K, D, H] = ['ep', 'num_experts', 'top_k', 'dim', 'hidden'].map((k) => Number(metadata[k]));
    for (const v of [ep, E, K, D, H]) assert.ok(Number.isInteger(v) && v! > 0, `${f}: metadata ${JSON.stringify(metadata)}`);
    const shape = (name: string) => {
      const t = tensors.get(name);
      assert.ok(t, `${f}: ${name} missing`);
      return [...t!.shape];
    };
    assert.equal(shape('experts.up_w'), [E, D, H], `${f}: experts.up_w`);
    assert.equal(shape('experts.down_w'), [E, H, D], `${f}: experts.down_w`);
    assert.is(tensors.has('experts.gate_w'), metadata.activation === 'silu', `${f}: gate_w iff silu`);
    for (let r = 0; r < ep!; r++) {
      const T = shape(`rank${r}.x`)[0]!;
      assert.equal(shape(`rank${r}.x`), [T, D], `${f}: rank${r}.x`);
      assert.equal(shape(`rank${r}.weights`), [T, K], `${f}: rank${r}.weights`);
      assert.equal(shape(`rank${r}.indices`), [T, K], `${f}: rank${r}.indices`);
      assert.is(tensors.get(`rank${r}.indices`)!.dtype, 'i64');
      for (const v of tensors.get(`rank${r}.indices`)!.data as BigInt64Array) assert.ok(v >= 0n && v < BigInt(E!), `${f}: expert id ${v}`);
      assert.equal(shape(`rank${r}.grad_out`), [T, D], `${f}: rank${r}.grad_out`);
      assert.equal(shape(`expected.rank${r}.out`), [T, D], `${f}: expected.rank${r}.out`);
    }
    assert.equal(shape('expected.grad.up_w'), [E, D, H], `${f}: expected.grad.up_w`);
  }
});

test('golden files: read -> write reproduces the Python bytes; read -> write -> read is identical', async () => {
  for (const f of goldenFiles) {
    const bytes = new Uint8Array(await readFile(join(goldenDir, f)));
    const first = readSafetensors(bytes, f);
    const written = writeSafetensors(first.tensors, first.metadata);
    assert.equal(written, bytes, `${f}: bytes`);
    const second = readSafetensors(written, f);
    assertSameTensors(second.tensors, first.tensors, f);
    assert.equal(second.metadata, first.metadata, `${f}: metadata`);
  }
});

test('round trip of every dtype, including empty and 0-d tensors, from a Map or a Record', () => {
  const tensors = new Map<string, Tensor>();
  for (const dtype of DTYPES) {
    tensors.set(`${dtype}.matrix`, sample(dtype, [3, 5]));
    tensors.set(`${dtype}.scalar`, sample(dtype, []));
    tensors.set(`${dtype}.empty`, sample(dtype, [0, 4]));
  }
  tensors.set('__proto__', sample('f32', [1]));
  const metadata = { ep: '4', note: 'ü', __proto__x: 'y' };
  const bytes = writeSafetensors(tensors, metadata);
  const headerLength = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.is((8 + headerLength) % 8, 0, 'data buffer 8-byte aligned');
  const back = readSafetensors(bytes);
  assertSameTensors(back.tensors, tensors, 'map');
  assert.equal(back.metadata, metadata);
  const fromRecord = readSafetensors(writeSafetensors(Object.fromEntries(tensors)));
  assertSameTensors(fromRecord.tensors, tensors, 'record');
  assert.equal(fromRecord.metadata, {});
});

test('decoded tensors are fresh aligned arrays even when file offsets are not aligned', () => {
  const bytes = raw({ a: entry('F16', [1], [0, 2]), b: entry('I64', [2], [2, 18]) }, 18, '   ');
  const dataStart = bytes.length - 18;
  new DataView(bytes.buffer).setBigInt64(dataStart + 2, -5n, true);
  new DataView(bytes.buffer).setBigInt64(dataStart + 10, 7n, true);
  const { tensors } = readSafetensors(bytes);
  const b = tensors.get('b')!;
  assert.equal(Array.from(b.data as BigInt64Array), [-5n, 7n]);
  assert.is.not(b.data.buffer, bytes.buffer);
});

test('validation: framing', () => {
  assert.throws(() => readSafetensors(new Uint8Array(5), 'x.st'), isSafetensorsError(/^x\.st: file is 5 bytes, too short for the 8-byte header length$/));
  const huge = new Uint8Array(16);
  new DataView(huge.buffer).setBigUint64(0, 2n ** 60n, true);
  assert.throws(() => readSafetensors(huge), isSafetensorsError(/^header length 1152921504606846976 runs past the end of the 16-byte file$/));
  const capped = new Uint8Array(8 + 100_000_001);
  new DataView(capped.buffer).setBigUint64(0, 100_000_001n, true);
  assert.throws(() => readSafetensors(capped), isSafetensorsError(/exceeds the 100000000-byte limit/));
  assert.throws(() => readSafetensors(raw('{"a":')), isSafetensorsError(/header is not valid JSON/));
  assert.throws(() => readSafetensors(raw([])), isSafetensorsError(/header is not a JSON object/));
  assert.throws(() => readSafetensors(raw('null')), isSafetensorsError(/header is not a JSON object/));
  const badUtf8 = raw('{"\u00e9":1}');
  badUtf8[10] = 0xff;
  assert.throws(() => readSafetensors(badUtf8), isSafetensorsError(/header is not valid UTF-8/));
});

test('validation: entries, each error naming the file and the tensor', () => {
  const cases: [unknown, number, RegExp][] = [
    [{ 'rank0.x': entry('F32', [4, 8], [0, 96]) }, 96, /^case\.safetensors: tensor 'rank0\.x': data_offsets \[0, 96\] hold 96 bytes but shape \[4, 8\] of F32 needs 128$/],
    [{ a: 3 }, 0, /tensor 'a': entry is 3, not an object/],
    [{ a: entry('U8', [1], [0, 1]) }, 1, /tensor 'a': dtype "U8" is not one of F32, F64, I32, I64, BF16, F16/],
    [{ a: { shape: [1], data_offsets: [0, 4] } }, 4, /tensor 'a': dtype undefined is not one of/],
    [{ a: entry('F32', [-1], [0, 4]) }, 4, /tensor 'a': shape \[-1\] is not a list of non-negative integers/],
    [{ a: entry('F32', [1.5], [0, 4]) }, 4, /shape \[1\.5\] is not a list/],
    [{ a: entry('F32', '4', [0, 4]) }, 4, /shape "4" is not a list/],
    [{ a: entry('F32', [2 ** 53], [0, 4]) }, 4, /shape \[9007199254740992\] is not a list/],
    [{ a: entry('F32', [1], [0]) }, 4, /tensor 'a': data_offsets \[0\] are not two non-negative integers/],
    [{ a: entry('F32', [1], [0, '4']) }, 4, /data_offsets \[0,"4"\] are not two/],
    [{ a: entry('F32', [1], [-4, 0]) }, 4, /data_offsets \[-4,0\] are not two/],
    [{ a: entry('F32', [0], [4, 0]) }, 4, /tensor 'a': data_offsets \[4, 0\] begin after they end/],
    [{ a: entry('F32', [2], [0, 8]) }, 4, /tensor 'a': data_offsets \[0, 8\] run past the 4-byte data buffer/],
    [{ a: entry('F64', [2 ** 40, 2 ** 40], [0, 8]) }, 8, /hold 8 bytes but shape \[1099511627776, 1099511627776\] of F64 needs more than 2\^53 elements/],
    [{ a: entry('F32', [2], [0, 8]), b: entry('F32', [1], [4, 8]) }, 8, /tensor 'b': data_offsets \[4, 8\] overlap tensor 'a' at \[0, 8\]/],
    [{ __metadata__: [] }, 0, /__metadata__ is not an object/],
    [{ __metadata__: { ep: 4 } }, 0, /metadata 'ep' is 4, not a string/],
  ];
  for (const [header, data, re] of cases) {
    assert.throws(() => readSafetensors(raw(header, data), 'case.safetensors'), isSafetensorsError(re), `${JSON.stringify(header)} -> ${re}`);
  }
  // Zero-size tensors may share an offset with anything at its boundary.
  const ok = readSafetensors(raw({ a: entry('F32', [0], [0, 0]), b: entry('F32', [1], [0, 4]), c: entry('I64', [0, 9], [4, 4]) }, 4));
  assert.equal([...ok.tensors.keys()], ['a', 'b', 'c']);
});

test('writer validation', () => {
  assert.throws(() => writeSafetensors({ __metadata__: sample('f32', [1]) }), isSafetensorsError(/reserved for metadata/));
  assert.throws(() => writeSafetensors({ a: [1, 2] as unknown as Tensor }), isSafetensorsError(/tensor 'a' is not a Tensor/));
  assert.throws(() => writeSafetensors({}, { ep: 4 as unknown as string }), isSafetensorsError(/metadata 'ep' is 4, not a string/));
});

test('files: read errors name the path; atomic write leaves only the finished file', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'ep-actors-st-'));
  try {
    const missing = join(dir, 'missing.safetensors');
    let caught: unknown;
    await readSafetensorsFile(missing).catch((e) => (caught = e));
    assert.ok(caught instanceof SafetensorsError && caught.message.startsWith(`${missing}: cannot read`), String(caught));

    const path = join(dir, 'case.safetensors');
    const tensors = { x: sample('f32', [2, 2]), i: sample('i64', [3]) };
    await writeSafetensorsFileAtomic(path, tensors, { ep: '1' });
    await writeSafetensorsFileAtomic(path, tensors, { ep: '2' });
    assert.equal(await readdir(dir), ['case.safetensors']);
    const back = await readSafetensorsFile(path);
    assert.is(back.metadata.ep, '2');
    assertSameTensors(back.tensors, new Map(Object.entries(tensors)), 'file');

    // Renaming over a directory fails: the temporary file must be gone afterwards.
    const blocked = join(dir, 'blocked');
    await mkdir(join(blocked, 'inside'), { recursive: true });
    caught = undefined;
    await writeSafetensorsFileAtomic(blocked, tensors).catch((e) => (caught = e));
    assert.ok(caught instanceof SafetensorsError && caught.message.startsWith(`${blocked}: cannot write`), String(caught));
    assert.equal((await readdir(dir)).sort(), ['blocked', 'case.safetensors']);

    caught = undefined;
    await writeSafetensorsFileAtomic(join(dir, 'no', 'such', 'dir.safetensors'), tensors).catch((e) => (caught = e));
    assert.ok(caught instanceof SafetensorsError, String(caught));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test.run();
