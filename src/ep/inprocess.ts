// An in-process communicator group: N ranks as concurrent async tasks in one thread.
// Collectives pair by position, as NCCL pairs them: the n-th call of every member must be
// the same op with consistent splits, and it resolves once every member has posted it.
// Unlike NCCL, a disagreement is reported at once (every waiting member's call rejects
// with the same message) instead of hanging or corrupting data.
import { Tensor, type DType } from '../tensor.js';
import type { CollectiveTag, Communicator } from './types.js';

export class CollectiveError extends Error {
  override name = 'CollectiveError';
}

interface Post {
  readonly tag: CollectiveTag;
  readonly send: Tensor;
  readonly sendSplits: readonly number[];
  readonly recvSplits: readonly number[];
  readonly resolve: (t: Tensor) => void;
  readonly reject: (e: Error) => void;
}

function describe(tag: CollectiveTag): string {
  return `${tag.op} (layer ${tag.layer}, micro-batch ${tag.microBatch})`;
}

export class InProcessGroup {
  readonly members: readonly Communicator[];
  private readonly slots = new Map<number, (Post | undefined)[]>();
  private readonly nextPosition: number[];
  private readonly finished: boolean[];
  private failure: CollectiveError | null = null;

  constructor(
    readonly size: number,
    readonly name = 'ep',
  ) {
    if (!Number.isInteger(size) || size < 1) throw new Error(`group size must be a positive integer, got ${size}`);
    this.nextPosition = new Array<number>(size).fill(0);
    this.finished = new Array<boolean>(size).fill(false);
    this.members = Array.from({ length: size }, (_, rank) => ({
      name,
      rank,
      size,
      allToAll: <D extends DType>(tag: CollectiveTag, send: Tensor<D>, sendSplits: readonly number[], recvSplits: readonly number[]) =>
        this.post(rank, tag, send, sendSplits, recvSplits) as Promise<Tensor<D>>,
    }));
  }

  /**
   * Tell the group that `rank` issues no more collectives. A position some members are
   * waiting on that this rank never posted can then never complete: that is reported.
   */
  finish(rank: number): void {
    this.finished[rank] = true;
    for (const [position, posts] of this.slots) {
      if (posts[rank] === undefined) {
        const waiting = posts.flatMap((p, r) => (p ? [`rank ${r} posted ${describe(p.tag)}`] : []));
        this.abort(`${this.where(position)}: rank ${rank} finished without posting it while ${waiting.join(', ')}`);
      }
    }
  }

  private where(position: number): string {
    return `communicator '${this.name}' collective #${position}`;
  }

  /** Reject every waiting member with one error; later calls fail with it too. */
  private abort(message: string): CollectiveError {
    const err = new CollectiveError(message);
    this.failure ??= err;
    for (const posts of this.slots.values()) for (const p of posts) p?.reject(err);
    this.slots.clear();
    return err;
  }

  private post(rank: number, tag: CollectiveTag, send: Tensor, sendSplits: readonly number[], recvSplits: readonly number[]): Promise<Tensor> {
    return new Promise<Tensor>((resolve, reject) => {
      if (this.failure) throw this.failure;
      if (this.finished[rank]) throw new CollectiveError(`${this.name}: rank ${rank} posted ${describe(tag)} after it finished`);
      const position = this.nextPosition[rank]!++;
      const at = this.where(position);
      if (sendSplits.length !== this.size || recvSplits.length !== this.size) {
        throw this.abort(`${at}: rank ${rank} posted ${tag.op} with ${sendSplits.length} send and ${recvSplits.length} recv splits for a group of ${this.size}`);
      }
      const rows = send.shape[0] ?? 0;
      if (sendSplits.reduce((a, b) => a + b, 0) !== rows) {
        throw this.abort(`${at}: rank ${rank} posted ${tag.op} with send splits [${sendSplits.join(', ')}] for ${rows} rows`);
      }
      let posts = this.slots.get(position);
      if (!posts) this.slots.set(position, (posts = new Array<Post | undefined>(this.size).fill(undefined)));
      const mine: Post = { tag, send, sendSplits, recvSplits, resolve, reject };
      posts.forEach((other, r) => {
        if (!other) return;
        if (other.tag.op !== tag.op || other.tag.layer !== tag.layer || other.tag.microBatch !== tag.microBatch) {
          throw this.abort(`${at}: rank ${r} posted ${describe(other.tag)} but rank ${rank} posted ${describe(tag)}`);
        }
        if (other.send.dtype !== send.dtype || other.send.rowSize !== send.rowSize) {
          throw this.abort(`${at} (${tag.op}): rank ${r} sends ${other.send.dtype} rows of ${other.send.rowSize} but rank ${rank} sends ${send.dtype} rows of ${send.rowSize}`);
        }
        for (const [a, b, pa, pb] of [[rank, r, mine, other], [r, rank, other, mine]] as const) {
          if (pa.sendSplits[b] !== pb.recvSplits[a]) {
            throw this.abort(`${at} (${tag.op}): inconsistent splits: rank ${a} sends ${pa.sendSplits[b]} rows to rank ${b} but rank ${b} expects ${pb.recvSplits[a]} from rank ${a}`);
          }
        }
      });
      const missing = this.finished.findIndex((done, r) => done && !posts[r]);
      if (missing >= 0) throw this.abort(`${at}: rank ${rank} posted ${describe(tag)} but rank ${missing} already finished`);
      posts[rank] = mine;
      if (posts.every((p) => p !== undefined)) {
        this.slots.delete(position);
        this.complete(posts as Post[]);
      }
    });
  }

  private complete(posts: readonly Post[]): void {
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
