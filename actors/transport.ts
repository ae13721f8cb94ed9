// The MessagePort mesh inside a rank worker: one port per peer, msgpack messages with the
// aligned tensor extensions (decoding gives views, not copies), buffers transferred rather
// than cloned; or, for a staged exchange (actors/staging.ts), small announcements saying
// where the sender staged the peer's rows. Between worker threads of one process, small
// messages take the fast lane instead (actors/lane.ts): the same msgpack bytes in a shared
// ring, signalled through Atomics, and a receiver blocks for them briefly rather than
// waiting on its event loop; between launched ranks on one host, so do the chunks that fit
// the lane's larger slots there (a segment every peer maps). When results may live in
// shared memory, large chunks between worker threads are written by their sender straight
// into the receiver's result, where an invitation from the receiver says, instead of being
// encoded, transferred and copied again; their header and a `wrote` signal still travel as
// msgpack messages with every check.
// Every message names its communicator, position and op, so a
// chunk for the right position but another op, a chunk for a communicator the pair does
// not share, a stale position or bytes that do not decode are reported at once instead of
// hanging.
import { BroadcastChannel, MessagePort, threadId } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { DTYPES, ELEMENT_SIZE, Tensor, type DType } from '../src/tensor.js';
import { CodecError, decodeMessage, encodeMessage } from '../src/codec/msgpack.js';
import type { CommunicatorSpec } from '../machines/mesh.js';
import type { CollectiveTag, Communicator } from '../src/ep/types.js';
import { gatherHost, type Piece, type StagedHandle, type StagingMemory } from './staging.js';
import { Inbox, LANE_KNOCK, Outbox, isLaneHello, isSegmentHello, segmentsAvailable } from './lane.js';
import { ScratchPool, takeUnfilled } from '../src/ep/scratch.js';
import { now } from './messages.js';

export class TransportError extends Error {
  override name = 'TransportError';
}

/** Where a sender staged one peer's rows, as its announcement says. */
export interface StagedRows {
  readonly handle: StagedHandle;
  /** Byte offset of the rows in the staged region. */
  readonly offset: number;
  readonly rows: number;
  readonly rowSize: number;
  readonly dtype: DType;
}

/** A chunk a worker-thread peer writes straight into this rank's result, as its header says. */
export interface DirectRows {
  readonly rows: number;
  readonly rowSize: number;
  readonly dtype: DType;
  /** The rows were in place when the header was sent; else a `wrote` signal follows. */
  readonly written: boolean;
}

export interface Chunk {
  readonly comm: string;
  readonly position: number;
  readonly op: string;
  readonly from: number;
  /** When the sender sent it (ms, the process-wide clock), if it was profiling. */
  readonly at?: number;
  /**
   * The rows: a decoded tensor with its message's buffer (the tensor may be a view into it;
   * the buffer goes back to the sender once consumed; null when it came by the fast lane,
   * as a copy), where the sender staged them, or a header for rows the sender writes into
   * this rank's result.
   */
  readonly rows: { readonly tensor: Tensor; readonly buffer: ArrayBuffer | null } | { readonly staged: StagedRows } | { readonly direct: DirectRows };
}

/** A sender's signal that the rows its header announced are now in the receiver's result. */
interface Wrote {
  readonly comm: string;
  readonly position: number;
  readonly op: string;
  readonly from: number;
  readonly wrote: true;
}

/** A receiver tells a worker-thread peer where in its result (shared memory) that peer's rows go. */
interface Invitation {
  readonly invite: string;
  readonly position: number;
  readonly op: string;
  readonly from: number;
  readonly into: StagedRows;
}

/** A receiver refuses rows it was offered (and has reported why): their sender stops waiting to write them. */
interface Decline {
  readonly decline: string;
  readonly position: number;
}

/** A staged chunk's announcement, as posted (structured clone shares a SharedArrayBuffer). */
interface Announcement {
  readonly comm: string;
  readonly position: number;
  readonly op: string;
  readonly from: number;
  readonly staged: StagedRows;
}

/** A receiver is done reading a staged chunk. */
interface Ack {
  readonly ack: string;
  readonly position: number;
}

type Waiter = { op: string; resolve: (c: Chunk) => void };

/** One peer on one communicator the two ranks share, as this rank receives from it. */
interface Channel {
  /** Highest position consumed: anything at or below is stale. */
  consumed: number;
  /** Chunks not yet received, and the receives waiting for theirs, by position. */
  readonly arrived: Map<number, Chunk>;
  readonly waiting: Map<number, Waiter>;
}

/** What the mesh needs of a connection to a peer: a MessagePort, or a TCP connection (actors/socketPort.ts). */
export interface PeerPort {
  postMessage(message: unknown, transfer?: ArrayBuffer[]): void;
  on(event: 'message', listener: (message: unknown) => void): unknown;
  /**
   * Resolves once what this side posted has left the process (null: nothing is pending).
   * A connection that buffers writes (TCP) says so; a MessagePort hands messages over at once.
   */
  flushed?(): Promise<void> | null;
  /** A connection to a rank in another worker thread of this process that is not a MessagePort itself (actors/rankWorker.ts). */
  readonly betweenThreads?: boolean;
  /** A connection to a rank in another process, perhaps on this host (its lane then goes through a segment). */
  readonly betweenProcesses?: boolean;
  /** Sends what it holds back at once: the rank is about to block its thread. */
  sendNow?(): void;
}

