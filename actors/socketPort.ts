// TCP connections that look like MessagePorts to the PortMesh, so ranks in different
// processes or on different nodes exchange the same msgpack chunks, checked the same way,
// as worker ranks do over MessagePorts: each message is one frame, a 4-byte little-endian
// length then the bytes. Each connection opens with the hello of actors/runIdentity.ts
// (only ranks of this run get in), and a rank that ends says goodbye with how many
// collectives it issued and, when it stopped, why (a frame starting 0xc1, which never
// starts msgpack), so its peers can tell a finished rank from a stopped or crashed one,
// and a collective it will never join from one it is late for. Frames starting 0xc1 also
// carry the rank's reports to every peer (each collective it issues, and that it computes
// again), from which each rank follows the whole run's ledger. After a goodbye, either
// way, nothing more is written on the connection, and the rank that said it keeps
// reading until the peer closes (bounded), so the peer reads the goodbye rather than a
// reset. Two more such frames serve the fast lane between ranks on one host (actors/lane.ts):
// a rank's offer of its inbox, and a knock that tells a listening rank to look in it.
import { connect, type Server, type Socket } from 'node:net';
import { HELLO_TIMEOUT_MS, type PeerAddress } from './rendezvous.js';
import { helloAsDialer, helloAsListener, RefusedConnection, type Hello, type Side } from './runIdentity.js';
import { TransportError, type PeerPort } from './transport.js';
import { LANE_KNOCK, isSegmentHello } from './lane.js';
import type { IssuedCollective } from '../machines/snapshot.js';

/** A frame longer than this is a corrupt stream, not a chunk (msgpack bin32 tops out at 4 GiB). */
const MAX_FRAME = 2 ** 31;
/** First byte of a goodbye frame: 0xc1 is never valid msgpack. */
const GOODBYE = 0xc1;
/** How long a rank that said goodbye waits for the peer to close before it closes itself. */
const LINGER_MS = 2000;
/**
 * Buffers at least this large are worth reusing: a chunk's buffer goes back to the mesh's
 * pool once written, and a consumed one backs a later frame (smaller ones would only take
 * the pools' few places).
 */
const REUSE_MIN = 64 * 1024;
/** Consumed frame buffers a connection keeps for the frames it reads next. */
const FREE_FRAMES = 4;

/**
 * What a rank tells every peer as it goes, so each can follow the whole run's ledger (the
 * feed every engine keeps) and tell a hang at quiescence from a wait for a peer that
 * still computes: each collective it issues, and that it computes again once one completed.
 */
export type PeerReport = { readonly kind: 'computing' } | { readonly kind: 'issue'; readonly collective: IssuedCollective; readonly dtype: string };
/** Second byte of a report frame (after GOODBYE's 0xc1, never valid msgpack); an issue's JSON follows. */
const COMPUTING = 0x01;
const ISSUE = 0x02;
/** Second byte of the fast lane's frames: a knock (nothing follows), an offer of an inbox (its JSON follows). */
const KNOCK = 0x03;
const SEGMENT = 0x04;

/**
 * What a rank tells its peers when it ends: collectives it issued per communicator kind,
 * and, when it stopped rather than finishing, why.
 */
export interface Goodbye {
  readonly issued: Readonly<Record<string, number>>;
  /** Why the run stopped, and which rank stopped it first (a rank passes on a peer's reason). */
  readonly stopped?: string;
  readonly stoppedBy?: number;
  /**
   * It stopped where it is held for good (in a collective of a hung run at quiescence, or in
   * its own stalled compute): its peers go on to their own quiescence instead of stopping on its word.
   */
  readonly held?: boolean;
}

export interface SocketEvents {
  /** The connection failed or closed before the peer said goodbye. */
  broken(reason: string): void;
  /** The peer ended: finished its step, or stopped on an error (goodbye.stopped). */
  finished(goodbye: Goodbye): void;
  /** The peer issued a collective, or computes again. */
  report?(report: PeerReport): void;
}

const EMPTY = Buffer.alloc(0);

/** A report or lane frame: GOODBYE's 0xc1, its kind, and the JSON of its body if it has one (read back by #json). */
function controlFrame(kind: number, body?: object): Uint8Array {
  return body === undefined ? Uint8Array.of(GOODBYE, kind) : Buffer.concat([Uint8Array.of(GOODBYE, kind), Buffer.from(JSON.stringify(body))]);
}

