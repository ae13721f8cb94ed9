// A small contiguous row-major tensor: the dtypes the EP layer and its files speak, and
// the few ops the layer needs. 16-bit floats are stored as raw uint16 bit patterns and
// converted with exact round-to-nearest-even.
import { Buffer } from 'node:buffer';

export type DType = 'f32' | 'f64' | 'i32' | 'i64' | 'bf16' | 'f16';
export type FloatDType = 'f32' | 'f64';

export interface StorageOf {
  f32: Float32Array;
  f64: Float64Array;
  i32: Int32Array;
  i64: BigInt64Array;
  bf16: Uint16Array;
  f16: Uint16Array;
}
export type Storage = StorageOf[DType];

export const DTYPES: readonly DType[] = ['f32', 'f64', 'i32', 'i64', 'bf16', 'f16'];

/** Bytes per element of each dtype. */
export const ELEMENT_SIZE: Record<DType, number> = { f32: 4, f64: 8, i32: 4, i64: 8, bf16: 2, f16: 2 };

/** The typed array that stores each dtype (16-bit floats as raw bit patterns). */
export const STORAGE_CTOR = {
  f32: Float32Array,
  f64: Float64Array,
  i32: Int32Array,
  i64: BigInt64Array,
  bf16: Uint16Array,
  f16: Uint16Array,
} as const;

export class TensorError extends Error {
  override name = 'TensorError';
}

export class Tensor<D extends DType = DType> {
  readonly dtype: D;
  readonly shape: readonly number[];
  readonly data: StorageOf[D];

  constructor(dtype: D, shape: readonly number[], data: StorageOf[D]) {
    const n = numel(shape);
    if (data.length !== n) {
      throw new TensorError(`shape [${shape.join(', ')}] holds ${n} elements but the ${dtype} data has ${data.length}`);
    }
    if (!(data instanceof STORAGE_CTOR[dtype])) throw new TensorError(`data for dtype ${dtype} must be a ${STORAGE_CTOR[dtype].name}`);
    this.dtype = dtype;
    this.shape = Object.freeze([...shape]);
    this.data = data;
  }

  static zeros<D extends DType>(dtype: D, shape: readonly number[]): Tensor<D> {
    return new Tensor(dtype, shape, new STORAGE_CTOR[dtype](numel(shape)) as StorageOf[D]);
  }

  /**
   * A tensor whose every element the caller writes before anything reads it. Large ones skip
   * the zero fill: the EP step allocates tens of MB of such buffers per rank, and zeroing
   * them was 8% of a worker-rank step's CPU.
   */
  static unfilled<D extends DType>(dtype: D, shape: readonly number[]): Tensor<D> {
    return new Tensor(dtype, shape, unfilledStorage(dtype, numel(shape)));
  }

  static from<D extends DType>(dtype: D, shape: readonly number[], values: ArrayLike<number> | ArrayLike<bigint>): Tensor<D> {
    const t = Tensor.zeros(dtype, shape);
    if (dtype === 'i64') {
      const out = t.data as BigInt64Array;
      for (let i = 0; i < out.length; i++) out[i] = BigInt((values as ArrayLike<number | bigint>)[i]!);
    } else if (dtype === 'bf16' || dtype === 'f16') {
      const enc = dtype === 'bf16' ? f32ToBf16 : f32ToF16;
      const out = t.data as Uint16Array;
      for (let i = 0; i < out.length; i++) out[i] = enc(Number((values as ArrayLike<number>)[i]));
    } else {
      (t.data as Float32Array).set(values as ArrayLike<number>);
    }
    return t;
  }

  get byteLength(): number {
    return this.data.byteLength;
  }

  /** Rows are the first dimension; a row holds numel / shape[0] elements. */
  get rowSize(): number {
    let n = 1; // the constructor checked every dimension
    for (let i = 1; i < this.shape.length; i++) n *= this.shape[i]!;
    return n;
  }
}

/** Below this many bytes a zero fill costs less than the allocation itself. */
export const UNFILLED_MIN_BYTES = 64 * 1024;

/** Storage for n elements with unspecified contents (see Tensor.unfilled). */
export function unfilledStorage<D extends DType>(dtype: D, n: number): StorageOf[D] {
  const bytes = n * ELEMENT_SIZE[dtype];
  if (bytes < UNFILLED_MIN_BYTES) return new STORAGE_CTOR[dtype](n) as StorageOf[D];
  return storageOver(dtype, unfilledBuffer(bytes), n);
}

/** A buffer of its own of `bytes` (at least 8), not zero-filled (Node's allocUnsafeSlow: offset 0, malloc-aligned). */
export function unfilledBuffer(bytes: number): ArrayBuffer {
  return Buffer.allocUnsafeSlow(Math.max(bytes, 8)).buffer as ArrayBuffer;
}

/** n elements of `dtype` over the start of `buffer`, which must hold them. */
export function storageOver<D extends DType>(dtype: D, buffer: ArrayBufferLike, n: number): StorageOf[D] {
  return new (STORAGE_CTOR[dtype] as unknown as new (b: ArrayBufferLike, offset: number, n: number) => StorageOf[D])(buffer, 0, n);
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) throw new TensorError(`invalid dimension ${d} in shape [${shape.join(', ')}]`);
    n *= d;
  }
  return n;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** Any tensor as f64 (a copy). */
