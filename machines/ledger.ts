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

interface CommState {
  readonly spec: CommunicatorSpec;
  /** Member index of each global rank in the communicator. */
  readonly memberOf: Map<number, number>;
  /** Entries per open position, indexed by member, and how many members have issued it. */
  readonly open: Map<number, (LedgerEntry | undefined)[]>;
  readonly issued: Map<number, number>;
  /** Positions proved inconsistent: they never complete, whoever issues them later. */
  readonly broken: Set<number>;
  /** What the caller's own check (issue's `judge`) found at a position. */
  readonly judged: Map<number, Finding>;
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
      this.comms.set(spec.id, { spec, memberOf: new Map(spec.members.map((r, m) => [r, m])), open: new Map(), issued: new Map(), broken: new Set(), judged: new Map(), next: spec.members.map(() => 0) });
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
    // The spread last: V8 (node 20) takes a slow path for a spread followed by more properties (10x here).
    const entry: LedgerEntry = { communicator: comm.spec.id, position, rank, member, dtype, ...c };
    if (this.retain) this.entries.push(entry);
    let slot = comm.open.get(position);
    if (!slot) comm.open.set(position, (slot = new Array<LedgerEntry | undefined>(comm.spec.members.length)));
    slot[member] = entry;
    const issued = (comm.issued.get(position) ?? 0) + 1;
    comm.issued.set(position, issued);
    this.blocked.set(rank, entry);

    const own = this.checkConsistency(comm, position, entry);
    const judged = judge?.(entry) ?? null; // called for every entry: the caller may keep it
    if (!own && judged && !comm.judged.has(position)) comm.judged.set(position, judged);
    const inconsistent = own ?? judged;
    if (inconsistent) comm.broken.add(position);
    const finding = inconsistent ?? this.checkMissing(comm, position);
    if (finding) return { entry, completed: null, finding };
    if (issued === slot.length && !comm.broken.has(position)) {
      comm.open.delete(position);
      comm.issued.delete(position);
      comm.broken.delete(position);
      for (const e of slot as LedgerEntry[]) this.blocked.delete(e.rank);
      return { entry, completed: slot as LedgerEntry[], finding: null };
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
      for (const [position, slot] of comm.open) out.push({ communicator: comm.spec.id, position, issuedBy: slot.flatMap((e) => (e ? [e.rank] : [])) });
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
  private checkConsistency(comm: CommState, position: number, e: LedgerEntry): Finding | null {
    const slot = comm.open.get(position)!;
    const mismatch = (pair: number[], detail: string): Finding => ({ kind: 'mismatch', communicator: comm.spec.id, position, culprits: oddOnesOut(slot) ?? splitOutliers(slot) ?? [...pair].sort((a, b) => a - b), detail });
    const i = e.member;
    // Every earlier entry agreed with the others, so op, layer, unit and dtype need one comparison.
    const ref = slot.find((o) => o !== undefined && o !== e);
    if (!ref) return null;
    if (ref.op !== e.op || ref.layer !== e.layer || ref.microBatch !== e.microBatch || ref.unit !== e.unit) {
      return mismatch([ref.rank, e.rank], `rank ${ref.rank} issued ${describe(ref)} but rank ${e.rank} issued ${describe(e)}`);
    }
    if (ref.dtype !== e.dtype) return mismatch([ref.rank, e.rank], `rank ${ref.rank} sends ${ref.dtype} but rank ${e.rank} sends ${e.dtype} in ${e.op}`);
    const send = e.sendSplits;
    const recv = e.recvSplits;
    for (let j = 0; j < slot.length; j++) {
      const other = slot[j];
      if (!other || other === e) continue;
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
    const slot = comm.open.get(position);
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
        const slot = comm.open.get(position)!;
        const found = this.inconsistencyAt(comm, position) ?? comm.judged.get(position) ?? this.checkMissing(comm, position);
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
  private inconsistencyAt(comm: CommState, position: number): Finding | null {
    for (const e of comm.open.get(position)!) {
      const f = e && this.checkConsistency(comm, position, e);
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
      const slot = this.comms.get(e.communicator)!.open.get(e.position);
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

export function describe(e: Pick<LedgerEntry, 'op' | 'layer' | 'microBatch' | 'unit'>): string {
  return `${e.op}${e.unit ? ` (${e.unit} unit)` : ''} of layer ${e.layer}${e.microBatch ? `, micro-batch ${e.microBatch}` : ''}`;
}
