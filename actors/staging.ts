// Staged exchanges: instead of sending its rows inside messages, a rank stages its whole
// send tensor once in memory that every rank worker of the process can read, tells each
// peer where that peer's rows are, and each receiver copies its rows out itself; the
// sender reuses the region once every peer has said it is done. Host SharedArrayBuffers
// back the 'shared' exchange; one GPU's memory backs the 'device-copy' exchange
// (src/native/cuda.ts), which is how several ranks share one GPU (NCCL refuses duplicate
// GPUs). Positions, ops and communicators are checked exactly as for message chunks.
import type { ExchangeName } from '../src/backends.js';
import type { StagingMemory } from '../src/staging.js';

export type { Piece, StagedHandle, StagingMemory } from '../src/staging.js';

/** Regions kept for reuse: allocating multi-MiB shared buffers per exchange costs page faults. */
const FREE_REGIONS = 8;

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
    gather(out, pieces) {
      let at = 0;
      for (const p of pieces) {
        const src = 'local' in p ? p.local : new Uint8Array(p.handle as SharedArrayBuffer, p.offset, p.bytes);
        out.set(src, at);
        at += src.byteLength;
      }
    },
    unstage(handle) {
      if (handle instanceof SharedArrayBuffer && free.length < FREE_REGIONS && !free.includes(handle)) free.push(handle);
    },
    isHandle: (v): v is SharedArrayBuffer => v instanceof SharedArrayBuffer,
  };
}

/** The staging memory of a staged exchange; null for the exchanges that do not stage. */
export async function stagingMemory(exchange: ExchangeName): Promise<StagingMemory | null> {
  if (exchange === 'shared') return sharedMemory();
  if (exchange === 'device-copy') return (await import('../src/native/cuda.js')).deviceCopyMemory();
  return null;
}
