// Staged exchanges: instead of sending its rows inside messages, a rank stages its whole
// send tensor once in memory that every rank worker of the process can read, tells each
// peer where that peer's rows are, and each receiver copies its rows out itself; the
// sender reuses the region once every peer has said it is done. Host SharedArrayBuffers
// back the 'shared' exchange (unless results may live in shared memory: then peers write
// into them, actors/transport.ts); one GPU's memory backs the 'device-copy' exchange
// (src/native/cuda.ts), which is how several ranks share one GPU (NCCL refuses duplicate
// GPUs). Positions, ops and communicators are checked exactly as for message chunks.
import type { ExchangeName } from './exchanges.js';
import { NativeError } from '../src/native/backend.js';
import type { DeviceMemory } from '../src/native/cuda.js';

/** A staged region as a peer receives it: a SharedArrayBuffer, or a device pointer of this process. */
export type StagedHandle = SharedArrayBuffer | bigint;

/**
 * Where a receiver finds one piece of its result: staged by its sender, in this thread, or
 * already placed in the result (a worker-thread peer wrote it there: actors/transport.ts).
 */
export type Piece = { readonly handle: StagedHandle; readonly offset: number; readonly bytes: number } | { readonly local: Uint8Array } | { readonly placed: number };

export interface StagingMemory {
  readonly name: 'shared' | 'device-copy';
  /** Copies `bytes` into memory peers can read and returns its handle. */
  stage(bytes: Uint8Array): StagedHandle;
  /** Fills `out` with the pieces, in order (they add up to its length). */
  gather(out: Uint8Array, pieces: readonly Piece[]): void;
  /** Every peer is done reading the region: it may be reused or freed. */
  unstage(handle: StagedHandle): void;
  /** Whether a value a peer sent can be one of this memory's handles. */
  isHandle(value: unknown): value is StagedHandle;
}

/** Regions kept for reuse: allocating multi-MiB shared buffers per exchange costs page faults. */
const FREE_REGIONS = 8;

/** Fills `out` with host pieces, in order, skipping those already placed in it. */
export function gatherHost(out: Uint8Array, pieces: readonly Piece[]): void {
  let at = 0;
  for (const p of pieces) {
    if ('placed' in p) {
      at += p.placed;
      continue;
    }
    const src = 'local' in p ? p.local : new Uint8Array(p.handle as SharedArrayBuffer, p.offset, p.bytes);
    out.set(src, at);
    at += src.byteLength;
  }
}

/** Host shared memory: one copy in (stage), one copy out (gather) straight into the result. */
export function sharedMemory(): StagingMemory {
  const free: SharedArrayBuffer[] = [];
  return {
    name: 'shared',
    stage(bytes) {
      const i = free.findIndex((b) => b.byteLength >= bytes.byteLength && b.byteLength <= 2 * bytes.byteLength + 64);
      const region = i >= 0 ? free.splice(i, 1)[0]! : new SharedArrayBuffer(bytes.byteLength);
      new Uint8Array(region, 0, bytes.byteLength).set(bytes);
      return region;
    },
    gather: gatherHost,
    unstage(handle) {
      if (handle instanceof SharedArrayBuffer && free.length < FREE_REGIONS && !free.includes(handle)) free.push(handle);
    },
    isHandle: (v): v is SharedArrayBuffer => v instanceof SharedArrayBuffer,
  };
}

/**
 * The device-copy exchange's memory: a rank stages its send rows in
 * device memory; a receiver copies its pieces device-to-device into one receive buffer and
 * downloads that into its result. Device pointers are valid in every worker thread of the
 * process (one CUDA context per device), and every call here completes before it returns,
 * so a peer's acknowledgement means its copies are finished.
 */
export function deviceCopyMemory(a: DeviceMemory): StagingMemory {
  const pointer = (h: StagedHandle): bigint => {
    if (typeof h !== 'bigint') throw new NativeError('the device-copy exchange got a region that is not a device pointer', 'BAD_ARGUMENT');
    return h;
  };
  return {
    name: 'device-copy',
    stage(bytes) {
      const p = a.alloc(bytes.byteLength);
      try {
        if (bytes.byteLength > 0) a.upload(p, bytes);
      } catch (err) {
        a.free(p);
        throw err;
      }
      return p;
    },
    gather(out, pieces) {
      const recv = a.alloc(out.byteLength);
      try {
        let at = 0;
        for (const piece of pieces) {
          if ('placed' in piece) throw new NativeError('the device-copy exchange got a piece placed by a peer thread', 'BAD_ARGUMENT');
          const bytes = 'local' in piece ? piece.local.byteLength : piece.bytes;
          if (bytes > 0) {
            if ('local' in piece) a.upload(recv + BigInt(at), piece.local);
            else a.copy(recv + BigInt(at), pointer(piece.handle) + BigInt(piece.offset), bytes);
          }
          at += bytes;
        }
        if (out.byteLength > 0) a.download(recv, out);
      } finally {
        a.free(recv);
      }
    },
    unstage: (h) => a.free(pointer(h)),
    isHandle: (v): v is bigint => typeof v === 'bigint',
  };
}

/** The staging memory of a staged exchange; null for the exchanges that do not stage. */
export async function stagingMemory(exchange: ExchangeName): Promise<StagingMemory | null> {
  if (exchange === 'shared') return sharedMemory();
  if (exchange === 'device-copy') return deviceCopyMemory((await import('../src/native/cuda.js')).deviceMemory());
  return null;
}