export class SocketPort implements PeerPort {
  readonly betweenProcesses = true;
  #listener: ((m: unknown) => void) | null = null;
  /** Frames that arrived before the mesh listened: a MessagePort queues them too. */
  readonly #backlog: unknown[] = [];
  #header = Buffer.alloc(4);
  #headerBytes = 0;
  #frame: Uint8Array | null = null;
  #frameBytes = 0;
  /** Set once either side has said goodbye: a close after that is not a failure, and nothing more is written. */
  #ended = false;
  /** Set once this side said goodbye: what arrives after it is read and dropped. */
  #left = false;
  /** Buffers of frames the mesh consumed, for the next large frames (allocating them fresh cost page faults and GC). */
  readonly #free: ArrayBuffer[] = [];
  /** Set while this tick's frames are held back, to leave in one write when it ends. */
  #corked = false;
  readonly #closed: Promise<void>;

  constructor(
    readonly socket: Socket,
    private readonly events: SocketEvents,
    /** Bytes that arrived with the hello, before this port took the connection. */
    first?: Buffer,
  ) {
    socket.setNoDelay(true);
    this.#closed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (c: Buffer) => this.#read(c));
    socket.on('error', (err) => this.#broken(err.message));
    socket.on('close', () => this.#broken('the connection closed'));
    if (first?.length) this.#read(first);
  }

  #broken(reason: string): void {
    if (this.#ended) return;
    this.#ended = true;
    this.events.broken(reason);
  }

  /**
   * Sends one frame. The frames of one turn of the event loop (a collective's report and its
   * chunk, say) leave together in one write, so the peer wakes once for them. A transferred
   * buffer (the sender gives it up) goes back to the mesh's pool once written.
   */
  postMessage(message: unknown, transfer?: readonly ArrayBuffer[]): void {
    if (message instanceof ArrayBuffer) {
      // A consumed chunk's buffer, given back: it backs a later frame from this peer.
      if (message.byteLength >= REUSE_MIN && this.#free.push(message) > FREE_FRAMES) this.#free.shift();
      return;
    }
    if (this.#ended) return; // the run is over on this connection: a late chunk would only meet a closed socket
    if (message === LANE_KNOCK) {
      // The peer waits on its event loop for what this rank just wrote to its inbox: at once.
      this.postMessage(controlFrame(KNOCK));
      return this.sendNow();
    }
    if (isSegmentHello(message)) return this.postMessage(controlFrame(SEGMENT, message));
    if (!(message instanceof Uint8Array)) throw new TransportError('a TCP connection carries msgpack chunks only, not staged announcements');
    if (!this.#corked) {
      this.#corked = true;
      this.socket.cork();
      setImmediate(() => this.sendNow());
    }
    const header = Buffer.allocUnsafe(4);
    header.writeUInt32LE(message.byteLength);
    this.socket.write(header);
    const buffer = message.buffer as ArrayBuffer;
    const mine = transfer?.includes(buffer) && buffer.byteLength >= REUSE_MIN;
    this.socket.write(Buffer.from(buffer, message.byteOffset, message.byteLength), mine ? (err) => void (err || this.#listener?.(buffer)) : undefined);
  }

  /** A buffer for a frame of `length` bytes: a consumed one that fits, else a fresh one (8-aligned either way, so decoded tensors are views). */
  #frameBuffer(length: number): Uint8Array {
    const i = length >= REUSE_MIN ? this.#free.findIndex((b) => b.byteLength >= length) : -1;
    const buffer = i < 0 ? Buffer.allocUnsafeSlow(length).buffer : this.#free.splice(i, 1)[0]!;
    return new Uint8Array(buffer, 0, length);
  }

  /** Ends this turn's cork early: what is held back leaves now. */
  sendNow(): void {
    if (!this.#corked) return;
    this.#corked = false;
    this.socket.uncork();
  }

  flushed(): Promise<void> | null {
    if (this.#ended || this.socket.writableLength === 0) return null;
    // Writes complete in order: an empty one's callback runs once everything before it is out.
    return new Promise((resolve) => this.socket.write(EMPTY, () => resolve()));
  }

  on(_event: 'message', listener: (message: unknown) => void): this {
    this.#listener = listener;
    for (const m of this.#backlog.splice(0)) listener(m);
    return this;
  }

  /** Tells the peer what this rank does now. */
  report(r: PeerReport): void {
    this.postMessage(r.kind === 'computing' ? controlFrame(COMPUTING) : controlFrame(ISSUE, { collective: r.collective, dtype: r.dtype }));
  }

  /**
   * Tells the peer this rank ended (and what it issued), ends this side and resolves once
   * the connection is closed: when the peer closes its side, or after LINGER_MS.
   */
  goodbye(g: Goodbye): Promise<void> {
    if (!this.#left) {
      this.#left = true;
      if (!this.#ended) {
        const json = Buffer.from(JSON.stringify(g));
        const frame = new Uint8Array(1 + json.length);
        frame[0] = GOODBYE;
        frame.set(json, 1);
        this.postMessage(frame);
      }
      this.#ended = true;
      this.socket.end();
      setTimeout(() => this.socket.destroy(), LINGER_MS).unref();
    }
    return this.#closed;
  }

  #goodbye(frame: Uint8Array): void {
    let g: Goodbye;
    try {
      g = JSON.parse(Buffer.from(frame.buffer, frame.byteOffset + 1, frame.byteLength - 1).toString('utf8')) as Goodbye;
      if (!g || typeof g.issued !== 'object' || g.issued === null) throw new Error('no issued counts');
    } catch {
      return this.#broken('the peer said goodbye in a frame that does not parse');
    }
    this.#ended = true;
    // After the frames that came before it have been consumed (their promises settle first).
    setImmediate(() => this.events.finished(g));
  }

  /** The JSON after a report or lane frame's two bytes, if it parses and `valid` holds; else the connection breaks as corrupt. */
  #json<T>(frame: Uint8Array, what: string, valid: (x: T) => boolean): T | null {
    try {
      const x = JSON.parse(Buffer.from(frame.buffer, frame.byteOffset + 2, frame.byteLength - 2).toString('utf8')) as T;
      if (x && typeof x === 'object' && valid(x)) return x;
    } catch {
      // reported below
    }
    this.#broken(`the peer ${what} in a frame that does not parse`);
    this.socket.destroy();
    return null;
  }

  #issue(frame: Uint8Array): void {
    const r = this.#json<{ collective: IssuedCollective; dtype: string }>(frame, 'reported an issue', (x) => typeof x.collective === 'object' && x.collective !== null && typeof x.dtype === 'string');
    if (r) this.events.report?.({ kind: 'issue', collective: r.collective, dtype: r.dtype });
  }

  /** Hands a message to the mesh, or holds it until the mesh listens (as a MessagePort queues it). */
  #hand(m: unknown): void {
    if (this.#listener) this.#listener(m);
    else this.#backlog.push(m);
  }

  #read(c: Buffer): void {
    if (this.#left) return;
    let at = 0;
    while (at < c.length) {
      if (!this.#frame) {
        const take = Math.min(4 - this.#headerBytes, c.length - at);
        c.copy(this.#header, this.#headerBytes, at, at + take);
        this.#headerBytes += take;
        at += take;
        if (this.#headerBytes < 4) return;
        const length = this.#header.readUInt32LE(0);
        if (length > MAX_FRAME) {
          this.#broken(`a frame of ${length} bytes announced: the stream is corrupt`);
          this.socket.destroy();
          return;
        }
        this.#frame = this.#frameBuffer(length);
        this.#frameBytes = 0;
      }
      const take = Math.min(this.#frame.byteLength - this.#frameBytes, c.length - at);
      this.#frame.set(c.subarray(at, at + take), this.#frameBytes);
      this.#frameBytes += take;
      at += take;
      if (this.#frameBytes === this.#frame.byteLength) {
        const frame = this.#frame;
        this.#frame = null;
        this.#headerBytes = 0;
        if (frame[0] === GOODBYE && frame[1] === 0x7b /* '{' */) this.#goodbye(frame);
        else if (frame[0] === GOODBYE && frame[1] === COMPUTING && frame.byteLength === 2) this.events.report?.({ kind: 'computing' });
        else if (frame[0] === GOODBYE && frame[1] === ISSUE) this.#issue(frame);
        else if (frame[0] === GOODBYE && frame[1] === KNOCK && frame.byteLength === 2) this.#hand(LANE_KNOCK);
        else if (frame[0] === GOODBYE && frame[1] === SEGMENT) {
          const hello = this.#json(frame, 'offered its inbox', isSegmentHello);
          if (hello) this.#hand(hello);
        } else this.#hand(frame);
      }
    }
  }
}

/**
 * Holds the connections `server` accepts from the moment it listens (peers may dial before
 * this rank has its table), until socketMesh takes them.
 */
export function acceptEarly(server: Server): { server: Server; take(): Socket[] } {
  const early: Socket[] = [];
  const hold = (s: Socket) => early.push(s);
  server.on('connection', hold);
  return {
    server,
    take() {
      server.off('connection', hold);
      return early.splice(0);
    },
  };
}

/** What socketMesh tells its rank about its connections. */
export interface MeshEvents {
  /** A peer's connection failed or closed before it said goodbye. */
  broken(peer: number, reason: string): void;
  /** A peer ended: finished its step, or stopped (goodbye.stopped). */
  finished(peer: number, goodbye: Goodbye): void;
  /** A connection the hello refused: someone not of this run, or not a rank that should dial here. */
  refused(r: RefusedConnection): void;
  /** A peer issued a collective or computes again (optional: only a launched rank follows its peers). */
  report?(peer: number, report: PeerReport): void;
}

/**
 * Connects this rank to every other: it dials the ranks below it and accepts the ranks
 * above it on the listening server (at peers[rank]); every connection opens with the hello,
 * so only ranks of run `me.run` with the right secret get in; the rest are refused and the
 * mesh goes on without them. Once every peer is connected the server stops accepting.
 * `events` hears of any connection that fails or closes without a goodbye, and of each
 * goodbye, once the mesh is up.
 */
export async function socketMesh(
  me: Hello,
  secret: Buffer | null,
  peers: readonly PeerAddress[],
  listening: ReturnType<typeof acceptEarly>,
  events: MeshEvents,
  timeoutMs = 60_000,
): Promise<Map<number, SocketPort>> {
  const { rank } = me;
  const ports = new Map<number, SocketPort>();
  const expected = peers.length - 1;
  const side: Side = { me, secret, timeoutMs: Math.min(timeoutMs, HELLO_TIMEOUT_MS) };
  if (expected === 0) {
    listening.server.close();
    return ports;
  }
  return new Promise((resolve, reject) => {
    let over = false;
    const end = (err: Error | null) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      listening.server.off('connection', accept);
      listening.server.close();
      if (!err) return resolve(ports);
      ports.forEach((p) => p.socket.destroy());
      reject(err);
    };
    const timer = setTimeout(() => {
      const missing = peers.flatMap((_, r) => (r === rank || ports.has(r) ? [] : [r]));
      end(new TransportError(`rank ${rank} could not connect to rank${missing.length === 1 ? '' : 's'} ${missing.join(', ')} within ${timeoutMs} ms`));
    }, timeoutMs);
    const eventsOf = (peer: number): SocketEvents => ({
      broken: (reason) => events.broken(peer, reason),
      finished: (goodbye) => events.finished(peer, goodbye),
      report: (r) => events.report?.(peer, r),
    });
    const add = (peer: number, sock: Socket, rest: Buffer) => {
      if (over) return void sock.destroy();
      ports.set(peer, new SocketPort(sock, eventsOf(peer), rest));
      if (ports.size === expected) end(null);
    };
    /** Ranks whose hello this rank accepted, so a second connection claiming one is refused. */
    const claimed = new Set<number>();
    const accept = (sock: Socket) => {
      sock.on('error', () => {}); // until the port owns it, a failure is the hello's to report
      helloAsListener(sock, side, (d) =>
        d.rank <= rank || d.rank >= peers.length ? `rank ${d.rank} does not dial rank ${rank} (ranks above it do)` : claimed.has(d.rank) ? `rank ${d.rank} is already connected` : null,
      ).then(
        ({ peer, rest }) => {
          claimed.add(peer.rank);
          add(peer.rank, sock, rest);
        },
        (err: Error) => {
          sock.destroy();
          if (err instanceof RefusedConnection) events.refused(err);
        },
      );
    };
    listening.take().forEach(accept);
    listening.server.on('connection', accept);
    for (let p = 0; p < rank; p++) {
      const where = `${peers[p]!.host}:${peers[p]!.port}`;
      const sock = connect(peers[p]!.port, peers[p]!.host);
      sock.once('error', (err) => {
        if (!ports.has(p) && !over) end(new TransportError(`rank ${rank} could not connect to rank ${p} at ${where}: ${err.message}`));
      });
      sock.once('connect', () => {
        helloAsDialer(sock, side, (l) => (l.rank === p ? null : `it is not rank ${p}`)).then(
          ({ rest }) => add(p, sock, rest),
          (err: Error) => {
            if (err instanceof RefusedConnection) events.refused(err);
            if (!over) end(new TransportError(`rank ${rank} could not connect to rank ${p} at ${where}: ${err.message}`));
          },
        );
      });
    }
  });
}
