import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Tensor, bf16ToF32, f16ToF32, f32ToBf16, f32ToF16, gatherRows, i64FromIndexArray, relativeError, toIndexArray, TensorError } from '../src/tensor.js';

test('bf16 rounds to nearest even, including ties', () => {
  // 1 + 2^-8 lies exactly halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
  assert.is(bf16ToF32(f32ToBf16(1 + 2 ** -8)), 1);
  // 1 + 3*2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6 (even): rounds up to 1+2^-6.
  assert.is(bf16ToF32(f32ToBf16(1 + 3 * 2 ** -8)), 1 + 2 ** -6);
  assert.is(bf16ToF32(f32ToBf16(-2.5)), -2.5);
  assert.ok(Number.isNaN(bf16ToF32(f32ToBf16(NaN))));
  assert.is(bf16ToF32(f32ToBf16(Infinity)), Infinity);
});

test('f16 round trips every finite half exactly and rounds ties to even', () => {
  for (let h = 0; h < 0x10000; h++) {
    const v = f16ToF32(h);
    if (Number.isNaN(v)) continue;
    const back = f32ToF16(v);
    if (back !== h && !(v === 0 && (back & 0x7fff) === 0)) assert.unreachable(`half ${h.toString(16)} -> ${v} -> ${back.toString(16)}`);
  }
  // 2049 lies halfway between 2048 and 2050 (f16 spacing 2 there): ties to even (2048).
  assert.is(f16ToF32(f32ToF16(2049)), 2048);
  assert.is(f16ToF32(f32ToF16(2051)), 2052);
  assert.is(f16ToF32(f32ToF16(65520)), Infinity); // rounds past the largest half
  assert.is(f16ToF32(f32ToF16(2 ** -25)), 0); // ties to even at the smallest subnormal
  assert.is(f16ToF32(f32ToF16(3 * 2 ** -25)), 2 ** -23);
});

test('shape and data length must agree', () => {
  assert.throws(() => new Tensor('f32', [2, 3], new Float32Array(5)), (e: unknown) => e instanceof TensorError);
  assert.throws(() => new Tensor('f32', [2], new Float64Array(2) as never), (e: unknown) => e instanceof TensorError);
});

test('gatherRows permutes rows and rejects out-of-range indices', () => {
  const t = Tensor.from('f32', [3, 2], [0, 1, 10, 11, 20, 21]);
  assert.equal(Array.from(gatherRows(t, [2, 0, 2]).data), [20, 21, 0, 1, 20, 21]);
  assert.throws(() => gatherRows(t, [3]), /outside/);
});

test('toIndexArray rejects values beyond 32 bits', () => {
  assert.equal(Array.from(toIndexArray(Tensor.from('i64', [2], [5, -1]), 'idx')), [5, -1]);
  assert.throws(() => toIndexArray(Tensor.from('i64', [1], [2n ** 40n]), 'idx'), /idx\[0\]/);
  // Read as word pairs: a value whose low word alone would pass, at an offset into its buffer.
  for (const bad of [2n ** 31n, -(2n ** 31n) - 1n, 2n ** 32n + 5n, -(2n ** 32n), -1n + 2n ** 32n]) {
    const held = new BigInt64Array([0n, 7n, bad]);
    const t = new Tensor('i64', [2], held.subarray(1));
    assert.throws(() => toIndexArray(t, 'ids'), new RegExp(`ids\\[1\\] = ${bad} is out of the 32-bit range`));
  }
  const edges = [0, 1, -1, 2 ** 31 - 1, -(2 ** 31), 12345, -777];
  assert.equal(Array.from(toIndexArray(Tensor.from('i64', [edges.length], edges), 'idx')), edges);
});

test('i64FromIndexArray writes the i64 of every 32-bit integer, as BigInt64Array would', () => {
  const values = Int32Array.from([0, 1, -1, 2 ** 31 - 1, -(2 ** 31), 99, -100]);
  const t = i64FromIndexArray(values, [values.length, 1]);
  assert.equal(t.shape, [values.length, 1]);
  assert.equal(Array.from(t.data as BigInt64Array), Array.from(values, BigInt));
  assert.equal(Array.from(toIndexArray(t, 'back')), Array.from(values));
});

test('relativeError is zero for equal tensors and infinite for shape mismatch', () => {
  const a = Tensor.from('f32', [2], [1, 2]);
  assert.is(relativeError(a, a), 0);
  assert.is(relativeError(a, Tensor.from('f32', [1, 2], [1, 2])), Infinity);
});

test.run();
