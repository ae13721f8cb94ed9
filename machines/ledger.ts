// Communicator bookkeeping with NCCL's semantics: every communicator orders its collectives
// by position; the n-th collective of every member must be the same op with consistent
// sizes; a collective blocks its rank until every member has issued it. The tracker finds
// mismatch, missing and cycle at the moment the evidence exists. The actor runtime's
// supervisor and the discrete-event engine both feed it, so they share one implementation
// of matching and verdicts.
import type { IssuedCollective } from './snapshot.js';
import { commOf, communicators, ppOf, type CommKind, type CommunicatorSpec, type Mesh } from './mesh.js';

export interface LedgerEntry extends IssuedCollective {
  readonly communicator: string;
  readonly position: number;
  readonly rank: number;
  /** Rank within the communicator. */
  readonly member: number;
  readonly dtype: string;
}

/**
 * A hung communicator. mismatch, missing and cycle are causes; `blocked` is a communicator
 * that waits on a member blocked in another hung one (listed, never the headline). Culprits
 * come from the ledger: the members whose issued sequence departs from the others at the
 * position, that finished without it, or that wait on each other in a cycle.
 */
export interface Finding {
  readonly kind: 'mismatch' | 'missing' | 'cycle' | 'blocked';
  readonly communicator: string;
  readonly position: number;
  readonly culprits: number[];
  readonly detail: string;
}

interface OpenPosition {
  /** Entries indexed by member. */
  readonly slot: (LedgerEntry | undefined)[];
  issued: number;
  /** Proved inconsistent: it never completes, whoever issues it later. */
  broken: boolean;
  /** What the caller's own check (issue's `judge`) found here first. */
  judged: Finding | null;
  /** The communicator's `verified` entries when the position opened. */
  readonly verified: readonly (LedgerEntry | undefined)[] | null;
  /**
   * Per member, what is known of its all-to-all splits: 1 they are those of `verified` as
   * they were, 2 swapped (a combine after its dispatch), 3 every split of both is `uniform`
   * (fwd.counts: one count per peer), 0 nothing; and how many issued members have each kind.
   */
  readonly reuse: Uint8Array;
  readonly reused: [number, number, number, number];
  /** The value of the first member's splits whose every split is that one value. */
  uniform: number | null;
}

interface CommState {
  readonly spec: CommunicatorSpec;
  /** Member index of each global rank in the communicator. */
  readonly memberOf: Map<number, number>;
  readonly open: Map<number, OpenPosition>;
  /**
   * The entries of the last all-to-all position that completed, by member: every pair of
   * them was checked. A later position whose members bring the same splits again (an EP
   * layer's five data exchanges all move the routing's counts) needs no pair checked twice,
   * so a position of n members costs O(n) instead of O(n²) comparisons.
   */
  verified: readonly (LedgerEntry | undefined)[] | null;
  /** Next position each member will issue. */
  readonly next: number[];
}

export class CollectiveTracker {
  readonly mesh: Mesh;
  /** Every entry in issue order (the ledger). */
  readonly entries: LedgerEntry[] = [];
  private readonly comms = new Map<string, CommState>();
  private readonly blocked = new Map<number, LedgerEntry>();
  private readonly finished = new Set<number>();

  /**
   * retain: keep every entry in `entries` (off for long soaks, where only verdicts matter).
   * specs: the communicators, when they are not the mesh's (a post-mortem's process groups).
   */
  constructor(
    mesh: Mesh,
    private readonly retain = true,
    specs: readonly CommunicatorSpec[] = communicators(mesh),
  ) {
    this.mesh = mesh;
    for (const spec of specs) {
      this.comms.set(spec.id, { spec, memberOf: new Map(spec.members.map((r, m) => [r, m])), open: new Map(), verified: null, next: spec.members.map(() => 0) });
    }
  }

  /** The entry a rank is blocked on, if any. */
  blockedOn(rank: number): LedgerEntry | undefined {
    return this.blocked.get(rank);
  }

  isFinished(rank: number): boolean {
    return this.finished.has(rank);
  }

