// Step buffers a rank reuses. An EP step allocates tens of MB of short-lived row buffers per
// rank (gathered rows, saved activations, gradients on their way out); fresh ones cost page
// faults and, as V8 external memory, frequent garbage collections (7% of a worker-rank
// step's CPU). The EP layer and the expert backends take them here and give back what they
// know is dead, so the next layer or step reuses the memory.
import { ELEMENT_SIZE, STORAGE_CTOR, Tensor, UNFILLED_MIN_BYTES, numel, unfilledStorage, type DType, type StorageOf } from '../tensor.js';

/** More free bytes than this are left to the garbage collector. */
const MAX_FREE_BYTES = 256 * 1024 * 1024;
/** A free buffer serves a request of at least half its size. */
const MAX_SLACK = 2;

export class ScratchPool {
  /** Buffers this pool created: only these come back (a foreign tensor may share its memory). */
  readonly #mine = new WeakSet<ArrayBuffer>();
  readonly #free = new Set<ArrayBuffer>();
  #freeBytes = 0;
  readonly #poison: boolean;

  /** poison: fill every buffer given back with NaN bytes, so a read after the give shows (tests). */
  constructor(opts: { poison?: boolean } = {}) {
    this.#poison = opts.poison ?? false;
  }

  /** A tensor whose contents are unspecified (as Tensor.unfilled): the caller writes every element before reading. */
  take<D extends DType>(dtype: D, shape: readonly number[]): Tensor<D> {
    const n = numel(shape);
    const bytes = n * ELEMENT_SIZE[dtype];
    if (bytes < UNFILLED_MIN_BYTES) return Tensor.unfilled(dtype, shape); // small: not worth keeping
    let buffer: ArrayBuffer | undefined;
    for (const b of this.#free) {
      if (b.byteLength >= bytes && b.byteLength <= MAX_SLACK * bytes && (!buffer || b.byteLength < buffer.byteLength)) buffer = b;
    }
    if (buffer) {
      this.#free.delete(buffer);
      this.#freeBytes -= buffer.byteLength;
    } else {
      buffer = unfilledStorage('i32', Math.ceil(bytes / 4)).buffer as ArrayBuffer;
      this.#mine.add(buffer);
    }
    const Ctor = STORAGE_CTOR[dtype] as unknown as new (b: ArrayBuffer, offset: number, n: number) => StorageOf[D];
    return new Tensor(dtype, shape, new Ctor(buffer, 0, n));
  }

  /** Tensors (or their storage) nothing will read again; those taken here serve later takes (others are ignored). */
  give(...tensors: readonly (Tensor | ArrayBufferView | null | undefined)[]): void {
    for (const t of tensors) {
      const buffer = t instanceof Tensor ? t.data.buffer : t?.buffer;
      if (!(buffer instanceof ArrayBuffer) || !this.#mine.has(buffer) || this.#free.has(buffer)) continue;
      if (this.#freeBytes + buffer.byteLength > MAX_FREE_BYTES) continue;
      if (this.#poison) new Uint8Array(buffer).fill(0xff);
      this.#free.add(buffer);
      this.#freeBytes += buffer.byteLength;
    }
  }

  /** Bytes held for reuse. */
  get freeBytes(): number {
    return this.#freeBytes;
  }
}

/** A pool's take, or a fresh unfilled tensor without one. */
export function takeUnfilled<D extends DType>(pool: ScratchPool | undefined, dtype: D, shape: readonly number[]): Tensor<D> {
  return pool ? pool.take(dtype, shape) : Tensor.unfilled(dtype, shape);
}
