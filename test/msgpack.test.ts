import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { encode as libEncode, ExtData } from '@msgpack/msgpack';
import { CodecError, decodeMessage, encodeMessage, TENSOR_EXT_TYPES } from '../src/codec/msgpack.js';
import { DTYPES, ELEMENT_SIZE, Tensor, type DType } from '../src/tensor.js';

const isCodecError = (re: RegExp) => (e: unknown) => e instanceof CodecError && re.test(e.message);

function sample(dtype: DType, shape: number[]): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  return Tensor.from(dtype, shape, Array.from({ length: n }, (_, i) => (i % 7) - 3 + (dtype.startsWith('i') ? 0 : 0.5)));
}

function assertSameTensor(got: unknown, want: Tensor, what: string): void {
  assert.ok(got instanceof Tensor, `${what}: not a Tensor`);
  const t = got as Tensor;
  assert.is(t.dtype, want.dtype, `${what}: dtype`);
  assert.equal([...t.shape], [...want.shape], `${what}: shape`);
  assert.equal(Array.from(t.data as ArrayLike<number>), Array.from(want.data as ArrayLike<number>), `${what}: data`);
}

/** The message copied to `offset` bytes into a larger buffer. */
function placeAt(message: Uint8Array, offset: number): Uint8Array {
  const big = new Uint8Array(message.length + offset + 8);
  big.set(message, offset);
  return big.subarray(offset, offset + message.length);
}

/** A message holding one extension of the given type and raw payload. */
function extMessage(type: number, payload: number[]): Uint8Array {
  return libEncode(new ExtData(type, new Uint8Array(payload)));
}

test('ext type ids: one per dtype, distinct, in the application range', () => {
  const ids = DTYPES.map((d) => TENSOR_EXT_TYPES[d]);
  assert.is(new Set(ids).size, DTYPES.length);
  for (const id of ids) assert.ok(id >= 0 && id <= 127);
});

test('round trip of every dtype, including empty and 0-d tensors', () => {
  for (const dtype of DTYPES) {
    for (const shape of [[2, 3], [5], [], [0], [3, 0, 2], [1, 1, 1, 4]]) {
      const t = sample(dtype, shape);
      assertSameTensor(decodeMessage(encodeMessage(t)), t, `${dtype} [${shape}]`);
    }
  }
});

test('special values survive bit for bit', () => {
  const f = new Tensor('f32', [4], new Float32Array([NaN, -0, Infinity, 1e-45]));
  const back = decodeMessage(encodeMessage(f)) as Tensor<'f32'>;
  assert.equal(new Uint8Array(back.data.buffer, back.data.byteOffset, 16), new Uint8Array(f.data.buffer));
  const i = new Tensor('i64', [2], new BigInt64Array([-(2n ** 63n), 2n ** 63n - 1n]));
  assert.equal(Array.from((decodeMessage(encodeMessage(i)) as Tensor<'i64'>).data), [-(2n ** 63n), 2n ** 63n - 1n]);
  const h = new Tensor('bf16', [3], new Uint16Array([0x7fc1, 0x8000, 0xffff]));
  assert.equal(Array.from((decodeMessage(encodeMessage(h)) as Tensor<'bf16'>).data), [0x7fc1, 0x8000, 0xffff]);
});

test('nested messages: tensors inside maps and arrays next to other values', () => {
  const x = sample('f32', [3, 4]);
  const idx = sample('i64', [3, 2]);
  const msg = {
    comm: 'ep',
    position: 7,
    op: 'all_to_all',
    big: 2 ** 40,
    neg: -123456789,
    ratio: 0.1,
    flags: [true, false, null],
    when: new Date(1234567),
    raw: new Uint8Array([1, 2, 3]),
    chunks: [{ rank: 0, x, idx }, { rank: 1, x: sample('bf16', [1]), idx: sample('i32', [0]) }],
    name: 'é, 漢字 and 🙂',
  };
  const back = decodeMessage(encodeMessage(msg)) as typeof msg;
  assert.is(back.comm, 'ep');
  assert.is(back.position, 7);
  assert.is(back.big, 2 ** 40);
  assert.is(back.neg, -123456789);
  assert.is(back.ratio, 0.1);
  assert.equal(back.flags, [true, false, null]);
  assert.is(back.when.getTime(), 1234567);
  assert.equal(Array.from(back.raw), [1, 2, 3]);
  assert.is(back.name, msg.name);
  assertSameTensor(back.chunks[0]!.x, x, 'chunks[0].x');
  assertSameTensor(back.chunks[0]!.idx, idx, 'chunks[0].idx');
  assertSameTensor(back.chunks[1]!.x, msg.chunks[1]!.x, 'chunks[1].x');
  assertSameTensor(back.chunks[1]!.idx, msg.chunks[1]!.idx, 'chunks[1].idx');
});

