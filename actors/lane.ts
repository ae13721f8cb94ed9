// The fast lane between rank workers of one process: small messages (the counts and expert
// ids exchanges) written into the receiver's inbox, a SharedArrayBuffer of one ring per peer,
// and signalled on one doorbell word (a futex of the native addon where it is loaded, else
// Atomics.wait and notify), instead of a MessagePort round trip that waits for both threads'
// event loops. The bytes are the same msgpack messages the ports carry and are checked the
// same way; whatever does not fit (big chunks, a full ring) still goes over the port.
//
// Layout of an inbox: Int32 0 is the doorbell (every write adds one); Int32 1 counts the
// messages its owner still waits for while it sleeps (each write takes one off, and only the
// last wakes it: a wake-up is a system call, and costs most on a busy machine; the event
// loop's listener, which only Atomics.notify wakes, counts as one message); ring s has a
// write count at Int32 2 + 2s (its sender's) and a read count at 3 + 2s (the owner's); its
// SLOTS slots follow the header, each a 4-byte length and up to `capacity` bytes. A reader
// takes each message straight from its slot and releases the slot once done with it, so the
// lane allocates nothing per message.

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

let futexAddon: Pick<NativeAddon, 'futexWait' | 'futexWake'> | null | undefined;
/** The addon's futex calls, where it is loaded on Linux; else null (Atomics.wait and notify). */
function futexes(): Pick<NativeAddon, 'futexWait' | 'futexWake'> | null {
  if (futexAddon === undefined) {
    const addon = loadNative();
    futexAddon = addon && process.platform === 'linux' && typeof addon.futexWait === 'function' ? addon : null;
  }
  return futexAddon;
}

/** Slots per ring (a power of two): a sender may run this many messages ahead of its reader. */
const SLOTS = 4;
/** Bytes of all rings of one inbox together: small enough for hundreds of ranks per process. */
const INBOX_BYTES = 256 * 1024;
/** Slot sizes: the largest that fits INBOX_BYTES, within these bounds (a counts message takes ~100 bytes). */
const MIN_CAPACITY = 256;
const MAX_CAPACITY = 16 * 1024;

function capacityFor(peers: number): number {
  let c = MAX_CAPACITY;
  while (c > MIN_CAPACITY && peers * SLOTS * (c + 8) > INBOX_BYTES) c /= 2;
  return c;
}

function header(peers: number): number {
  return Math.ceil(((2 + 2 * peers) * 4) / 8) * 8;
}

function inboxBytes(peers: number): number {
  return header(peers) + peers * SLOTS * (capacityFor(peers) + 8);
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

/** This rank's inbox: one ring per peer, drained by this thread only. */
export class Inbox {
  readonly sab: SharedArrayBuffer;
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

  constructor(peers: readonly number[]) {
    this.capacity = capacityFor(peers.length);
    this.peerOf = [...peers];
    peers.forEach((p, s) => this.ringOf.set(p, s));
    this.sab = new SharedArrayBuffer(inboxBytes(peers.length));
    this.words = new Int32Array(this.sab);
    this.bytes = new Uint8Array(this.sab);
  }

  hello(peer: number, thread: number): LaneHello {
    return { lane: this.sab, rings: this.peerOf.length, ring: this.ringOf.get(peer)!, thread };
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
    const futex = futexes();
    Atomics.store(this.words, 1, futex ? FUTEX_SLEEPER + missing : this.listening ? 1 : missing);
    // A write between the last drain and the count going up woke nobody: look before sleeping.
    const woke =
      Atomics.load(this.words, 0) !== this.rung ||
      (futex ? futex.futexWait(this.words, 0, this.rung, ms) : Atomics.wait(this.words, 0, this.rung, ms)) !== 'timed-out';
    Atomics.store(this.words, 1, this.listening ? 1 : 0);
    return woke;
  }

  /** Resolves when a peer writes after the last drain; never rejects. */
  waitAsync(): Promise<unknown> {
    this.listening = true;
    Atomics.store(this.words, 1, 1);
    const w = (Atomics as unknown as AtomicsWaitAsync).waitAsync(this.words, 0, this.rung);
    const done = () => {
      this.listening = false;
      Atomics.store(this.words, 1, 0);
    };
    if (!w.async) return Promise.resolve(done());
    return w.value.then(done);
  }
}

function slotAt(peers: number, capacity: number, ring: number, index: number): number {
  return header(peers) + (ring * SLOTS + (index & (SLOTS - 1))) * (capacity + 8);
}

/** A peer's inbox as this rank writes to it (one ring, one writer). */
export class Outbox {
  private readonly words: Int32Array;
  private readonly bytes: Uint8Array;
  /** The largest message a ring slot holds. */
  readonly capacity: number;

  private constructor(
    sab: SharedArrayBuffer,
    private readonly rings: number,
    private readonly ring: number,
  ) {
    this.words = new Int32Array(sab);
    this.bytes = new Uint8Array(sab);
    this.capacity = capacityFor(rings);
  }

  /** The outbox a hello describes, or null when it does not describe a well-formed inbox. */
  static of(m: { lane: unknown; rings: unknown; ring: unknown }): Outbox | null {
    const { lane, rings, ring } = m;
    const count = (x: unknown, below: number) => Number.isSafeInteger(x) && (x as number) >= 0 && (x as number) < below;
    if (!(lane instanceof SharedArrayBuffer) || !count(rings, 1 << 20) || !count(ring, rings as number)) return null;
    const n = rings as number;
    return lane.byteLength === inboxBytes(n) ? new Outbox(lane, n, ring as number) : null;
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
    if (before === 1) Atomics.notify(this.words, 0);
    else if (before === FUTEX_SLEEPER + 1) futexes()?.futexWake(this.words, 0); // only a thread of this process with the addon sleeps so
    return true;
  }
}
