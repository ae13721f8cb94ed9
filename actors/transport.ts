// The MessagePort mesh inside a rank worker: one port per peer, msgpack messages with the
// aligned tensor extensions (decoding gives views, not copies), buffers transferred rather
// than cloned. Every message names its communicator, position and op, so a chunk for the
// right position but another op, a chunk for a communicator the pair does not share, a
// stale position or bytes that do not decode are reported at once instead of hanging.
import type { MessagePort } from 'node:worker_threads';
import { ELEMENT_SIZE, STORAGE_CTOR, Tensor, numel, type DType } from '../src/tensor.js';
import { CodecError, decodeMessage, encodeMessage } from '../src/codec/msgpack.js';
import type { CommunicatorSpec } from '../machines/ledger.js';
import type { CollectiveTag, Communicator } from '../src/ep/types.js';

export class TransportError extends Error {
  override name = 'TransportError';
}

export interface Chunk {
  readonly comm: string;
  readonly position: number;
  readonly op: string;
  readonly from: number;
  readonly tensor: Tensor;
  /** The message's buffer: the tensor may be a view into it; it goes back to the sender once consumed. */
  readonly buffer: ArrayBuffer;
}

type Waiter = { op: string; resolve: (c: Chunk) => void };

/** Buffers kept per peer for reuse; more than this in flight are dropped to the GC. */
const POOL_PER_PEER = 4;
/** Released result buffers a communicator keeps for reuse. */
const FREE_BUFFERS = 8;

/** Deliberate damage to outgoing chunks, for tests of the runtime's error reporting. */
export type ChunkFault = 'corrupt-message' | 'wrong-communicator' | 'stale-position';

export class PortMesh {
  private readonly arrived = new Map<string, Chunk>();
  private readonly waiting = new Map<string, Waiter>();
  /** Highest position consumed per (communicator, peer): anything at or below is stale. */
  private readonly consumed = new Map<string, number>();
  /** Communicators each peer shares with this rank. */
  private readonly shared = new Map<number, Set<string>>();
  /** Message buffers peers returned after consuming them, reused for the next sends to them. */
  private readonly pool = new Map<number, ArrayBuffer[]>();
  /** Set by a fault injector: how to damage the next outgoing chunk of one op. */
  fault: { op: string; kind: ChunkFault } | null = null;

  constructor(
    readonly rank: number,
    private readonly ports: ReadonlyMap<number, MessagePort>,
    comms: readonly CommunicatorSpec[],
    private readonly onError: (message: string) => void,
  ) {
    for (const c of comms) {
      if (!c.members.includes(rank)) continue;
      for (const m of c.members) {
        if (!this.shared.has(m)) this.shared.set(m, new Set());
        this.shared.get(m)!.add(c.id);
      }
    }
    for (const [peer, port] of ports) {
      port.on('message', (m: unknown) => (m instanceof ArrayBuffer ? this.returned(peer, m) : this.deliver(peer, m)));
    }
  }

  send(peer: number, comm: string, position: number, op: string, tensor: Tensor): void {
    const port = this.ports.get(peer);
    if (!port) throw new TransportError(`rank ${this.rank} has no port to rank ${peer}`);
    let header = { comm, position };
    let bytes: Uint8Array;
    if (this.fault?.op === op) {
      const kind = this.fault.kind;
      this.fault = null;
      if (kind === 'corrupt-message') {
        port.postMessage(Uint8Array.of(0xc1, 0xff, 0x00, 0x13)); // 0xc1 is never valid msgpack
        return;
      }
      header = kind === 'wrong-communicator' ? { comm: `${comm}-bogus`, position } : { comm, position: position - 1 };
    }
    bytes = encodeMessage({ ...header, op, from: this.rank, tensor }, this.pool.get(peer)?.pop());
    port.postMessage(bytes, [bytes.buffer as ArrayBuffer]);
  }

  /** Hand a consumed chunk's buffer back to its sender, which will encode into it again. */
  recycle(chunk: Chunk): void {
    this.ports.get(chunk.from)?.postMessage(chunk.buffer, [chunk.buffer]);
  }

  private returned(peer: number, buffer: ArrayBuffer): void {
    const pool = this.pool.get(peer) ?? [];
    if (pool.length < POOL_PER_PEER) pool.push(buffer);
    this.pool.set(peer, pool);
  }

  receive(peer: number, comm: string, position: number, op: string): Promise<Chunk> {
    const key = `${comm}|${position}|${peer}`;
    const chunk = this.arrived.get(key);
    if (chunk) {
      this.arrived.delete(key);
      return this.accept(chunk, op);
    }
    return new Promise((resolve) => this.waiting.set(key, { op, resolve }));
  }