/** Buffers kept per peer for reuse; more than this in flight are dropped to the GC. */
const POOL_PER_PEER = 4;
/** Room a chunk's msgpack header (communicator, position, op, tensor header) takes beyond its rows. */
const HEADER_ROOM = 256;
/**
 * How long a rank blocks for fast-lane chunks before waiting on its event loop instead:
 * long enough for peers a little behind, short enough that a missing peer costs nothing
 * the supervisor would notice (it decides hangs from what ranks issued, not from this).
 * A launched rank decides hangs itself, from its peers' reports and goodbyes, which it reads
 * only on its event loop: it blocks briefly (20 ms delayed its stop on a missing collective
 * by about as much; 2 ms did not slow the EP step).
 */
const LANE_WAIT_MS: Record<'threads' | 'processes', number> = { threads: 20, processes: 2 };
/** Released result buffers a communicator keeps for reuse. */
const FREE_BUFFERS = 8;

/**
 * With EP_ACTORS_PROFILE=1 in the environment (worker threads inherit it), every all-to-all
 * of every rank is timed and posted on this BroadcastChannel, for the step profile in
 * test/bench/profile.ts; chunks then carry their send time.
 */
export const PROFILE_CHANNEL = 'ep-actors:collective-profile';

/** One all-to-all of one rank, in ms on the process-wide clock (actors/messages.ts `now`). */
export interface CollectiveProfile {
  readonly rank: number;
  readonly comm: string;
  readonly op: string;
  readonly position: number;
  /** Entered the collective. */
  readonly enter: number;
  /** Its chunks were encoded or staged and sent. */
  readonly sent: number;
  /** The last peer sent its chunk to this rank (enter, for a collective with no peers). */
  readonly peerSent: number;
  /** Every peer's chunk had been received. */
  readonly arrived: number;
  /** The result was assembled. */
  readonly done: number;
}

const profiling = process.env.EP_ACTORS_PROFILE === '1';
let profileChannel: BroadcastChannel | null = null;

/** `message` with its send time while profiling. */
function timed<T extends object>(message: T): T & { at?: number } {
  if (profiling) (message as { at?: number }).at = now();
  return message;
}

function reportProfile(p: CollectiveProfile): void {
  if (!profileChannel) {
    profileChannel = new BroadcastChannel(PROFILE_CHANNEL);
    profileChannel.unref();
  }
  profileChannel.postMessage(p);
}

/** Deliberate damage to outgoing chunks, for tests of the runtime's error reporting. */
export type ChunkFault = 'corrupt-message' | 'wrong-communicator' | 'stale-position';

/** The inbox launched peers on this host write to, where segments can be made; else none (every message goes by the connections). */
function processInbox(peers: readonly number[]): Inbox | null {
  if (!segmentsAvailable()) return null;
  try {
    return new Inbox(peers, 'processes');
  } catch {
    return null;
  }
}

export class PortMesh {
  /** Per peer, the communicators it shares with this rank (no other chunks are taken from it). */
  private readonly channels = new Map<number, Map<string, Channel>>();
  /** Receives waiting, over all channels. */
  private waiters = 0;
  /** Whether some port buffers what it posts (TCP), so that a collective waits for it to leave. */
  private readonly buffering: boolean;
  /** Message buffers peers returned after consuming them, reused for the next sends to them. */
  private readonly pool = new Map<number, ArrayBuffer[]>();
  /** Staged chunks this rank announced and whose readers have not acknowledged them yet. */
  private readonly unacked = new Map<string, () => void>();
  /** Set by a fault injector: how to damage the next outgoing chunk of one op. */
  fault: { op: string; kind: ChunkFault } | null = null;
  /** Small messages from worker-thread peers land here (null when no peer is a MessagePort). */
  private readonly inbox: Inbox | null;
  /** Peers in other threads whose inboxes this rank writes small messages to. */
  private readonly lanes = new Map<number, Outbox>();
  /** Whether a wait for the inbox's doorbell is pending on the event loop. */
  private armed = false;
  /** Whether a peer offered its inbox: only then may one write to this rank's, and is its doorbell worth listening for. */
  private offered = false;
  /** Reused to encode fast-lane messages, which are copied into the peer's ring. */
  private scratch: ArrayBuffer | undefined;
  /** Where receivers asked this rank to write its rows, by (comm, position, receiver), until it sends them. */
  private readonly invitations = new Map<string, StagedRows & { op: string }>();
  /** Rows sent as a header whose receiver has not invited them yet. */
  private readonly unwritten = new Map<string, { op: string; rows: Tensor; resolve: () => void }>();
  /** The highest position sent per (communicator, peer) before the peer's lane offer came: invitations for those are moot. */
  private readonly sentUpTo = new Map<string, number>();
  /** `wrote` signals for chunks not yet waited for, and the receives waiting for theirs. */
  private readonly wroteEarly = new Set<string>();
  private readonly wroteWaiters = new Map<string, () => void>();