  /**
   * Record that `rank` issued `c`. Returns the entries of the position when this completed
   * it (every member has issued; all of them unblock), and a finding when the issue proves
   * a mismatch or that a member will never come. Cycles are found by findCycle(), which
   * callers run when a rank blocks (cheap at actor-runtime sizes) or when nothing else can
   * move (the discrete-event engine at thousands of ranks). `communicator` names the
   * communicator when the tracker was given its own specs instead of the mesh's. `judge` is
   * the caller's own check of the entry at its position (a post-mortem's shapes and
   * states): what it finds breaks the position as the tracker's own checks do.
   */
  issue(rank: number, c: IssuedCollective, dtype: string, communicator?: string, judge?: (entry: LedgerEntry) => Finding | null): { entry: LedgerEntry; completed: LedgerEntry[] | null; finding: Finding | null } {
    if (this.blocked.has(rank)) throw new Error(`rank ${rank} issued ${c.op} while still blocked in ${this.blocked.get(rank)!.op}`);
    const comm = communicator === undefined ? this.commFor(rank, c.comm) : this.comms.get(communicator);
    if (!comm || !comm.memberOf.has(rank)) throw new Error(`rank ${rank} issued ${c.op} on ${communicator}, a communicator it is not a member of`);
    const member = comm.memberOf.get(rank)!;
    const position = comm.next[member]!++;
    let pos = comm.open.get(position);
    const n = comm.spec.members.length;
    if (!pos) comm.open.set(position, (pos = { slot: new Array<LedgerEntry | undefined>(n), issued: 0, broken: false, judged: null, verified: comm.verified, reuse: new Uint8Array(n), reused: [0, 0, 0, 0], uniform: null }));
    const verified = pos.verified?.[member];
    let reuse: 0 | 1 | 2 | 3 = reuseOf(c, verified);
    if (reuse === 0) {
      const u = uniformOf(c, n);
      if (u !== null && (pos.uniform ??= u) === u) reuse = 3;
    }
    // Splits equal to the verified ones are kept as those arrays: one copy per rank in the ledger, however many exchanges move them.
    const issued = reuse === 0 || reuse === 3 ? c : { ...c, sendSplits: verified![reuse === 1 ? 'sendSplits' : 'recvSplits'], recvSplits: verified![reuse === 1 ? 'recvSplits' : 'sendSplits'] };
    // The spread last: V8 (node 20) takes a slow path for a spread followed by more properties (10x here).
    const entry: LedgerEntry = { communicator: comm.spec.id, position, rank, member, dtype, ...issued };
    if (this.retain) this.entries.push(entry);
    pos.slot[member] = entry;
    pos.issued++;
    pos.reuse[member] = reuse;
    pos.reused[reuse]++;
    this.blocked.set(rank, entry);

    const own = this.checkConsistency(comm, pos, entry);
    const judged = judge?.(entry) ?? null; // called for every entry: the caller may keep it
    if (!own && judged) pos.judged ??= judged;
    const inconsistent = own ?? judged;
    if (inconsistent) pos.broken = true;
    const finding = inconsistent ?? this.checkMissing(comm, position);
    if (finding) return { entry, completed: null, finding };
    if (pos.issued === n && !pos.broken) {
      comm.open.delete(position);
      const slot = pos.slot as LedgerEntry[];
      if (slot.some((e) => e.sendSplits)) comm.verified = slot;
      for (const e of slot) this.blocked.delete(e.rank);
      return { entry, completed: slot, finding: null };
    }
    return { entry, completed: null, finding: null };
  }

  /** Record that `rank` finished its step (or stopped early); finds peers left waiting on it. */
  finish(rank: number): Finding | null {
    this.finished.add(rank);
    for (const comm of this.comms.values()) {
      const member = comm.memberOf.get(rank);
      if (member === undefined) continue;
      const finding = this.checkMissing(comm, comm.next[member]!);
      if (finding) return finding;
    }
    return null;
  }

