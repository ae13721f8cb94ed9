// NCCL from TypeScript: the launcher's environment (torchrun/Slurm names), the TCP
// rendezvous that hands rank 0's unique id to every rank, and a Communicator whose
// all-to-alls run as grouped ncclSend/ncclRecv on the addon's dedicated comm thread.
// The counts exchange (fwd.counts) carries a fingerprint of (position, op): ranks that
// diverge fail there with NativeError NCCL_DIVERGED instead of hanging.
import { connect, createServer, type Socket } from 'node:net';
import { Tensor, ELEMENT_SIZE, type DType, type StorageOf } from '../tensor.js';
import type { CollectiveTag, Communicator } from '../ep/types.js';
import { NativeError, requireNative } from './backend.js';

interface NcclAddon {
  ncclVersion(): { code: number; path: string };
  ncclGetUniqueId(): Uint8Array;
  ncclCommInit(id: Uint8Array, size: number, rank: number, device: number): Promise<number>;
  ncclExchangeCounts(h: number, counts: BigInt64Array, position: number, op: string, timeoutMs: number): Promise<BigInt64Array>;
  ncclAllToAll(h: number, send: bigint, sendBytes: number[], recv: bigint, recvBytes: number[], timeoutMs: number): Promise<void>;
  ncclAbort(h: number): void;
  ncclDestroy(h: number): void;
  cudaAlloc(bytes: number): bigint;
  cudaFree(p: bigint): void;
  cudaUpload(p: bigint, data: ArrayBufferView): void;
  cudaDownload(p: bigint, data: ArrayBufferView): void;
}

const addon = (): NcclAddon => requireNative() as unknown as NcclAddon;

export interface LaunchEnv {
  rank: number;
  worldSize: number;
  localRank: number;
  masterAddr: string;
  masterPort: number;
}

/** RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as torchrun and Slurm set them. */
export function launchEnv(env: NodeJS.ProcessEnv = process.env): LaunchEnv {
  const int = (k: string, dflt?: number): number => {
    const v = env[k] ?? (dflt === undefined ? undefined : String(dflt));
    if (v === undefined || !/^\d+$/.test(v)) throw new NativeError(`${k} must be set to a non-negative integer (got ${v ?? 'nothing'})`, 'BAD_ARGUMENT');
    return Number(v);
  };
  const worldSize = int('WORLD_SIZE');
  const rank = int('RANK');
  if (rank >= worldSize) throw new NativeError(`RANK ${rank} must be below WORLD_SIZE ${worldSize}`, 'BAD_ARGUMENT');
  return { rank, worldSize, localRank: int('LOCAL_RANK', 0), masterAddr: env.MASTER_ADDR ?? '127.0.0.1', masterPort: int('MASTER_PORT', 29500) };
}

const ID_BYTES = 128;

/**
 * Rank 0 creates the unique id (NCCL's, unless `newId` says otherwise) and serves it at
 * MASTER_ADDR:MASTER_PORT until every other rank has fetched it; the others fetch it,
 * retrying until the deadline while rank 0 is not up yet.
 */
