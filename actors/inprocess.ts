// In-process ranks: every EP rank of a case as a concurrent async task in one thread, over
// one communicator group. Collectives pair by position through the same CollectiveTracker
// every engine feeds (NCCL's matching: the n-th call of every member must be the same op
// with consistent splits), and a position completes once every member has posted it.
// Unlike NCCL, a disagreement is reported at once: every waiting member's call rejects
// with the tracker's finding instead of hanging or corrupting data.
import { CollectiveTracker } from '../machines/ledger.js';
import type { IssuedCollective } from '../machines/snapshot.js';
import { runCaseRank, type RankLoop } from '../src/case.js';
import { Tensor, type DType } from '../src/tensor.js';
import type { CollectiveTag, Communicator } from '../src/ep/types.js';

export class CollectiveError extends Error {
  override name = 'CollectiveError';
}

interface Post {
  readonly send: Tensor;
  readonly sendSplits: readonly number[];
  readonly recvSplits: readonly number[];
  readonly resolve: (t: Tensor) => void;
  readonly reject: (e: Error) => void;
}

/** What the tracker needs of an all-to-all the layer posts here (no rank machine behind it). */
function asIssued(tag: CollectiveTag, sendSplits: readonly number[], recvSplits: readonly number[]): IssuedCollective {
  return {
    comm: 'ep',
    op: tag.op,
    issuer: 'layer',
    unit: null,
    phase: tag.op.startsWith('fwd') ? 'forward' : 'backward',
    layer: tag.layer,
    microBatch: tag.microBatch,
    sendSplits,
    recvSplits,
    size: null,
    statePath: '',
    why: [],
  };
}

export class InProcessGroup {
  readonly members: readonly Communicator[];
  private readonly tracker: CollectiveTracker;
  /** Posts of the open position, by member: every member blocks in exactly one. */
  private readonly posts = new Map<number, Post>();
  private failure: CollectiveError | null = null;

  constructor(
    readonly size: number,
    readonly name = 'ep',
  ) {
    if (!Number.isInteger(size) || size < 1) throw new Error(`group size must be a positive integer, got ${size}`);
    this.tracker = new CollectiveTracker({ ep: size, dp: 1 }, false);
    this.members = Array.from({ length: size }, (_, rank) => ({
      name,
      rank,
      size,
      allToAll: <D extends DType>(tag: CollectiveTag, send: Tensor<D>, sendSplits: readonly number[], recvSplits: readonly number[]) =>
        this.post(rank, tag, send, sendSplits, recvSplits) as Promise<Tensor<D>>,
    }));
  }

  /** `rank` issues no more collectives: a position its peers wait in can then never complete, and is reported. */
  finish(rank: number): void {
    if (this.failure || this.tracker.isFinished(rank)) return;
    const finding = this.tracker.finish(rank);
    if (finding) this.abort(`${this.name}: ${finding.detail}`);
  }

  /** Reject every waiting member with one error; later calls fail with it too. */
  private abort(message: string): CollectiveError {
    this.failure ??= new CollectiveError(message);
    for (const p of this.posts.values()) p.reject(this.failure);
    this.posts.clear();
    return this.failure;
  }

  private post(rank: number, tag: CollectiveTag, send: Tensor, sendSplits: readonly number[], recvSplits: readonly number[]): Promise<Tensor> {
    return new Promise<Tensor>((resolve, reject) => {
      if (this.failure) throw this.failure;
      if (this.tracker.isFinished(rank)) throw new CollectiveError(`${this.name}: rank ${rank} posted ${tag.op} after it finished`);
      if (sendSplits.length !== this.size || recvSplits.length !== this.size) {
        throw this.abort(`${this.name}: rank ${rank} posted ${tag.op} with ${sendSplits.length} send and ${recvSplits.length} recv splits for a group of ${this.size}`);
      }
      const rows = send.shape[0] ?? 0;
      if (sendSplits.reduce((a, b) => a + b, 0) !== rows) throw this.abort(`${this.name}: rank ${rank} posted ${tag.op} with send splits [${sendSplits.join(', ')}] for ${rows} rows`);
      const other = [...this.posts.values()][0];
      if (other && (other.send.dtype !== send.dtype || other.send.rowSize !== send.rowSize)) {
        throw this.abort(`${this.name} (${tag.op}): rank ${rank} sends ${send.dtype} rows of ${send.rowSize} but a peer sends ${other.send.dtype} rows of ${other.send.rowSize}`);
      }
      this.posts.set(rank, { send, sendSplits, recvSplits, resolve, reject });
      const issued = this.tracker.issue(rank, asIssued(tag, sendSplits, recvSplits), send.dtype);
      if (issued.finding) throw this.abort(`${this.name} collective #${issued.entry.position}: ${issued.finding.detail}`);
      if (issued.completed) this.complete();
    });
  }

  /** Every member posted: each receives its rows from every peer, grouped by source. */
  private complete(): void {
    const posts = Array.from({ length: this.size }, (_, r) => this.posts.get(r)!);
    this.posts.clear();
    const offsets = posts.map((p) => {
      const o = [0];
      for (const s of p.sendSplits) o.push(o[o.length - 1]! + s);
      return o;
    });
    posts.forEach((p, dst) => {
      const rowSize = p.send.rowSize;
      const total = p.recvSplits.reduce((a, b) => a + b, 0);
      const out = Tensor.zeros(p.send.dtype, [total, ...p.send.shape.slice(1)]);
      let at = 0;
      posts.forEach((src, s) => {
        const from = offsets[s]![dst]! * rowSize;
        const n = src.sendSplits[dst]! * rowSize;
        (out.data as Float32Array).set((src.send.data as Float32Array).subarray(from, from + n), at);
        at += n;
      });
      p.resolve(out);
    });
  }
}

/** N communicators of one in-process group (rank i is element i). */
export function createInProcessGroup(size: number, name = 'ep'): InProcessGroup {
  return new InProcessGroup(size, name);
}

/** Every rank of a case as a concurrent async task over one in-process group (ep = 1: no group). */
export const inProcessRanks: RankLoop = async (data, backend) => {
  const { ep } = data.meta;
  if (ep === 1) return [await runCaseRank(data, 0, null, backend)];
  const group = createInProcessGroup(ep);
  return Promise.all(
    group.members.map(async (comm, rank) => {
      try {
        return await runCaseRank(data, rank, comm, backend);
      } finally {
        group.finish(rank);
      }
    }),
  );
};