  constructor(
    readonly rank: number,
    private readonly ports: ReadonlyMap<number, PeerPort>,
    comms: readonly CommunicatorSpec[],
    private readonly onError: (message: string) => void,
    /** Whether awaitLane may block the thread: not where the thread hosts other ranks, which it would stall. */
    private readonly blockForLane = true,
  ) {
    for (const c of comms) {
      if (!c.members.includes(rank)) continue;
      for (const m of c.members) {
        if (!this.channels.has(m)) this.channels.set(m, new Map());
        this.channels.get(m)!.set(c.id, { consumed: -1, arrived: new Map(), waiting: new Map() });
      }
    }
    this.buffering = [...ports.values()].some((p) => p.flushed);
    const threadPeers = [...ports].filter(([, port]) => port instanceof MessagePort || port.betweenThreads).map(([peer]) => peer);
    const processPeers = threadPeers.length ? [] : [...ports].filter(([, port]) => port.betweenProcesses).map(([peer]) => peer);
    this.inbox = threadPeers.length ? new Inbox(threadPeers) : processPeers.length ? processInbox(processPeers) : null;
    for (const [peer, port] of ports) {
      port.on('message', (m: unknown) => {
        if (m === LANE_KNOCK) {
          this.inbox?.knocked();
          this.drainLane();
        } else if (m instanceof ArrayBuffer) this.returned(peer, m);
        else if (m && typeof m === 'object' && 'ack' in m) this.acked(peer, m as Ack);
        else if (m && typeof m === 'object' && 'invite' in m) this.invited(peer, m as Partial<Invitation>);
        else if (m && typeof m === 'object' && 'decline' in m) this.declined(peer, m as Partial<Decline>);
        else if (isLaneHello(m)) this.hello(peer, m);
        else if (isSegmentHello(m)) this.offer(peer, Outbox.mapped(m, () => this.port(peer).postMessage(LANE_KNOCK)));
        else {
          this.drainLane(); // what the peer wrote to the lane before posting this comes first
          this.deliver(peer, m, false);
        }
      });
    }
    for (const peer of threadPeers) ports.get(peer)!.postMessage(this.inbox!.hello(peer, threadId));
    if (this.inbox?.between === 'processes') for (const peer of processPeers) ports.get(peer)!.postMessage(this.inbox.segmentHello(peer));
  }

  /** A peer's inbox: written to only from another thread (a rank in this thread could never block for it). */
  private hello(peer: number, m: { lane: unknown; rings: unknown; ring: unknown; thread: unknown }): void {
    if (m.thread === threadId) return;
    const lane = Outbox.of(m);
    if (!lane) return this.onError(`rank ${this.rank} received from rank ${peer} a fast-lane offer that describes no well-formed inbox`);
    this.offer(peer, lane);
  }

  /**
   * A peer offered its inbox (null: a launched peer's that this rank cannot map, on another
   * host say: the pair keeps to its connection). Either way the peer may write to this
   * rank's own inbox from now on.
   */
  private offer(peer: number, lane: Outbox | null): void {
    if (lane) this.lanes.set(peer, lane);
    this.offered = true;
    this.drainLane();
    // A receive that began before any offer came did not listen for the doorbell: listen now.
    if (this.expecting()) this.armLane();
  }

  /** Whether anything this rank waits for may come by the fast lane. */
  private expecting(): boolean {
    return this.waiters > 0 || this.wroteWaiters.size > 0;
  }

  /** Whether `bytes` of rows to `peer`, a worker thread, are too many for the fast lane and go straight into its result. */
  directSend(peer: number, bytes: number): boolean {
    const lane = this.lanes.get(peer);
    return lane?.between === 'threads' && bytes + HEADER_ROOM > lane.capacity;
  }

  /** Whether `bytes` of rows from a worker-thread peer would be written straight into this rank's result. */
  directRecv(bytes: number): boolean {
    return this.inbox?.between === 'threads' && bytes + HEADER_ROOM > this.inbox.capacity;
  }

  /** Whether `peer` can be invited to write into this rank's memory now (its offer of a lane arrived: it is another thread). */
  invitable(peer: number): boolean {
    return this.lanes.get(peer)?.between === 'threads';
  }

  /** Whether a message of `bytes` rows to (or from) `peer` goes by the fast lane. */
  laneCarries(peer: number, bytes: number): boolean {
    const lane = this.lanes.get(peer);
    return !!lane && bytes + HEADER_ROOM <= lane.capacity;
  }

  private drainLane(): void {
    this.inbox?.drain((peer, bytes) => this.deliver(peer, bytes, true));
  }

  /**
   * Blocks this thread, at most LANE_WAIT_MS (by who shares the lane), until the chunks of
   * (comm, position) from `peers` have come by the fast lane; whatever has not by then is
   * awaited as usual.
   */
  awaitLane(comm: string, position: number, peers: readonly number[]): void {
    if (!this.inbox || peers.length === 0 || !this.blockForLane) return;
    this.sendNow();
    const deadline = performance.now() + LANE_WAIT_MS[this.inbox.between];
    for (;;) {
      this.drainLane();
      let missing = 0;
      for (const p of peers) if (!this.channels.get(p)?.get(comm)?.arrived.has(position)) missing++;
      if (missing === 0) return;
      const left = deadline - performance.now();
      if (left <= 0 || !this.inbox.waitSync(left, missing)) return;
    }
  }

