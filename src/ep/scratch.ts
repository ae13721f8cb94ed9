// Buffers reused instead of allocated afresh. An EP step allocates tens of MB of short-lived
// row buffers per rank (gathered rows, saved activations, gradients on their way out), and a
// communicator a result per exchange; fresh ones cost page faults and, as V8 external memory,
// frequent garbage collections (7% of a worker-rank step's CPU). Users take buffers here and
// give back what they know is dead, so the next layer, step or exchange reuses the memory.
import { ELEMENT_SIZE, Tensor, UNFILLED_MIN_BYTES, numel, storageOver, unfilledBuffer, type DType } from '../tensor.js';

/** A free buffer serves a request of at least half its size. */
const MAX_SLACK = 2;

export interface ScratchPoolOptions {
  /** Fill every buffer given back with NaN bytes, so a read after the give shows (tests). */
  readonly poison?: boolean;
  /** Smaller tensors are allocated plainly and not kept (default: where a zero fill costs less than keeping them). */
  readonly minBytes?: number;
  /** At most this many free bytes and free buffers are kept; more are left to the garbage collector. */
  readonly maxFreeBytes?: number;
  readonly maxFreeBuffers?: number;
}

export class ScratchPool {
  /** Buffers this pool created: only these come back (a foreign tensor may share its memory). */
  readonly #mine = new WeakSet<ArrayBufferLike>();
  readonly #free = new Set<ArrayBufferLike>();
  #freeBytes = 0;
  readonly #poison: boolean;
  readonly #minBytes: number;
  readonly #maxFreeBytes: number;
  readonly #maxFreeBuffers: number;

  constructor(opts: ScratchPoolOptions = {}) {
    this.#poison = opts.poison ?? false;
    this.#minBytes = opts.minBytes ?? UNFILLED_MIN_BYTES;
    this.#maxFreeBytes = opts.maxFreeBytes ?? 256 * 1024 * 1024;
    this.#maxFreeBuffers = opts.maxFreeBuffers ?? Infinity;
  }

  /**
   * A tensor whose contents are unspecified (as Tensor.unfilled): the caller writes every
   * element before reading. `shared`: in a SharedArrayBuffer, which other threads may write.
   */
  take<D extends DType>(dtype: D, shape: readonly number[], shared = false): Tensor<D> {
    const n = numel(shape);
    const bytes = n * ELEMENT_SIZE[dtype];
    if (bytes < this.#minBytes && !shared) return Tensor.unfilled(dtype, shape); // small: not worth keeping
    let buffer: ArrayBufferLike | undefined;
    for (const b of this.#free) {
      if (b instanceof SharedArrayBuffer === shared && b.byteLength >= bytes && b.byteLength <= MAX_SLACK * bytes && (!buffer || b.byteLength < buffer.byteLength)) buffer = b;
    }
    if (buffer) {
      this.#free.delete(buffer);
      this.#freeBytes -= buffer.byteLength;
    } else {
      buffer = shared ? new SharedArrayBuffer(Math.max(bytes, 8)) : unfilledBuffer(bytes);
      this.#mine.add(buffer);
    }
    return new Tensor(dtype, shape, storageOver(dtype, buffer, n));
  }

  /** Tensors (or their storage) nothing will read again; those taken here serve later takes (others are ignored). */
  give(...tensors: readonly (Tensor | ArrayBufferView | null | undefined)[]): void {
    for (const t of tensors) {
      const buffer = t instanceof Tensor ? t.data.buffer : t?.buffer;
      if (!buffer || !this.#mine.has(buffer) || this.#free.has(buffer)) continue;
      if (this.#freeBytes + buffer.byteLength > this.#maxFreeBytes || this.#free.size >= this.#maxFreeBuffers) continue;
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