  /** Open positions at the end of a run (should be none when every rank finished). */
  openPositions(): { communicator: string; position: number; issuedBy: number[] }[] {
    const out = [];
    for (const comm of this.comms.values()) {
      for (const [position, { slot }] of comm.open) out.push({ communicator: comm.spec.id, position, issuedBy: slot.flatMap((e) => (e ? [e.rank] : [])) });
    }
    return out;
  }

  private commFor(rank: number, kind: CommKind): CommState {
    const id = commOf(this.mesh, rank, kind);
    const comm = this.comms.get(id);
    if (!comm) throw new Error(`rank ${rank} issued a ${kind} collective but the mesh (ep=${this.mesh.ep}, dp=${this.mesh.dp}, pp=${ppOf(this.mesh)}) has no ${kind} communicator`);
    return comm;
  }

  /** Same op, layer, micro-batch and dtype; all-to-all splits must pair up (send_i[j] = recv_j[i]). */
  private checkConsistency(comm: CommState, pos: OpenPosition, e: LedgerEntry): Finding | null {
    const { slot, reuse } = pos;
    const position = e.position;
    const mismatch = (pair: number[], detail: string): Finding => ({ kind: 'mismatch', communicator: comm.spec.id, position, culprits: oddOnesOut(slot) ?? splitOutliers(slot) ?? [...pair].sort((a, b) => a - b), detail });
    const i = e.member;
    // Every earlier entry agreed with the others, so op, layer, unit and dtype need one comparison.
    const ref = slot.find((o) => o !== undefined && o !== e);
    if (!ref) return null;
    if (ref.op !== e.op || ref.layer !== e.layer || ref.microBatch !== e.microBatch || ref.unit !== e.unit) {
      return mismatch([ref.rank, e.rank], `rank ${ref.rank} issued ${describe(ref)} but rank ${e.rank} issued ${describe(e)}`);
    }
    if (ref.dtype !== e.dtype) return mismatch([ref.rank, e.rank], `rank ${ref.rank} sends ${ref.dtype} but rank ${e.rank} sends ${e.dtype} in ${e.op}`);
    // Two members whose splits are the verified position's, both as they were or both swapped, pair up as they did
    // there; two whose splits all hold the same value pair up whatever the peer.
    const kind = reuse[i]!;
    if (kind !== 0 && pos.reused[kind] === pos.issued) return null;
    const send = e.sendSplits;
    const recv = e.recvSplits;
    for (let j = 0; j < slot.length; j++) {
      const other = slot[j];
      if (other === undefined || other === e || (kind !== 0 && reuse[j] === kind)) continue;
      if (send && recv && other.sendSplits && other.recvSplits) {
        if (send[j] !== other.recvSplits[i]) {
          return mismatch([e.rank, other.rank], `rank ${e.rank} sends ${send[j]} rows to rank ${other.rank} but rank ${other.rank} expects ${other.recvSplits[i]} in ${e.op}`);
        }
        if (other.sendSplits[i] !== recv[j]) {
          return mismatch([other.rank, e.rank], `rank ${other.rank} sends ${other.sendSplits[i]} rows to rank ${e.rank} but rank ${e.rank} expects ${recv[j]} in ${e.op}`);
        }
      } else if (other.size !== e.size) {
        return mismatch([other.rank, e.rank], `rank ${other.rank} issued ${e.op} of ${other.size} elements but rank ${e.rank} of ${e.size}`);
      }
    }
    return null;
  }

  /** A position some members issued while another member has finished without issuing it. */
  private checkMissing(comm: CommState, position: number): Finding | null {
    const slot = comm.open.get(position)?.slot;
    if (!slot || this.finished.size === 0) return null;
    const gone = comm.spec.members.filter((r, m) => slot[m] === undefined && this.finished.has(r));
    if (gone.length === 0) return null;
    const waiting = slot.flatMap((e) => (e ? [e] : []));
    return {
      kind: 'missing',
      communicator: comm.spec.id,
      position,
      culprits: gone,
      detail: `rank${gone.length > 1 ? 's' : ''} ${gone.join(', ')} finished without issuing position ${position}, where rank${waiting.length > 1 ? 's' : ''} ${waiting.map((w) => w.rank).join(', ')} ${waiting.length > 1 ? 'wait' : 'waits'} in ${waiting[0]!.op}`,
    };
  }