  /** The thread is about to block: what this rank sent and a connection holds back (a knock, a report) leaves now. */
  sendNow(): void {
    for (const port of this.ports.values()) port.sendNow?.();
  }

  /** While receives wait, the event loop also listens for the inbox's doorbell. */
  private armLane(): void {
    if (!this.inbox || !this.offered || this.armed) return;
    this.armed = true;
    void this.inbox.waitAsync().then(() => {
      this.armed = false;
      this.drainLane();
      if (this.expecting()) this.armLane();
    });
  }

  /**
   * Sends a peer its rows: in a msgpack message, as an announcement of where they are staged,
   * or as the header of rows this rank writes into the peer's result.
   */
  send(peer: number, comm: string, position: number, op: string, rows: Tensor | StagedRows | DirectRows): void {
    const port = this.port(peer);
    if (!this.lanes.has(peer)) {
      // Until the peer's offer of a lane arrives, its invitations for what this rank sends are moot.
      const sent = `${comm}|${peer}`;
      this.sentUpTo.set(sent, Math.max(this.sentUpTo.get(sent) ?? -1, position));
    }
    const kind = this.fault?.op === op ? this.fault.kind : null;
    if (kind) {
      this.fault = null;
      if (kind === 'corrupt-message') {
        port.postMessage(Uint8Array.of(0xc1, 0xff, 0x00, 0x13)); // 0xc1 is never valid msgpack
        return;
      }
    }
    const c = kind === 'wrong-communicator' ? `${comm}-bogus` : comm;
    const p = kind === 'stale-position' ? position - 1 : position;
    const from = this.rank;
    // Each message one object literal: spreading a header into it cost V8 a slow property definition per message.
    if (rows instanceof Tensor) {
      const message = timed({ comm: c, position: p, op, from, tensor: rows });
      if (this.laneCarries(peer, rows.data.byteLength)) return this.post(peer, message);
      const bytes = encodeMessage(message, this.pool.get(peer)?.pop());
      port.postMessage(bytes, [bytes.buffer as ArrayBuffer]);
    } else if ('written' in rows) {
      this.post(peer, timed({ comm: c, position: p, op, from, direct: rows }));
    } else {
      port.postMessage(timed<Announcement>({ comm: c, position: p, op, from, staged: rows }));
    }
  }

  private port(peer: number): PeerPort {
    const port = this.ports.get(peer);
    if (!port) throw new TransportError(`rank ${this.rank} has no port to rank ${peer}`);
    return port;
  }

  /** Sends a small msgpack message: by the fast lane where there is one with room, else by the port. */
  private post(peer: number, message: unknown): void {
    const bytes = encodeMessage(message, this.lanes.has(peer) ? this.scratch : undefined);
    const lane = this.lanes.get(peer);
    if (lane) {
      this.scratch = bytes.buffer as ArrayBuffer;
      if (lane.write(bytes)) return;
      this.scratch = undefined; // the ring is full: these bytes go by the port instead
    }
    this.port(peer).postMessage(bytes, [bytes.buffer as ArrayBuffer]);
  }

  /**
   * Sends `rows` to a worker-thread peer by writing them into its result where it invites
   * this rank to (its invitation may come before or after); resolves once they are written,
   * or once the peer refused them (they did not match what it expects, which it reports).
   */
  sendDirect(peer: number, comm: string, position: number, op: string, rows: Tensor): Promise<void> {
    const key = `${comm}|${position}|${peer}`;
    const into = this.invitations.get(key);
    this.invitations.delete(key);
    const header = (written: boolean): DirectRows => ({ rows: rows.shape[0] ?? 0, rowSize: rows.rowSize, dtype: rows.dtype, written });
    if (into) {
      this.send(peer, comm, position, op, header(writeRows(into, op, rows)));
      return Promise.resolve();
    }
    this.send(peer, comm, position, op, header(false));
    return new Promise((resolve) => this.unwritten.set(key, { op, rows, resolve }));
  }

  /** Asks a worker-thread peer to write its rows for (comm, position) at `into`, in this rank's result. */
  invite(peer: number, comm: string, position: number, op: string, into: StagedRows): void {
    this.port(peer).postMessage({ invite: comm, position, op, from: this.rank, into } satisfies Invitation);
  }

  /** Tells a peer this rank will not take the rows its header offered (after reporting why). */
  decline(peer: number, comm: string, position: number): void {
    this.port(peer).postMessage({ decline: comm, position } satisfies Decline);
  }

  /** Resolves once the peer signals that the rows its header announced for (comm, position) are written. */
  written(peer: number, comm: string, position: number): Promise<void> {
    const key = `${comm}|${position}|${peer}`;
    if (this.wroteEarly.delete(key)) return Promise.resolve();
    this.armLane();
    return new Promise((resolve) => this.wroteWaiters.set(key, resolve));
  }

