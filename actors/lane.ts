// The fast lane between ranks that share memory: messages written into the receiver's inbox,
// one ring per peer, and signalled on one doorbell word (a futex of the native addon where it
// is loaded, else Atomics.wait and notify), instead of a round trip that waits for both
// sides' event loops. Between rank workers of one process the inbox is a SharedArrayBuffer
// and carries small messages (the counts and expert ids exchanges); between launched ranks
// on one host it is a segment of the addon that every peer maps, with slots large enough for
// the EP step's chunks, instead of two trips through the kernel's TCP stack. The bytes are
// the same msgpack messages the ports carry and are checked the same way; whatever does not
// fit (big chunks, a full ring) still goes over the port.
//
// Layout of an inbox: Int32 0 is the doorbell (every write adds one); Int32 1 counts the
// messages its owner still waits for while it sleeps (each write takes one off, and only the
// last wakes it: a wake-up is a system call, and costs most on a busy machine; the event
// loop's listener, which only Atomics.notify wakes, counts as one message); ring s has a
// write count at Int32 2 + 2s (its sender's) and a read count at 3 + 2s (the owner's); its
// SLOTS slots follow the header, each a 4-byte length and up to `capacity` bytes. A reader
// takes each message straight from its slot and releases the slot once done with it, so the
// lane allocates nothing per message. A segment ends with TOKEN_BYTES of random bytes that
// its hello names, so a peer maps the inbox it was offered or none.
//
// An owner listening on its event loop is woken by Atomics.notify between threads; between
// processes the writer knocks on the owner's connection instead (LANE_KNOCK, one small
// frame), and the owner drains its inbox when the knock arrives.

import { randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { loadNative, type NativeAddon } from '../src/native/backend.js';

/** Atomics.waitAsync (Node 16+), missing from this TypeScript lib. */
interface AtomicsWaitAsync {
  waitAsync(a: Int32Array, index: number, value: number): { async: false; value: string } | { async: true; value: Promise<string> };
}

/**
 * Added to the count of awaited messages while the owner sleeps in a futex of the native
 * addon rather than in Atomics.wait (which V8 serves through a process-wide mutex and a
 * condition variable: most of a small exchange's CPU went to sleeping and waking). The
 * writer of the last awaited message then wakes it with the matching call.
 */
const FUTEX_SLEEPER = 1 << 30;

type LaneAddon = Pick<NativeAddon, 'futexWait' | 'futexWake' | 'yieldThread' | 'shmCreate' | 'shmOpen'>;
let loadedLaneAddon: LaneAddon | null | undefined;
/** The addon's futex and segment calls, where it is loaded on Linux; else null (Atomics.wait and notify, no segments). */
function laneAddon(): LaneAddon | null {
  if (loadedLaneAddon === undefined) {
    const addon = loadNative();
    loadedLaneAddon = addon && process.platform === 'linux' && typeof addon.futexWait === 'function' ? addon : null;
  }
  return loadedLaneAddon;
}

/**
 * How long a rank with the addon yields its core before it sleeps for lane messages: a peer
 * that shares the core (four ranks on two cores, say) then runs at once and writes, where a
 * futex sleep and wake-up cost a round trip through the scheduler. Spinning without
 * yielding took the core from the very peer it waited for, and was slower.
 */
const YIELD_MS = 0.02;

/** Slots per ring (a power of two): a sender may run this many messages ahead of its reader. */
const SLOTS = 4;

/** Who shares an inbox: threads of one process, or processes of one host. */
export type Between = 'threads' | 'processes';

/**
 * Bytes of all rings of one inbox together (threads: small enough for hundreds of ranks per
 * process; processes: a segment's pages are only allocated once written), and the bounds of
 * its slot size (a counts message takes ~100 bytes; an EP step's chunk at T=1024, D=256
 * about 512 KiB).
 */
const SIZING: Record<Between, { inbox: number; min: number; max: number }> = {
  threads: { inbox: 256 * 1024, min: 256, max: 16 * 1024 },
  processes: { inbox: 32 * 1024 * 1024, min: 256, max: 1024 * 1024 },
};

/** Random bytes at the end of a segment, which its hello names. */
const TOKEN_BYTES = 16;

function capacityFor(peers: number, between: Between): number {
  const { inbox, min, max } = SIZING[between];
  let c = max;
  while (c > min && peers * SLOTS * (c + 8) > inbox) c /= 2;
  return c;
}

function header(peers: number): number {
  return Math.ceil(((2 + 2 * peers) * 4) / 8) * 8;
}

function inboxBytes(peers: number, between: Between): number {
  return header(peers) + peers * SLOTS * (capacityFor(peers, between) + 8);
}

/** What a rank posts each worker-thread peer once: where to write to it, and from which thread. */
export interface LaneHello {
  readonly lane: SharedArrayBuffer;
  readonly rings: number;
  readonly ring: number;
  readonly thread: number;
}

export function isLaneHello(m: unknown): m is { lane: unknown; rings: unknown; ring: unknown; thread: unknown } {
  return !!m && typeof m === 'object' && 'lane' in m;
}

/** What a launched rank tells each peer once: the segment of its inbox, and on which host it is. */
export interface SegmentHello {
  readonly segment: string;
  readonly token: string;
  readonly host: string;
  readonly rings: number;
  readonly ring: number;
}

export function isSegmentHello(m: unknown): m is Partial<Record<keyof SegmentHello, unknown>> {
  return !!m && typeof m === 'object' && 'segment' in m;
}

/** What a writer sends a process peer that listens on its event loop: look in your inbox. */
export const LANE_KNOCK: object = Object.freeze({ knock: true });

let bootId: string | null | undefined;
/** This host's boot id (Linux): ranks with the same one may map each other's segments. */
function hostId(): string | null {
  if (bootId === undefined) {
    try {
      bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim() || null;
    } catch {
      bootId = null;
    }
  }
  return bootId;
}

/**
 * Whether launched ranks here can share an inbox: the addon on Linux, unless
 * EP_ACTORS_SHM_DISABLE=1 keeps every pair to its connection (as NCCL_SHM_DISABLE does NCCL's).
 */
export function segmentsAvailable(): boolean {
  return process.env.EP_ACTORS_SHM_DISABLE !== '1' && !!laneAddon() && hostId() !== null;
}

/** This rank's inbox: one ring per peer, drained by this thread only. */
export class Inbox {
  readonly memory: SharedArrayBuffer | ArrayBuffer;
  private readonly words: Int32Array;
  private readonly bytes: Uint8Array;
  /** The largest message a ring slot holds. */
  readonly capacity: number;
  private readonly ringOf = new Map<number, number>();
  private readonly peerOf: number[];
  /** The doorbell value the last drain saw. */
  private rung = 0;
  /** Whether the event loop waits for the doorbell (waitAsync), which any write must wake. */
  private listening = false;
  /** The segment's path and token (processes only). */
  private readonly segment: { path: string; token: string } | null = null;
  /** Resolves a pending waitAsync when a peer knocks (processes only). */
  private onKnock: (() => void) | null = null;

  /** Throws where a segment cannot be made (between processes: see segmentsAvailable). */
  constructor(
    peers: readonly number[],
    readonly between: Between = 'threads',
  ) {
    this.capacity = capacityFor(peers.length, between);
    this.peerOf = [...peers];
    peers.forEach((p, s) => this.ringOf.set(p, s));
    const bytes = inboxBytes(peers.length, between);
    if (between === 'threads') this.memory = new SharedArrayBuffer(bytes);
    else {
      const token = randomBytes(TOKEN_BYTES);
      const made = laneAddon()!.shmCreate(bytes + TOKEN_BYTES);
      new Uint8Array(made.buffer, bytes).set(token);
      this.memory = made.buffer;
      this.segment = { path: made.path, token: token.toString('hex') };
    }
    this.words = new Int32Array(this.memory, 0, bytes / 4);
    this.bytes = new Uint8Array(this.memory, 0, bytes);
  }

  hello(peer: number, thread: number): LaneHello {
    return { lane: this.memory as SharedArrayBuffer, rings: this.peerOf.length, ring: this.ringOf.get(peer)!, thread };
  }

  segmentHello(peer: number): SegmentHello {
    return { segment: this.segment!.path, token: this.segment!.token, host: hostId()!, rings: this.peerOf.length, ring: this.ringOf.get(peer)! };
  }

  /**
   * Hands every message waiting in the rings to `deliver`, as a view of its slot that is
   * valid until `deliver` returns: the slot is then released, and its sender reuses it.
   */
  drain(deliver: (peer: number, bytes: Uint8Array) => void): void {
    this.rung = Atomics.load(this.words, 0);
    for (let s = 0; s < this.peerOf.length; s++) {
      const written = Atomics.load(this.words, 2 + 2 * s);
      for (let read = this.words[3 + 2 * s]!; read !== written; read = (read + 1) | 0) {
        const at = slotAt(this.peerOf.length, this.capacity, s, read);
        const length = Math.max(0, Math.min(this.words[at / 4]!, this.capacity)); // a peer is trusted with nothing
        try {
          deliver(this.peerOf[s]!, this.bytes.subarray(at + 8, at + 8 + length));
        } finally {
          Atomics.store(this.words, 3 + 2 * s, (read + 1) | 0);
        }
      }
    }
  }

  /** Blocks this thread until `missing` more messages came (or `ms` pass); false if none came. */
  waitSync(ms: number, missing: number): boolean {
    // While this thread sleeps its event loop cannot run, so a pending listener need not be
    // woken meanwhile: the owner drains before it returns to the loop, and the count goes
    // back to 1 (listening) below, so later writes notify it again.
    const futex = laneAddon();
    if (futex) {
      const until = performance.now() + Math.min(ms, YIELD_MS);
      do {
        if (Atomics.load(this.words, 0) !== this.rung) return true;
        futex.yieldThread();
      } while (performance.now() < until);
    }
    const shared = this.between === 'processes';
    Atomics.store(this.words, 1, futex ? FUTEX_SLEEPER + missing : this.listening ? 1 : missing);
    // A write between the last drain and the count going up woke nobody: look before sleeping.
    const woke =
      Atomics.load(this.words, 0) !== this.rung ||
      (futex ? futex.futexWait(this.words, 0, this.rung, ms, shared) : Atomics.wait(this.words, 0, this.rung, ms)) !== 'timed-out';
    Atomics.store(this.words, 1, this.listening ? 1 : 0);
    return woke;
  }

  /** Resolves when a peer writes after the last drain (between processes: once it knocks); never rejects. */
  waitAsync(): Promise<unknown> {
    this.listening = true;
    Atomics.store(this.words, 1, 1);
    const done = () => {
      this.listening = false;
      Atomics.store(this.words, 1, 0);
    };
    if (this.between === 'processes') {
      // A write before the count went up knocked on nobody: look before listening.
      if (Atomics.load(this.words, 0) !== this.rung) return Promise.resolve(done());
      return new Promise<void>((resolve) => (this.onKnock = resolve)).then(done);
    }
    const w = (Atomics as unknown as AtomicsWaitAsync).waitAsync(this.words, 0, this.rung);
    if (!w.async) return Promise.resolve(done());
    return w.value.then(done);
  }

  /** A peer knocked (processes): a pending waitAsync resolves. */
  knocked(): void {
    const resolve = this.onKnock;
    this.onKnock = null;
    resolve?.();
  }
}

function slotAt(peers: number, capacity: number, ring: number, index: number): number {
  return header(peers) + (ring * SLOTS + (index & (SLOTS - 1))) * (capacity + 8);
}

const isCount = (x: unknown, below: number): x is number => Number.isSafeInteger(x) && (x as number) >= 0 && (x as number) < below;

/** A peer's inbox as this rank writes to it (one ring, one writer). */
export class Outbox {
  private readonly words: Int32Array;
  private readonly bytes: Uint8Array;
  /** The largest message a ring slot holds. */
  readonly capacity: number;

  private constructor(
    memory: SharedArrayBuffer | ArrayBuffer,
    private readonly rings: number,
    private readonly ring: number,
    readonly between: Between,
    /** Wakes an owner that listens on its event loop (between processes: a knock on its connection). */
    private readonly wakeListener: () => void,
  ) {
    const bytes = inboxBytes(rings, between);
    this.words = new Int32Array(memory, 0, bytes / 4);
    this.bytes = new Uint8Array(memory, 0, bytes);
    this.capacity = capacityFor(rings, between);
  }

  /** The outbox a worker-thread peer's hello describes, or null when it does not describe a well-formed inbox. */
  static of(m: { lane: unknown; rings: unknown; ring: unknown }): Outbox | null {
    const { lane, rings, ring } = m;
    if (!(lane instanceof SharedArrayBuffer) || !isCount(rings, 1 << 20) || !isCount(ring, rings)) return null;
    if (lane.byteLength !== inboxBytes(rings, 'threads')) return null;
    const words = new Int32Array(lane, 0, 1);
    return new Outbox(lane, rings, ring, 'threads', () => Atomics.notify(words, 0));
  }

  /**
   * The outbox a launched peer's hello describes, mapped; null when the peer is on another
   * host, its segment cannot be mapped or is not the one the hello names, or this rank keeps
   * to TCP (the pair then keeps to its connection). `knock` tells the peer, by that
   * connection, to look in its inbox.
   */
  static mapped(m: Partial<Record<keyof SegmentHello, unknown>>, knock: () => void): Outbox | null {
    const { segment, token, host, rings, ring } = m;
    if (!segmentsAvailable() || host !== hostId() || typeof segment !== 'string' || typeof token !== 'string' || !isCount(rings, 1 << 16) || !isCount(ring, rings)) return null;
    const bytes = inboxBytes(rings, 'processes');
    let memory: ArrayBuffer;
    try {
      memory = laneAddon()!.shmOpen(segment, bytes + TOKEN_BYTES);
    } catch {
      return null;
    }
    const expected = Buffer.from(token, 'hex');
    if (expected.length !== TOKEN_BYTES || !timingSafeEqual(expected, new Uint8Array(memory, bytes))) return null;
    return new Outbox(memory, rings, ring, 'processes', knock);
  }

  /** Writes one message and rings the doorbell; false when it does not fit or the ring is full. */
  write(bytes: Uint8Array): boolean {
    if (bytes.byteLength > this.capacity) return false;
    const written = this.words[2 + 2 * this.ring]!;
    if (((written - Atomics.load(this.words, 3 + 2 * this.ring)) | 0) >= SLOTS) return false;
    const at = slotAt(this.rings, this.capacity, this.ring, written);
    this.words[at / 4] = bytes.byteLength;
    this.bytes.set(bytes, at + 8);
    Atomics.store(this.words, 2 + 2 * this.ring, (written + 1) | 0);
    Atomics.add(this.words, 0, 1);
    const before = Atomics.sub(this.words, 1, 1);
    if (before === 1) this.wakeListener();
    else if (before === FUTEX_SLEEPER + 1) laneAddon()?.futexWake(this.words, 0, this.between === 'processes'); // only an owner with the addon sleeps so
    return true;
  }
}