  private accept(chunk: Chunk, op: string): Promise<Chunk> {
    const key = `${chunk.comm}|${chunk.from}`;
    this.consumed.set(key, Math.max(this.consumed.get(key) ?? -1, chunk.position));
    if (chunk.op !== op) {
      return this.stall(`rank ${this.rank} expected ${op} from rank ${chunk.from} at ${chunk.comm} position ${chunk.position} but received ${chunk.op}`);
    }
    return Promise.resolve(chunk);
  }

  /**
   * Report a divergence the data itself shows, and leave the collective waiting as NCCL
   * would: the supervisor decides the verdict (usually from the ledger, which says more).
   */
  stall(message: string): Promise<never> {
    this.onError(message);
    return new Promise<never>(() => {});
  }

  private deliver(peer: number, bytes: unknown): void {
    let chunk: Chunk;
    try {
      chunk = this.parse(peer, bytes);
    } catch (err) {
      this.onError((err as Error).message);
      return;
    }
    const stale = this.consumed.get(`${chunk.comm}|${peer}`) ?? -1;
    if (chunk.position <= stale) {
      this.onError(`rank ${this.rank} received a stale chunk from rank ${peer}: ${chunk.op} for ${chunk.comm} position ${chunk.position}, which it already completed`);
      return;
    }
    const key = `${chunk.comm}|${chunk.position}|${peer}`;
    const waiter = this.waiting.get(key);
    if (waiter) {
      this.waiting.delete(key);
      void this.accept(chunk, waiter.op).then(waiter.resolve);
    } else if (this.arrived.has(key)) {
      this.onError(`rank ${this.rank} received two chunks from rank ${peer} for ${chunk.comm} position ${chunk.position}`);
    } else {
      this.arrived.set(key, chunk);
    }
  }

  /** Decode and check a peer's message; anything malformed becomes a TransportError naming the sender. */
  private parse(peer: number, bytes: unknown): Chunk {
    const from = `rank ${this.rank} received from rank ${peer}`;
    if (!(bytes instanceof Uint8Array)) throw new TransportError(`${from} a message that is not bytes`);
    let msg: unknown;
    try {
      msg = decodeMessage(bytes);
    } catch (err) {
      if (err instanceof CodecError) throw new TransportError(`${from} a corrupt message: ${err.message}`);
      throw err;
    }
    const m = msg as Partial<Omit<Chunk, 'buffer'>> | null;
    if (!m || typeof m !== 'object' || typeof m.comm !== 'string' || typeof m.op !== 'string' || !Number.isSafeInteger(m.position) || m.from !== peer || !(m.tensor instanceof Tensor)) {
      throw new TransportError(`${from} a message without a valid communicator, position, op, sender and tensor`);
    }
    if (!this.shared.get(peer)?.has(m.comm)) {
      throw new TransportError(`${from} a chunk for communicator '${m.comm}', which the two ranks do not share`);
    }
    return { ...(m as Omit<Chunk, 'buffer'>), buffer: bytes.buffer as ArrayBuffer };
  }
}

/** A communicator of the mesh as seen from one worker: positions counted locally, exchanges over the PortMesh. */
export class MeshCommunicator implements Communicator {
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  private position = 0;
  /** Output buffers this communicator allocated, and those released back for reuse. */
  private readonly mine = new WeakSet<ArrayBuffer>();
  private readonly free: ArrayBuffer[] = [];

  constructor(
    readonly spec: CommunicatorSpec,
    readonly globalRank: number,
    private readonly mesh: PortMesh,
  ) {
    this.name = spec.kind;
    this.rank = spec.members.indexOf(globalRank);
    this.size = spec.members.length;
    if (this.rank < 0) throw new TransportError(`rank ${globalRank} is not a member of ${spec.id}`);
  }

  async allToAll<D extends DType>(tag: CollectiveTag, send: Tensor<D>, sendSplits: readonly number[], recvSplits: readonly number[]): Promise<Tensor<D>> {
    const rows = send.shape[0] ?? 0;
    const rowSize = send.rowSize;
    if (sendSplits.length !== this.size || recvSplits.length !== this.size) throw new TransportError(`${tag.op}: splits must have ${this.size} entries`);
    if (sendSplits.reduce((a, b) => a + b, 0) !== rows) throw new TransportError(`${tag.op}: send splits sum to ${sendSplits.reduce((a, b) => a + b, 0)} but the tensor has ${rows} rows`);
    const position = this.position++;
    let offset = 0;
    let own: Tensor<D> | null = null;
    for (let j = 0; j < this.size; j++) {
      const chunk = rowsOf(send, offset, sendSplits[j]!);
      offset += sendSplits[j]!;
      if (j === this.rank) own = chunk;
      else this.mesh.send(this.spec.members[j]!, this.spec.id, position, tag.op, chunk);
    }
    const chunks = await Promise.all(
      this.spec.members.map(async (peer, j) => {
        if (j === this.rank) return null;
        const c = await this.mesh.receive(peer, this.spec.id, position, tag.op);
        const t = c.tensor;
        if (t.dtype !== send.dtype || (t.shape[0] ?? 0) !== recvSplits[j] || t.rowSize !== rowSize) {
          return this.mesh.stall(`${tag.op} on ${this.spec.id} position ${position}: rank ${peer} sent ${t.shape[0]} rows of ${t.dtype} × ${t.rowSize}, rank ${this.globalRank} expected ${recvSplits[j]} rows of ${send.dtype} × ${rowSize}`);
        }
        return c;
      }),
    );
    const out = concatRows(send.dtype, chunks.map((c) => (c ? (c.tensor as Tensor<D>) : own!)), [...send.shape.slice(1)], (bytes) => this.buffer(bytes));
    for (const c of chunks) if (c) this.mesh.recycle(c);
    return out;
  }