export function toFloat64(t: Tensor): Tensor<'f64'> {
  const out = new Float64Array(t.data.length);
  switch (t.dtype) {
    case 'i64': {
      const d = t.data as BigInt64Array;
      for (let i = 0; i < d.length; i++) out[i] = Number(d[i]);
      break;
    }
    case 'bf16':
    case 'f16': {
      const dec = t.dtype === 'bf16' ? bf16ToF32 : f16ToF32;
      const d = t.data as Uint16Array;
      for (let i = 0; i < d.length; i++) out[i] = dec(d[i]!);
      break;
    }
    default:
      out.set(t.data as Float32Array);
  }
  return new Tensor('f64', t.shape, out);
}


/** Integer tensor (i32 or i64) as plain numbers, checked to be safe integers. */
export function toIndexArray(t: Tensor, what: string): Int32Array {
  if (t.dtype !== 'i32' && t.dtype !== 'i64') throw new TensorError(`${what} must be i32 or i64, got ${t.dtype}`);
  const out = new Int32Array(t.data.length);
  if (t.dtype === 'i32') out.set(t.data as Int32Array);
  else {
    // Read each i64 as two 32-bit words: reading it as a BigInt allocates one per element,
    // thousands per EP layer. It fits when the high word is the low word's sign.
    const d = t.data as BigInt64Array;
    const words = new Int32Array(d.buffer, d.byteOffset, 2 * d.length);
    for (let i = 0; i < d.length; i++) {
      const lo = words[2 * i + LOW]!;
      if (words[2 * i + 1 - LOW] !== lo >> 31) throw new TensorError(`${what}[${i}] = ${d[i]} is out of the 32-bit range`);
      out[i] = lo;
    }
  }
  return out;
}

/** Index of an i64's low 32-bit word in a pair of words, for this machine's byte order. */
const LOW = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1 ? 0 : 1;

/** An i64 tensor of 32-bit integers (written as word pairs: no BigInt per element). */
export function i64FromIndexArray(values: Int32Array, shape: readonly number[] = [values.length]): Tensor<'i64'> {
  const d = new BigInt64Array(values.length);
  const words = new Int32Array(d.buffer);
  for (let i = 0; i < values.length; i++) {
    const v = values[i]!;
    words[2 * i + LOW] = v;
    words[2 * i + 1 - LOW] = v >> 31;
  }
  return new Tensor('i64', shape, d);
}

/** Rows of a 2-D (or higher) tensor in a new order: out[i] = t[index[i]]. */
export function gatherRows<D extends DType>(t: Tensor<D>, index: ArrayLike<number>): Tensor<D> {
  const rs = t.rowSize;
  const rows = t.shape[0] ?? 0;
  const out = Tensor.zeros(t.dtype, [index.length, ...t.shape.slice(1)]);
  const src = t.data as Float32Array;
  const dst = out.data as Float32Array;
  for (let i = 0; i < index.length; i++) {
    const r = index[i]!;
    if (r < 0 || r >= rows) throw new TensorError(`row index ${r} outside [0, ${rows})`);
    dst.set(src.subarray(r * rs, (r + 1) * rs), i * rs);
  }
  return out;
}

/** Relative error ||got - want|| / ||want|| (0 when both are zero). */
export function relativeError(got: Tensor, want: Tensor): number {
  if (!sameShape(got.shape, want.shape)) return Infinity;
  const g = toFloat64(got).data;
  const w = toFloat64(want).data;
  let num = 0;
  let den = 0;
  for (let i = 0; i < g.length; i++) {
    const d = g[i]! - w[i]!;
    num += d * d;
    den += w[i]! * w[i]!;
  }
  if (den === 0) return num === 0 ? 0 : Infinity;
  return Math.sqrt(num / den);
}

// ---- 16-bit floats: exact round-to-nearest-even ----

const f32Scratch = new Float32Array(1);
const u32Scratch = new Uint32Array(f32Scratch.buffer);

export function f32ToBf16(x: number): number {
  f32Scratch[0] = x;
  const bits = u32Scratch[0]!;
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x007fffff) !== 0) return ((bits >>> 16) | 0x0040) & 0xffff; // quiet NaN
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

export function bf16ToF32(h: number): number {
  u32Scratch[0] = (h & 0xffff) << 16;
  return f32Scratch[0]!;
}

export function f32ToF16(x: number): number {
  f32Scratch[0] = x; // round to f32 first: f16 conversion is defined from the f32 value
  const bits = u32Scratch[0]!;
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  let mant = bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00; // overflow to infinity
  if (e <= 0) {
    if (e < -10) return sign; // underflows to zero even after rounding
    mant |= 0x800000; // implicit leading one
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    const rest = mant & ((1 << shift) - 1);
    let h = mant >>> shift;
    if (rest > half || (rest === half && (h & 1) === 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1)) h++; // may carry into the exponent: still correct
  return sign | h;
}

export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}