  private invited(peer: number, m: Partial<Invitation>): void {
    const what = `rank ${this.rank} received from rank ${peer} an invitation to write`;
    if (typeof m.invite !== 'string' || typeof m.op !== 'string' || !Number.isSafeInteger(m.position) || m.from !== peer) return this.onError(`${what} without a valid communicator, position, op and sender`);
    if (!this.channels.get(peer)?.has(m.invite)) return this.onError(`${what} for communicator '${m.invite}', which the two ranks do not share`);
    let into: StagedRows;
    try {
      into = stagedRows(m.into, what);
    } catch (err) {
      return this.onError((err as Error).message);
    }
    if (!(into.handle instanceof SharedArrayBuffer)) return this.onError(`${what} into memory other than a SharedArrayBuffer`);
    const key = `${m.invite}|${m.position}|${peer}`;
    const pending = this.unwritten.get(key);
    if (pending) {
      this.unwritten.delete(key);
      if (writeRows({ ...into, op: m.op }, pending.op, pending.rows)) this.post(peer, { comm: m.invite, position: m.position!, op: pending.op, from: this.rank, wrote: true } satisfies Wrote);
      pending.resolve();
    } else if ((this.sentUpTo.get(`${m.invite}|${peer}`) ?? -1) < m.position!) {
      this.invitations.set(key, { ...into, op: m.op });
    } // else: this rank sent that chunk another way (before it knew the peer's thread), which the peer takes too
  }

  private declined(peer: number, m: Partial<Decline>): void {
    if (typeof m.decline !== 'string' || !Number.isSafeInteger(m.position)) return this.onError(`rank ${this.rank} received from rank ${peer} a refusal without a valid communicator and position`);
    const key = `${m.decline}|${m.position}|${peer}`;
    const pending = this.unwritten.get(key);
    this.unwritten.delete(key);
    pending?.resolve();
  }

  /** Resolves once this rank's messages to `peers` have left the process (at once over MessagePorts). */
  flushed(peers: readonly number[]): Promise<unknown> | undefined {
    if (!this.buffering) return undefined;
    const pending = peers.flatMap((peer) => this.ports.get(peer)?.flushed?.() ?? []);
    return pending.length ? Promise.all(pending) : undefined;
  }

  /**
   * Resolves once every peer has acknowledged reading what this rank staged for them at
   * (comm, position). Call it right after the announcements, before awaiting anything.
   */
  acknowledgements(comm: string, position: number, peers: readonly number[]): Promise<void> {
    return Promise.all(peers.map((peer) => new Promise<void>((resolve) => this.unacked.set(`${comm}|${position}|${peer}`, resolve)))).then(() => undefined);
  }

  /** The reader is done with a consumed chunk: its buffer goes back to the sender, or its staged region is released. */
  recycle(chunk: Chunk): void {
    const port = this.ports.get(chunk.from);
    if ('staged' in chunk.rows) port?.postMessage({ ack: chunk.comm, position: chunk.position } satisfies Ack);
    else if ('buffer' in chunk.rows && chunk.rows.buffer) port?.postMessage(chunk.rows.buffer, [chunk.rows.buffer]);
  }

  private returned(peer: number, buffer: ArrayBuffer): void {
    const pool = this.pool.get(peer) ?? [];
    if (pool.length < POOL_PER_PEER) pool.push(buffer);
    this.pool.set(peer, pool);
  }

  private acked(peer: number, m: Ack): void {
    const key = `${String(m.ack)}|${String(m.position)}|${peer}`;
    const resolve = this.unacked.get(key);
    if (!resolve) return this.onError(`rank ${this.rank} received from rank ${peer} an acknowledgement of ${String(m.ack)} position ${String(m.position)}, which it never staged for that rank`);
    this.unacked.delete(key);
    resolve();
  }

  /**
   * The chunk of (comm, position) from `peer`: at once when it has arrived (no promise, no
   * event-loop turn), else a promise of it; one that never settles when it is not `op`
   * (reported).
   */
  receive(peer: number, comm: string, position: number, op: string): Chunk | Promise<Chunk> {
    const channel = this.channels.get(peer)?.get(comm);
    if (!channel) throw new TransportError(`rank ${this.rank} does not share communicator '${comm}' with rank ${peer}`);
    if (!channel.arrived.has(position)) this.drainLane();
    const chunk = channel.arrived.get(position);
    if (chunk) {
      channel.arrived.delete(position);
      return this.accept(channel, chunk, op);
    }
    this.armLane();
    this.waiters++;
    return new Promise((resolve) => channel.waiting.set(position, { op, resolve }));
  }

  private accept(channel: Channel, chunk: Chunk, op: string): Chunk | Promise<never> {
    channel.consumed = Math.max(channel.consumed, chunk.position);
    if (chunk.op !== op) {
      if ('direct' in chunk.rows) this.decline(chunk.from, chunk.comm, chunk.position);
      return this.stall(`rank ${this.rank} expected ${op} from rank ${chunk.from} at ${chunk.comm} position ${chunk.position} but received ${chunk.op}`);
    }
    return chunk;
  }

  /**
   * Report a divergence the data itself shows, and leave the collective waiting as NCCL
   * would: the supervisor decides the verdict (usually from the ledger, which says more).
   */
  stall(message: string): Promise<never> {
    this.onError(message);
    return new Promise<never>(() => {});
  }