export async function rendezvousUniqueId(e: LaunchEnv, timeoutMs = 300_000, newId: () => Uint8Array = () => addon().ncclGetUniqueId()): Promise<Uint8Array> {
  if (e.rank === 0) {
    const id = newId();
    if (id.length !== ID_BYTES) throw new NativeError(`rendezvous: a unique id has ${ID_BYTES} bytes, got ${id.length}`, 'BAD_ARGUMENT');
    if (e.worldSize === 1) return id;
    await new Promise<void>((resolve, reject) => {
      let served = 0;
      const server = createServer((sock: Socket) => {
        sock.end(Buffer.from(id));
        if (++served === e.worldSize - 1) {
          clearTimeout(timer);
          server.close(() => resolve());
        }
      });
      const timer = setTimeout(() => {
        server.close();
        reject(new NativeError(`rendezvous: only ${served} of ${e.worldSize - 1} ranks connected to ${e.masterAddr}:${e.masterPort} within ${timeoutMs} ms`, 'NCCL_TIMEOUT'));
      }, timeoutMs);
      server.once('error', (err) => reject(new NativeError(`rendezvous: cannot listen on port ${e.masterPort}: ${err.message}`, 'NCCL_RENDEZVOUS')));
      server.listen(e.masterPort);
    });
    return id;
  }
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Uint8Array>((resolve, reject) => {
        const chunks: Buffer[] = [];
        const sock = connect(e.masterPort, e.masterAddr);
        sock.on('data', (c) => chunks.push(c));
        sock.once('error', reject);
        sock.once('end', () => {
          const b = Buffer.concat(chunks);
          if (b.length !== ID_BYTES) reject(new Error(`got ${b.length} bytes, expected ${ID_BYTES}`));
          else resolve(new Uint8Array(b));
        });
      });
    } catch (err) {
      if (Date.now() > deadline) throw new NativeError(`rendezvous: rank ${e.rank} could not reach ${e.masterAddr}:${e.masterPort}: ${(err as Error).message}`, 'NCCL_TIMEOUT');
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** A Communicator over one NCCL communicator; host tensors are staged through device memory. */
export class NcclCommunicator implements Communicator {
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  #handle: number;
  #position = 0;
  readonly #timeoutMs: number;

  private constructor(name: string, rank: number, size: number, handle: number, timeoutMs: number) {
    this.name = name;
    this.rank = rank;
    this.size = size;
    this.#handle = handle;
    this.#timeoutMs = timeoutMs;
  }

  /** Joins the communicator with a unique id from the supervisor or rendezvousUniqueId(). */
  static async init(opts: { id: Uint8Array; rank: number; size: number; device: number; name?: string; timeoutMs?: number }): Promise<NcclCommunicator> {
    const h = await addon().ncclCommInit(opts.id, opts.size, opts.rank, opts.device);
    return new NcclCommunicator(opts.name ?? 'ep', opts.rank, opts.size, h, opts.timeoutMs ?? 600_000);
  }

  async allToAll<D extends DType>(tag: CollectiveTag, send: Tensor<D>, sendSplits: readonly number[], recvSplits: readonly number[]): Promise<Tensor<D>> {
    const position = this.#position++;
    const a = addon();
    if (tag.op === 'fwd.counts') {
      // Counts travel with the fingerprint; the received counts are checked against recvSplits' shape only.
      const counts = new BigInt64Array(send.data.length);
      const src = send.data as BigInt64Array | Int32Array;
      for (let i = 0; i < counts.length; i++) counts[i] = BigInt(src[i]!);
      const got = await a.ncclExchangeCounts(this.#handle, counts, position, `${tag.op}@${tag.layer}.${tag.microBatch}`, this.#timeoutMs);
      const out = Tensor.zeros(send.dtype, [this.size, ...send.shape.slice(1)]);
      const dst = out.data as StorageOf[D];
      for (let i = 0; i < got.length; i++) (dst as BigInt64Array | Int32Array)[i] = (send.dtype === 'i64' ? got[i]! : Number(got[i]!)) as never;
      return out;
    }
    const rowBytes = send.rowSize * ELEMENT_SIZE[send.dtype];
    const recvRows = recvSplits.reduce((x, y) => x + y, 0);
    const sendPtr = a.cudaAlloc(send.byteLength);
    const recvPtr = a.cudaAlloc(recvRows * rowBytes);
    try {
      a.cudaUpload(sendPtr, send.data);
      await a.ncclAllToAll(this.#handle, sendPtr, sendSplits.map((r) => r * rowBytes), recvPtr, recvSplits.map((r) => r * rowBytes), this.#timeoutMs);
      const out = Tensor.zeros(send.dtype, [recvRows, ...send.shape.slice(1)]);
      a.cudaDownload(recvPtr, out.data);
      return out;
    } finally {
      a.cudaFree(sendPtr);
      a.cudaFree(recvPtr);
    }
  }

  /** Supervisor abort: unblocks a collective in flight (it rejects with NCCL_ABORTED). */
  abort(): void {
    addon().ncclAbort(this.#handle);
  }

  destroy(): void {
    addon().ncclDestroy(this.#handle);
  }
}

/** NCCL's version, or NativeError NCCL_LIBRARY_NOT_FOUND naming the path tried. */
export function ncclVersion(): { code: number; path: string } {
  return addon().ncclVersion();
}