test('values without tensors encode exactly as plain msgpack', () => {
  for (const v of [null, 1, -1, 2 ** 40, 1.5, 'abc', [1, [2, { a: 'b' }]], { x: new Uint8Array([9]), d: new Date(0) }]) {
    assert.equal(encodeMessage(v), libEncode(v));
  }
});

test('each message owns an exact-size buffer, and the encoder reuse does not clobber it', () => {
  const a = encodeMessage({ t: sample('f64', [4]) });
  const copy = a.slice();
  encodeMessage({ t: sample('i32', [100]), s: 'x'.repeat(5000) });
  assert.is(a.byteOffset, 0);
  assert.is(a.buffer.byteLength, a.length);
  assert.equal(a, copy);
});

test('tensor data is aligned to its element size inside the message', () => {
  // Odd-length strings between tensors push each one to a different raw offset.
  const parts: unknown[] = [];
  for (const dtype of DTYPES) parts.push('a'.repeat(parts.length + 1), sample(dtype, [3]));
  const message = encodeMessage(parts);
  const back = decodeMessage(message) as unknown[];
  for (let i = 1; i < back.length; i += 2) {
    const t = back[i] as Tensor;
    assert.is(t.data.buffer, message.buffer, `${t.dtype} is a view`);
    assert.is(t.data.byteOffset % ELEMENT_SIZE[t.dtype], 0, `${t.dtype} aligned`);
  }
});

test('decoding gives a view when the message is aligned and a copy when it is not', () => {
  for (const dtype of DTYPES) {
    const t = sample(dtype, [2, 5]);
    const message = encodeMessage({ t });
    for (let offset = 0; offset < 8; offset++) {
      const placed = placeAt(message, offset);
      const got = (decodeMessage(placed) as { t: Tensor }).t;
      assertSameTensor(got, t, `${dtype} at offset ${offset}`);
      const aligned = offset % ELEMENT_SIZE[dtype] === 0;
      assert.is(got.data.buffer === placed.buffer, aligned, `${dtype} at offset ${offset}: view iff aligned`);
      assert.is(got.data.byteOffset % ELEMENT_SIZE[dtype], 0);
    }
  }
});

test('a zero-copy tensor aliases its message', () => {
  const message = encodeMessage(Tensor.from('f32', [1], [1]));
  const got = decodeMessage(message) as Tensor<'f32'>;
  new Float32Array(message.buffer, got.data.byteOffset, 1)[0] = 2;
  assert.is(got.data[0], 2);
});

test('with copyTensors, every tensor is a copy: the message may be overwritten at once', () => {
  for (const dtype of DTYPES) {
    const t = sample(dtype, [3, 2]);
    for (let offset = 0; offset < 8; offset++) {
      const placed = placeAt(encodeMessage({ t, at: [t] }), offset);
      const got = decodeMessage(placed, true) as { t: Tensor; at: Tensor[] };
      placed.fill(0xff);
      for (const x of [got.t, got.at[0]]) {
        assert.is.not(x!.data.buffer, placed.buffer, `${dtype} at offset ${offset}: a copy`);
        assertSameTensor(x, t, `${dtype} at offset ${offset}, message overwritten`);
      }
    }
  }
  // The next plain decode gives views again.
  const message = encodeMessage(Tensor.from('f32', [1], [1]));
  assert.is((decodeMessage(message) as Tensor).data.buffer, message.buffer);
});