  private deliver(peer: number, message: unknown, viaLane: boolean): void {
    let chunk: Chunk | Wrote;
    try {
      chunk = this.parse(peer, message, viaLane);
    } catch (err) {
      this.onError((err as Error).message);
      return;
    }
    if ('wrote' in chunk) {
      // Comes after its header, which may already be consumed: not a chunk, never stale.
      const key = `${chunk.comm}|${chunk.position}|${peer}`;
      const waiter = this.wroteWaiters.get(key);
      this.wroteWaiters.delete(key);
      if (waiter) waiter();
      else this.wroteEarly.add(key);
      return;
    }
    const channel = this.channels.get(peer)!.get(chunk.comm)!; // parse checked that they share it
    if (chunk.position <= channel.consumed) {
      this.onError(`rank ${this.rank} received a stale chunk from rank ${peer}: ${chunk.op} for ${chunk.comm} position ${chunk.position}, which it already completed`);
      return;
    }
    const waiter = channel.waiting.get(chunk.position);
    const early = channel.arrived.get(chunk.position);
    if (waiter) {
      channel.waiting.delete(chunk.position);
      this.waiters--;
      const accepted = this.accept(channel, chunk, waiter.op);
      if (!(accepted instanceof Promise)) waiter.resolve(accepted);
    } else if (early) {
      // Also a stale chunk, caught before its position completed: the fast lane and the port
      // may deliver a peer's chunks out of order, so the first may still be unconsumed.
      this.onError(`rank ${this.rank} received a stale chunk from rank ${peer}: ${chunk.op} for ${chunk.comm} position ${chunk.position}, which already has its chunk (${early.op})`);
    } else {
      channel.arrived.set(chunk.position, chunk);
    }
  }

  /**
   * Decode and check a peer's message; anything malformed becomes a TransportError naming the
   * sender. Bytes from the fast lane are its slot, reused once this returns: tensors are copied out.
   */
  private parse(peer: number, message: unknown, viaLane: boolean): Chunk | Wrote {
    const from = () => `rank ${this.rank} received from rank ${peer}`;
    let m: Partial<Omit<Chunk, 'rows'> & { tensor: unknown; staged: unknown; direct: unknown; wrote: unknown }> | null;
    if (message instanceof Uint8Array) {
      try {
        m = decodeMessage(message, viaLane) as typeof m;
      } catch (err) {
        if (err instanceof CodecError) throw new TransportError(`${from()} a corrupt message: ${err.message}`);
        throw err;
      }
    } else if (message && typeof message === 'object' && 'staged' in message) {
      m = message as typeof m;
    } else {
      throw new TransportError(`${from()} a message that is neither bytes nor a staged-chunk announcement`);
    }
    if (!m || typeof m !== 'object' || typeof m.comm !== 'string' || typeof m.op !== 'string' || !Number.isSafeInteger(m.position) || m.from !== peer) {
      throw new TransportError(`${from()} a message without a valid communicator, position, op and sender`);
    }
    const { comm, position, op } = m as { comm: string; position: number; op: string };
    if (!this.channels.get(peer)?.has(comm)) {
      throw new TransportError(`${from()} a chunk for communicator '${comm}', which the two ranks do not share`);
    }
    const at = typeof m.at === 'number' ? m.at : undefined;
    if (message instanceof Uint8Array) {
      if (m.wrote === true) return { comm, position, op, from: peer, wrote: true };
      if (m.direct !== undefined) return { comm, position, op, from: peer, at, rows: { direct: directRows(m.direct, `${from()} a direct-chunk header`) } };
      if (!(m.tensor instanceof Tensor)) throw new TransportError(`${from()} a message without a tensor`);
      return { comm, position, op, from: peer, at, rows: { tensor: m.tensor, buffer: viaLane ? null : (message.buffer as ArrayBuffer) } };
    }
    return { comm, position, op, from: peer, at, rows: { staged: stagedRows(m.staged, `${from()} a staged-chunk announcement`) } };
  }
}

/** Checks an announcement's rows field (it came from another thread: trust nothing). */
function stagedRows(v: unknown, what: string): StagedRows {
  const r = v as Partial<StagedRows> | null;
  const count = (x: unknown) => Number.isSafeInteger(x) && (x as number) >= 0;
  if (!r || typeof r !== 'object' || !(r.handle instanceof SharedArrayBuffer || typeof r.handle === 'bigint')) throw new TransportError(`${what} without a region handle`);
  if (!count(r.offset) || !count(r.rows) || !count(r.rowSize) || !DTYPES.includes(r.dtype as DType)) throw new TransportError(`${what} with an invalid offset, row count, row size or dtype`);
  const end = r.offset! + r.rows! * r.rowSize! * ELEMENT_SIZE[r.dtype!];
  if (r.handle instanceof SharedArrayBuffer && end > r.handle.byteLength) throw new TransportError(`${what} whose rows end at byte ${end}, past its ${r.handle.byteLength}-byte region`);
  return r as StagedRows;
}

/** Checks a direct chunk's header (it came from another thread: trust nothing). */
function directRows(v: unknown, what: string): DirectRows {
  const r = v as Partial<DirectRows> | null;
  const count = (x: unknown) => Number.isSafeInteger(x) && (x as number) >= 0;
  if (!r || typeof r !== 'object' || !count(r.rows) || !count(r.rowSize) || !DTYPES.includes(r.dtype as DType) || typeof r.written !== 'boolean') {
    throw new TransportError(`${what} with an invalid row count, row size, dtype or written flag`);
  }
  return r as DirectRows;
}

