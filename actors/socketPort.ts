// TCP connections that look like MessagePorts to the PortMesh, so ranks in different
// processes or on different nodes exchange the same msgpack chunks, checked the same way,
// as worker ranks do over MessagePorts: each message is one frame, a 4-byte little-endian
// length then the bytes; each connection starts with a frame naming the connecting rank,
// and a rank that finishes says goodbye with how many collectives it issued (a frame
// starting 0xc1, which never starts msgpack), so its peers can tell a finished rank from
// a crashed one, and a collective it will never join from one it is late for.
import { connect, type Server, type Socket } from 'node:net';
import type { PeerAddress } from './rendezvous.js';
import { TransportError, type PeerPort } from './transport.js';

/** A frame longer than this is a corrupt stream, not a chunk (msgpack bin32 tops out at 4 GiB). */
const MAX_FRAME = 2 ** 31;
/** First byte of a goodbye frame: 0xc1 is never valid msgpack. */
const GOODBYE = 0xc1;

/**
 * What a rank tells its peers when it ends: collectives it issued per communicator kind,
 * and, when it stopped on an error rather than finishing, what the error was.
 */
export interface Goodbye {
  readonly issued: Readonly<Record<string, number>>;
  readonly stopped?: string;
}

export interface SocketEvents {
  /** The connection failed or closed before the peer said goodbye. */
  broken(reason: string): void;
  /** The peer ended: finished its step, or stopped on an error (goodbye.stopped). */
  finished(goodbye: Goodbye): void;
}

export class SocketPort implements PeerPort {
  #listener: ((m: unknown) => void) | null = null;
  /** Frames that arrived before the mesh listened: a MessagePort queues them too. */
  readonly #backlog: Uint8Array[] = [];
  #header = Buffer.alloc(4);
  #headerBytes = 0;
  #frame: Uint8Array | null = null;
  #frameBytes = 0;
  /** Set once either side has said goodbye: a close after that is not a failure. */
  #ended = false;

  constructor(
    readonly socket: Socket,
    private readonly events: SocketEvents,
    /** On an accepted connection: receives the first frame, the dialling rank's hello. */
    private onHello: ((frame: Uint8Array) => void) | null = null,
  ) {
    socket.setNoDelay(true);
    socket.on('data', (c: Buffer) => this.#read(c));
    socket.on('error', (err) => this.#broken(err.message));
    socket.on('close', () => this.#broken('the connection closed'));
  }

  #broken(reason: string): void {
    if (this.#ended) return;
    this.#ended = true;
    this.events.broken(reason);
  }

  postMessage(message: unknown): void {
    if (message instanceof ArrayBuffer) return; // a consumed chunk's buffer: only reused within one process
    if (!(message instanceof Uint8Array)) throw new TransportError('a TCP connection carries msgpack chunks only, not staged announcements');
    const header = Buffer.alloc(4);
    header.writeUInt32LE(message.byteLength);
    this.socket.write(header);
    this.socket.write(Buffer.from(message.buffer, message.byteOffset, message.byteLength));
  }

  on(_event: 'message', listener: (message: unknown) => void): this {
    this.#listener = listener;
    for (const m of this.#backlog.splice(0)) listener(m);
    return this;
  }

  /** Tells the peer this rank ended (and what it issued), then closes the connection. */
  goodbye(g: Goodbye): void {
    if (this.#ended) return;
    this.#ended = true;
    const json = Buffer.from(JSON.stringify(g));
    const frame = new Uint8Array(1 + json.length);
    frame[0] = GOODBYE;
    frame.set(json, 1);
    this.postMessage(frame);
    this.socket.end();
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

  #read(c: Buffer): void {
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
        // A fresh buffer per frame starts 8-aligned, so decoded tensors are views, not copies.
        this.#frame = new Uint8Array(Buffer.allocUnsafeSlow(length).buffer, 0, length);
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
        const hello = this.onHello;
        this.onHello = null;
        if (hello) hello(frame);
        else if (frame[0] === GOODBYE && frame[1] === 0x7b /* '{' */) this.#goodbye(frame);
        else if (this.#listener) this.#listener(frame);
        else this.#backlog.push(frame);
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

/**
 * Connects this rank to every other: it dials the ranks below it and accepts the ranks
 * above it on the listening server (at peers[rank]). `events` hears of any connection that
 * fails or closes without a goodbye, and of each goodbye, once the mesh is up.
 */
export async function socketMesh(
  rank: number,
  peers: readonly PeerAddress[],
  listening: ReturnType<typeof acceptEarly>,
  events: { broken(peer: number, reason: string): void; finished(peer: number, goodbye: Goodbye): void },
  timeoutMs = 60_000,
): Promise<Map<number, SocketPort>> {
  const ports = new Map<number, SocketPort>();
  const expected = peers.length - 1;
  if (expected === 0) return ports;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      const missing = peers.flatMap((_, r) => (r === rank || ports.has(r) ? [] : [r]));
      reject(new TransportError(`rank ${rank} could not connect to rank${missing.length === 1 ? '' : 's'} ${missing.join(', ')} within ${timeoutMs} ms`));
    }, timeoutMs);
    const add = (peer: number, port: SocketPort) => {
      ports.set(peer, port);
      if (ports.size === expected) {
        clearTimeout(timer);
        resolve(ports);
      }
    };
    // Events of a connection count once it is in the mesh; before that, setup fails on its own.
    const eventsOf = (peer: () => number | null): SocketEvents => ({
      broken: (reason) => {
        const p = peer();
        if (p !== null && ports.has(p)) events.broken(p, reason);
      },
      finished: (goodbye) => {
        const p = peer();
        if (p !== null && ports.has(p)) events.finished(p, goodbye);
      },
    });
    const accept = (sock: Socket) => {
      let peer: number | null = null;
      const port: SocketPort = new SocketPort(sock, eventsOf(() => peer), (hello) => {
        const from = hello.byteLength === 4 ? new DataView(hello.buffer, hello.byteOffset, 4).getUint32(0, true) : -1;
        if (from <= rank || from >= peers.length || ports.has(from)) {
          sock.destroy(); // not a rank that should dial this one
          return;
        }
        peer = from;
        add(from, port);
      });
    };
    listening.take().forEach(accept);
    listening.server.on('connection', accept);
    for (let p = 0; p < rank; p++) {
      const sock = connect(peers[p]!.port, peers[p]!.host, () => {
        const hello = new Uint8Array(4);
        new DataView(hello.buffer).setUint32(0, rank, true);
        port.postMessage(hello);
        add(p, port);
      });
      const port = new SocketPort(sock, eventsOf(() => p));
      sock.once('error', (err) => {
        if (!ports.has(p)) {
          clearTimeout(timer);
          reject(new TransportError(`rank ${rank} could not connect to rank ${p} at ${peers[p]!.host}:${peers[p]!.port}: ${err.message}`));
        }
      });
    }
  });
}