  release(t: Tensor): void {
    const buffer = t.data.buffer as ArrayBuffer;
    if (this.mine.has(buffer) && !this.free.includes(buffer) && this.free.length < FREE_BUFFERS) this.free.push(buffer);
  }

  /** A buffer of at least `bytes` for a result: a released one that fits (not more than twice as big), else a new one. */
  private buffer(bytes: number): ArrayBuffer {
    const i = this.free.findIndex((b) => b.byteLength >= bytes && b.byteLength <= 2 * bytes);
    if (i >= 0) return this.free.splice(i, 1)[0]!;
    const b = Buffer.allocUnsafeSlow(Math.max(bytes, 8)).buffer as ArrayBuffer;
    this.mine.add(b);
    return b;
  }

  /** Returns once every member has entered it: an all-to-all of nothing. */
  async barrier(tag: CollectiveTag): Promise<void> {
    const none = new Array<number>(this.size).fill(0);
    await this.allToAll(tag, Tensor.zeros('f32', [0]), none, none);
  }

  /** Every member's tensor, concatenated in member order (FSDP's parameter all-gather). */
  async allGather<D extends DType>(tag: CollectiveTag, t: Tensor<D>): Promise<Tensor<D>> {
    const rows = t.shape[0] ?? 0;
    const splits = new Array<number>(this.size).fill(rows);
    const sendAll = concatRows(t.dtype, splits.map(() => t), [...t.shape.slice(1)]);
    return this.allToAll(tag, sendAll, splits, splits);
  }

  /** Sum over members of a 1-D f32/f64 tensor; member j keeps elements of chunk j (FSDP's gradient reduce-scatter). */
  async reduceScatter<D extends 'f32' | 'f64'>(tag: CollectiveTag, t: Tensor<D>): Promise<Tensor<D>> {
    const n = t.data.length;
    const chunk = Math.ceil(n / this.size);
    const splits = Array.from({ length: this.size }, (_, j) => Math.max(0, Math.min(chunk, n - j * chunk)));
    const mine = splits[this.rank]!;
    const got = await this.allToAll(tag, new Tensor(t.dtype, [n], t.data), splits, splits.map(() => mine));
    const out = Tensor.zeros(t.dtype, [mine]);
    for (let j = 0; j < this.size; j++) for (let i = 0; i < mine; i++) out.data[i] += got.data[j * mine + i]!;
    return out;
  }

  /** Sum over members, result everywhere. */
  async allReduce<D extends 'f32' | 'f64'>(tag: CollectiveTag, t: Tensor<D>): Promise<Tensor<D>> {
    const gathered = await this.allGather(tag, new Tensor(t.dtype, [1, t.data.length], t.data));
    const out = Tensor.zeros(t.dtype, t.shape);
    for (let j = 0; j < this.size; j++) for (let i = 0; i < out.data.length; i++) out.data[i] += gathered.data[j * out.data.length + i]!;
    return out;
  }
}

function rowsOf<D extends DType>(t: Tensor<D>, start: number, count: number): Tensor<D> {
  const rs = t.rowSize;
  return new Tensor(t.dtype, [count, ...t.shape.slice(1)], t.data.subarray(start * rs, (start + count) * rs) as Tensor<D>['data']);
}

function concatRows<D extends DType>(dtype: D, parts: readonly Tensor<D>[], rest: number[], buffer: (bytes: number) => ArrayBuffer = (b) => Buffer.allocUnsafeSlow(b).buffer as ArrayBuffer): Tensor<D> {
  const rows = parts.reduce((a, p) => a + (p.shape[0] ?? 0), 0);
  const shape = [rows, ...rest];
  const n = numel(shape);
  // Every element is written below, so the buffer need not be zeroed.
  const out = new Tensor(dtype, shape, new STORAGE_CTOR[dtype](buffer(n * ELEMENT_SIZE[dtype]), 0, n) as Tensor<D>['data']);
  let at = 0;
  for (const p of parts) {
    (out.data as Float32Array).set(p.data as Float32Array, at);
    at += p.data.length;
  }
  return out;
}