/** Writes `rows` where a receiver invited them, if they are what it expects there (else it reports the mismatch). */
function writeRows(into: StagedRows & { op: string }, op: string, rows: Tensor): boolean {
  if (into.op !== op || into.dtype !== rows.dtype || into.rowSize !== rows.rowSize || into.rows !== (rows.shape[0] ?? 0)) return false;
  new Uint8Array(into.handle as SharedArrayBuffer, into.offset, rows.data.byteLength).set(bytesOf(rows));
  return true;
}

/** A communicator of the mesh as seen from one worker: positions counted locally, exchanges over the PortMesh. */
export class MeshCommunicator implements Communicator {
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  private position = 0;
  /** Result buffers: released ones back the next results. */
  private readonly results = new ScratchPool({ minBytes: 0, maxFreeBytes: Infinity, maxFreeBuffers: FREE_BUFFERS });

  constructor(
    readonly spec: CommunicatorSpec,
    readonly globalRank: number,
    private readonly mesh: PortMesh,
    /** Set for a staged exchange: rows are staged here and peers copy them out. */
    private readonly staging: StagingMemory | null = null,
    /**
     * Whether results may live in shared memory, so that worker-thread peers write large
     * chunks straight into them (one copy of each byte instead of two). Every rank of a run
     * must agree. Off by default: it gains on 4 MiB chunks (1.4× the ports exchange) but the
     * EP step measured no faster with it (docs/BENCHMARKS.md).
     */
    private readonly sharedResults = false,
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
    const enter = profiling ? now() : 0;
    const rowBytes = rowSize * ELEMENT_SIZE[send.dtype];
    const members = this.spec.members;
    const rest = send.shape.slice(1);
    // With results in shared memory (host exchanges), worker-thread peers write large chunks
    // straight into them: one copy of each byte.
    const writing = this.sharedResults && this.staging?.name !== 'device-copy';
    const large = writing && members.some((_, j) => j !== this.rank && this.mesh.directRecv(recvSplits[j]! * rowBytes));
    const offer = large ? this.offer(this.results.take(send.dtype, [recvSplits.reduce((a, b) => a + b, 0), ...rest], true), position, tag.op, recvSplits) : null;
    const writes: Promise<void>[] = [];
    // Small chunks take the fast lane whatever the exchange; the rest are staged when it stages.
    const staged = this.staging ? members.filter((peer, j) => j !== this.rank && !this.mesh.laneCarries(peer, sendSplits[j]! * rowBytes) && !(writing && this.mesh.directSend(peer, sendSplits[j]! * rowBytes))) : [];
    const region = staged.length ? this.staging!.stage(bytesOf(send)) : null;
    let offset = 0;
    let own: Tensor<D> | null = null;
    for (let j = 0; j < this.size; j++) {
      const chunk = rowsOf(send, offset, sendSplits[j]!);
      const peer = members[j]!;
      if (j === this.rank) own = chunk;
      else if (writing && this.mesh.directSend(peer, chunk.byteLength)) writes.push(this.mesh.sendDirect(peer, this.spec.id, position, tag.op, chunk));
      else this.mesh.send(peer, this.spec.id, position, tag.op, region && staged.includes(peer) ? { handle: region, offset: offset * rowBytes, rows: sendSplits[j]!, rowSize, dtype: send.dtype } : chunk);
      offset += sendSplits[j]!;
    }
    // This rank's own rows go into a shared result now, while peers write theirs.
    if (offer) new Uint8Array(offer.out.data.buffer, offer.at[this.rank]!, own!.byteLength).set(bytesOf(own!));
    const acknowledged = region === null ? null : this.mesh.acknowledgements(this.spec.id, position, staged);
    const sent = profiling ? now() : 0;
    this.mesh.awaitLane(this.spec.id, position, members.filter((peer, j) => j !== this.rank && this.mesh.laneCarries(peer, recvSplits[j]! * rowBytes)));
    // Checks peer j's chunk; a promise when the rows are still to come or the chunk is wrong (it never settles, as NCCL would hang).
    const check = (c: Chunk, j: number): Promise<unknown> | undefined => {
      const peer = members[j]!;
      const got = 'tensor' in c.rows ? { rows: c.rows.tensor.shape[0] ?? 0, dtype: c.rows.tensor.dtype, rowSize: c.rows.tensor.rowSize } : 'staged' in c.rows ? c.rows.staged : c.rows.direct;
      if (got.dtype !== send.dtype || got.rows !== recvSplits[j] || got.rowSize !== rowSize) {
        if ('direct' in c.rows) this.mesh.decline(peer, this.spec.id, position);
        return this.mesh.stall(`${tag.op} on ${this.spec.id} position ${position}: rank ${peer} sent ${got.rows} rows of ${got.dtype} × ${got.rowSize}, rank ${this.globalRank} expected ${recvSplits[j]} rows of ${send.dtype} × ${rowSize}`);
      }
      if ('staged' in c.rows && !this.staging?.isHandle(c.rows.staged.handle)) {
        return this.mesh.stall(`${tag.op} on ${this.spec.id} position ${position}: rank ${peer} staged its rows in memory that rank ${this.globalRank}'s ${this.staging?.name ?? 'ports'} exchange cannot read`);
      }
      if ('direct' in c.rows) {
        if (!offer) {
          this.mesh.decline(peer, this.spec.id, position);
          return this.mesh.stall(`${tag.op} on ${this.spec.id} position ${position}: rank ${peer} offered to write its rows into rank ${this.globalRank}'s result, which is not in shared memory`);
        }
        // The peer's offer of a lane came after this rank entered: invite it now.
        if (!offer.invited.has(j)) offer.invite(j);
        if (!c.rows.direct.written) return this.mesh.written(peer, this.spec.id, position);
      }
      return undefined;
    };
    // Chunks already here are taken without a promise each: a small exchange's usual case.
    const chunks: (Chunk | null)[] = [];
    const pending: Promise<unknown>[] = [];
    for (let j = 0; j < this.size; j++) {
      const c = j === this.rank ? null : this.mesh.receive(members[j]!, this.spec.id, position, tag.op);
      if (c instanceof Promise) {
        chunks.push(null);
        pending.push(c.then((got) => check((chunks[j] = got), j)));
      } else {
        chunks.push(c);
        const wait = c && check(c, j);
        if (wait) pending.push(wait);
      }
    }
    if (pending.length) await Promise.all(pending);
    // As NCCL's, a rank's collective completes when its sends are done too: a rank that went
    // on to a long compute with its rows still buffered here would hold its peers' data hostage.
    if (writes.length) await Promise.all(writes);
    const flushed = this.mesh.flushed(members); // this rank has no port to itself
    if (flushed) await flushed;
    const arrived = profiling ? now() : 0;
    let out: Tensor<D>;
    if (this.staging || offer) {
      out = (offer?.out as Tensor<D> | undefined) ?? this.results.take(send.dtype, [recvSplits.reduce((a, b) => a + b, 0), ...rest]);
      const pieces = chunks.map((c, j): Piece => {
        if (!c) return offer ? { placed: own!.byteLength } : { local: bytesOf(own!) };
        if ('tensor' in c.rows) return { local: bytesOf(c.rows.tensor) };
        if ('direct' in c.rows) return { placed: recvSplits[j]! * rowBytes };
        const s = c.rows.staged;
        return { handle: s.handle, offset: s.offset, bytes: s.rows * rowBytes };
      });
      (this.staging?.gather ?? gatherHost)(bytesOf(out), pieces);
    } else {
      out = concatRows(send.dtype, chunks.map((c) => (c ? ((c.rows as { tensor: Tensor }).tensor as Tensor<D>) : own!)), rest, this.results);
    }
    for (const c of chunks) if (c) this.mesh.recycle(c);
    // Peers copy out of the region until they say they are done; this rank need not wait.
    if (region !== null) void acknowledged!.then(() => this.staging!.unstage(region));
    if (profiling) {
      const peerSent = Math.max(enter, ...chunks.map((c) => c?.at ?? enter));
      reportProfile({ rank: this.globalRank, comm: this.spec.id, op: tag.op, position, enter, sent, peerSent, arrived, done: now() });
    }
    return out;
  }

