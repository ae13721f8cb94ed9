// NCCL from TypeScript: a Communicator whose all-to-alls run as grouped ncclSend/ncclRecv
// on the addon's dedicated comm thread, joined with a unique id that the supervisor hands
// each worker rank or that the rendezvous (actors/rendezvous.ts) hands each launched rank.
// The counts exchange (fwd.counts) carries a fingerprint of (position, op): ranks that
// diverge fail there with NativeError NCCL_DIVERGED instead of hanging.
import { Tensor, ELEMENT_SIZE, type DType, type StorageOf } from '../tensor.js';
import type { CollectiveTag, Communicator } from '../ep/types.js';
import { requireNative } from './backend.js';

const addon = requireNative;

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

  /** Joins the communicator with a unique id from the supervisor or the rendezvous. */
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