  /**
   * Every hung communicator, once the run is quiescent (every rank blocked or finished), in
   * a canonical order: causes (mismatch, missing, cycle) by communicator, then communicators
   * that only wait on a member blocked elsewhere. The state at quiescence does not depend on
   * the order events arrived in, so neither does this list: its first entry is the verdict
   * every engine gives.
   */
  hangs(): Finding[] {
    const causes: Finding[] = [];
    const blocked: Finding[] = [];
    const cycle = this.findCycle();
    const inCycle = new Set(cycle ? cycle.culprits.map((r) => this.blocked.get(r)!.communicator) : []);
    for (const comm of this.comms.values()) {
      for (const position of [...comm.open.keys()].sort((a, b) => a - b)) {
        const pos = comm.open.get(position)!;
        const slot = pos.slot;
        const found = this.inconsistencyAt(comm, pos) ?? pos.judged ?? this.checkMissing(comm, position);
        if (found) causes.push(found);
        else if (inCycle.has(comm.spec.id)) {
          if (cycle!.communicator === comm.spec.id) causes.push(cycle!);
        } else {
          const elsewhere = comm.spec.members.flatMap((r, m) => {
            const e = slot[m] ? undefined : this.blocked.get(r);
            return e ? [`rank ${r} is blocked in ${e.op} (${e.communicator}, position ${e.position})`] : [];
          });
          const culprits = comm.spec.members.filter((r, m) => !slot[m]);
          blocked.push({ kind: 'blocked', communicator: comm.spec.id, position, culprits, detail: `waits on ${elsewhere.join(', ') || 'members that never issued it'}` });
        }
      }
    }
    return [...causes, ...blocked];
  }

  /** A consistency finding at an open position, judged over every entry there. */
  private inconsistencyAt(comm: CommState, pos: OpenPosition): Finding | null {
    for (const e of pos.slot) {
      const f = e && this.checkConsistency(comm, pos, e);
      if (f) return f;
    }
    return null;
  }

  /**
   * Wait-for graph over blocked ranks: a rank blocked in a collective waits on every member
   * that has not issued that position yet (AND edges). A cycle of blocked ranks can never
   * make progress: a deadlock, certain now rather than after a timeout.
   */
  findCycle(): Finding | null {
    const waitsOn = (rank: number): number[] => {
      const e = this.blocked.get(rank);
      if (!e) return [];
      const slot = this.comms.get(e.communicator)!.open.get(e.position)?.slot;
      if (!slot) return [];
      return this.comms.get(e.communicator)!.spec.members.filter((r, m) => slot[m] === undefined && this.blocked.has(r));
    };
    const color = new Map<number, 1 | 2>();
    const stack: number[] = [];
    const visit = (r: number): number[] | null => {
      color.set(r, 1);
      stack.push(r);
      for (const n of waitsOn(r)) {
        if (color.get(n) === 1) return stack.slice(stack.indexOf(n));
        if (!color.has(n)) {
          const c = visit(n);
          if (c) return c;
        }
      }
      stack.pop();
      color.set(r, 2);
      return null;
    };
    for (const r of [...this.blocked.keys()].sort((a, b) => a - b)) {
      if (color.has(r)) continue;
      const cycle = visit(r);
      if (cycle) {
        const first = this.blocked.get(cycle[0]!)!;
        const links = cycle.map((r, i) => {
          const e = this.blocked.get(r)!;
          return `rank ${r} waits in ${e.op} (${e.communicator}, position ${e.position}) for rank ${cycle[(i + 1) % cycle.length]}`;
        });
        return { kind: 'cycle', communicator: first.communicator, position: first.position, culprits: [...cycle].sort((a, b) => a - b), detail: links.join('; ') };
      }
    }
    return null;
  }
}