  release(t: Tensor): void {
    this.results.give(t);
  }

  /**
   * Offers worker-thread peers whose chunks are too large for the lane their places in `out`
   * (shared memory; `at`: each member's byte offset), inviting those whose lane offer has
   * come; the others are invited once their header arrives.
   */
  private offer(out: Tensor, position: number, op: string, recvSplits: readonly number[]): { out: Tensor; at: readonly number[]; invited: Set<number>; invite(j: number): void } {
    const rowBytes = out.rowSize * ELEMENT_SIZE[out.dtype];
    const at: number[] = [];
    recvSplits.reduce((offset, n) => (at.push(offset), offset + n * rowBytes), out.data.byteOffset);
    const invited = new Set<number>();
    const invite = (j: number) => {
      invited.add(j);
      this.mesh.invite(this.spec.members[j]!, this.spec.id, position, op, { handle: out.data.buffer as SharedArrayBuffer, offset: at[j]!, rows: recvSplits[j]!, rowSize: out.rowSize, dtype: out.dtype });
    };
    this.spec.members.forEach((peer, j) => j !== this.rank && this.mesh.directRecv(recvSplits[j]! * rowBytes) && this.mesh.invitable(peer) && invite(j));
    return { out, at, invited, invite };
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

function bytesOf(t: Tensor): Uint8Array {
  return new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength);
}

function rowsOf<D extends DType>(t: Tensor<D>, start: number, count: number): Tensor<D> {
  const rs = t.rowSize;
  const shape = t.shape.length === 1 ? [count] : [count, ...t.shape.slice(1)];
  return new Tensor(t.dtype, shape, t.data.subarray(start * rs, (start + count) * rs) as Tensor<D>['data']);
}

function concatRows<D extends DType>(dtype: D, parts: readonly Tensor<D>[], rest: number[], pool?: ScratchPool): Tensor<D> {
  const rows = parts.reduce((a, p) => a + (p.shape[0] ?? 0), 0);
  const out = takeUnfilled(pool, dtype, [rows, ...rest]);
  let at = 0;
  for (const p of parts) {
    (out.data as Float32Array).set(p.data as Float32Array, at);
    at += p.data.length;
  }
  return out;
}