// Tensor payload: u8 ndim | ndim x u32 LE dims | u8 pad | pad zeros | data.
test('validation: tensor extension payloads', () => {
  const f32 = TENSOR_EXT_TYPES.f32;
  assert.throws(() => decodeMessage(extMessage(5, [0, 0])), isCodecError(/unknown msgpack extension type 5/));
  assert.throws(() => decodeMessage(extMessage(f32, [])), isCodecError(/f32 tensor extension \(0 bytes\): too short for a tensor header/));
  assert.throws(() => decodeMessage(extMessage(f32, [33, ...new Array(140).fill(0)])), isCodecError(/33 dimensions, more than 32/));
  assert.throws(() => decodeMessage(extMessage(f32, [2, 1, 0, 0, 0])), isCodecError(/too short for the header of a 2-d tensor/));
  assert.throws(() => decodeMessage(extMessage(f32, [1, 1, 0, 0, 0, 4, 0, 0, 0, 0])), isCodecError(/padding 4 is not below the element size 4/));
  assert.throws(() => decodeMessage(extMessage(f32, [1, 1, 0, 0, 0, 3, 0])), isCodecError(/too short for its 3 padding bytes/));
  assert.throws(() => decodeMessage(extMessage(f32, [1, 1, 0, 0, 0, 1, 9, 0, 0, 0, 0])), isCodecError(/padding bytes are not zero/));
  assert.throws(
    () => decodeMessage(extMessage(f32, [1, 4, 0, 0, 0, 0, ...new Array(8).fill(0)])),
    isCodecError(/shape \[4\] needs 16 bytes of data but it holds 8 bytes/),
  );
  assert.throws(
    () => decodeMessage(extMessage(TENSOR_EXT_TYPES.i64, [2, 255, 255, 255, 255, 255, 255, 255, 255, 0])),
    isCodecError(/shape \[4294967295, 4294967295\] needs more than 2\^53 elements of data but it holds 0 bytes/),
  );
  // A 0-d tensor needs exactly one element.
  assert.throws(() => decodeMessage(extMessage(TENSOR_EXT_TYPES.bf16, [0, 0])), isCodecError(/shape \[\] needs 2 bytes/));
  // Zero dimensions make any other dimension acceptable with no data.
  const empty = decodeMessage(extMessage(f32, [2, 0, 0, 0, 0, 255, 255, 255, 255, 0])) as Tensor;
  assert.equal([...empty.shape], [0, 4294967295]);
});

test('validation: malformed msgpack is a CodecError', () => {
  const good = encodeMessage({ t: sample('f32', [4]) });
  assert.throws(() => decodeMessage(good.subarray(0, good.length - 1)), isCodecError(/invalid message/));
  assert.throws(() => decodeMessage(new Uint8Array()), isCodecError(/invalid message \(0 bytes\)/));
  assert.throws(() => decodeMessage(new Uint8Array([0xc1])), isCodecError(/invalid message/));
  assert.throws(() => decodeMessage(new Uint8Array([1, 2])), isCodecError(/invalid message/));
  assert.throws(() => decodeMessage(new Uint8Array([0x81, 0xc0, 1])), isCodecError(/invalid message/));
  assert.throws(() => decodeMessage([1] as unknown as Uint8Array), isCodecError(/must be a Uint8Array/));
});

test('validation: lengths claimed beyond the message fail fast', () => {
  const claims = [
    [0xdd, 0x80, 0, 0, 0], // array of 2^31
    [0xdf, 0xff, 0xff, 0xff, 0xff], // map of 2^32-1
    [0xdb, 0xff, 0xff, 0xff, 0xff], // str of 2^32-1
    [0xc6, 0x7f, 0xff, 0xff, 0xff], // bin of 2^31-1
    [0xc9, 0xff, 0xff, 0xff, 0xff, TENSOR_EXT_TYPES.f64], // ext of 2^32-1
  ];
  for (const claim of claims) {
    const t0 = performance.now();
    assert.throws(() => decodeMessage(new Uint8Array(claim)), isCodecError(/invalid message/));
    assert.ok(performance.now() - t0 < 100, `claim ${claim} took too long`);
  }
});

test('encode errors are CodecErrors', () => {
  assert.throws(() => encodeMessage({ v: 1n }), isCodecError(/cannot encode message/));
  const deep = Tensor.zeros('f32', new Array(33).fill(1));
  assert.throws(() => encodeMessage([deep]), isCodecError(/33 dimensions/));
  const wide = Tensor.zeros('f32', [0, 2 ** 32]);
  assert.throws(() => encodeMessage(wide), isCodecError(/exceeds 2\^32-1/));
});

test.run();