/**
 * At a mismatched position, the members that issued something other than what most
 * issued (op, layer, micro-batch, unit, element count), when there is a clear majority.
 * All-to-all splits differ per rank by design, so they are not compared here.
 */
function oddOnesOut(slot: readonly (LedgerEntry | undefined)[]): number[] | null {
  const groups = new Map<string, number[]>();
  for (const e of slot) {
    if (!e) continue;
    const key = JSON.stringify([e.op, e.layer, e.microBatch, e.unit, e.size, e.dtype]);
    groups.set(key, [...(groups.get(key) ?? []), e.rank]);
  }
  const bySize = [...groups.values()].sort((a, b) => a.length - b.length);
  const largest = bySize.at(-1);
  if (!largest || bySize.length < 2 || bySize.filter((g) => g.length === largest.length).length > 1) return null;
  return bySize.slice(0, -1).flat().sort((a, b) => a - b);
}

/**
 * At a position whose all-to-all splits do not pair up, the members that disagree with the
 * most others (a rank that sized its splits alone disagrees with every peer; each peer only
 * with it), when that singles some out.
 */
function splitOutliers(slot: readonly (LedgerEntry | undefined)[]): number[] | null {
  const entries = slot.filter((e): e is LedgerEntry => !!e?.sendSplits && !!e.recvSplits);
  const disagreements = new Map<number, number>();
  for (const a of entries) {
    for (const b of entries) {
      if (a.member < b.member && (a.sendSplits![b.member] !== b.recvSplits![a.member] || b.sendSplits![a.member] !== a.recvSplits![b.member])) {
        disagreements.set(a.rank, (disagreements.get(a.rank) ?? 0) + 1);
        disagreements.set(b.rank, (disagreements.get(b.rank) ?? 0) + 1);
      }
    }
  }
  const most = Math.max(0, ...disagreements.values());
  const outliers = [...disagreements].filter(([, n]) => n === most).map(([r]) => r);
  return most > 1 && outliers.length < disagreements.size ? outliers.sort((a, b) => a - b) : null;
}

/**
 * Whether an issued all-to-all's splits equal those of `verified` (the member's entry at the
 * last consistent all-to-all): 1 as they were, 2 swapped, 0 otherwise or without splits.
 */
function reuseOf(c: IssuedCollective, verified: LedgerEntry | undefined): 0 | 1 | 2 {
  const { sendSplits: send, recvSplits: recv } = c;
  if (!send || !recv || !verified?.sendSplits || !verified.recvSplits) return 0;
  if (sameValues(send, verified.sendSplits) && sameValues(recv, verified.recvSplits)) return 1;
  if (sameValues(send, verified.recvSplits) && sameValues(recv, verified.sendSplits)) return 2;
  return 0;
}

/** The one value every split of `c` holds (both directions, one per member), or null. */
function uniformOf(c: IssuedCollective, members: number): number | null {
  const { sendSplits: send, recvSplits: recv } = c;
  if (!send || !recv || send.length !== members || recv.length !== members) return null;
  const v = uniformValue(send);
  return v !== null && uniformValue(recv) === v ? v : null;
}

/** Per array, its one value or null; fwd.counts' array of ones is one array for every rank, looked at once. */
const uniformValues = new WeakMap<readonly number[], number | null>();
function uniformValue(a: readonly number[]): number | null {
  let v = uniformValues.get(a);
  if (v === undefined) uniformValues.set(a, (v = a.length > 0 && a.every((x) => x === a[0]) ? a[0]! : null));
  return v;
}

function sameValues(a: readonly number[], b: readonly number[]): boolean {
  if (a === b) return true;
  if (a.length !== b.length) return false;
  for (let k = 0; k < a.length; k++) if (a[k] !== b[k]) return false;
  return true;
}

export function describe(e: Pick<LedgerEntry, 'op' | 'layer' | 'microBatch' | 'unit'>): string {
  return `${e.op}${e.unit ? ` (${e.unit} unit)` : ''} of layer ${e.layer}${e.microBatch ? `, micro-batch ${e.microBatch}` : ''}`;
}
