// The one way the collective tracker is fed, whatever the engine: each rank's own reports
// (it issued a collective, it finished its step), in that rank's order. Reports of
// different ranks may arrive in any order (worker threads post over separate queues; rank
// records are read whole), so a rank's next report waits while the tracker still has it
// blocked in a collective whose completion it has not seen yet. Whatever the arrival
// order, the tracker ends in the same state, and at quiescence (every rank blocked or
// finished, nothing waiting) its list of hangs is the verdict.
import { CollectiveTracker, type LedgerEntry } from './ledger.js';
import type { Mesh } from './mesh.js';
import type { IssuedCollective } from './snapshot.js';

export type RankReport =
  | { readonly kind: 'issue'; readonly rank: number; readonly collective: IssuedCollective; readonly dtype: string; readonly at: number }
  | { readonly kind: 'finish'; readonly rank: number; readonly at: number };

export interface FeedListener {
  /** A rank's issue reached the tracker (the timeline opens its span here). */
  issued?(entry: LedgerEntry, at: number): void;
  /** Every member issued the position: the collective completes. */
  completed?(entries: readonly LedgerEntry[]): void;
}

export class LedgerFeed {
  readonly tracker: CollectiveTracker;
  /** Reports that wait for their rank's collective to complete, per rank, in order. */
  private readonly waiting = new Map<number, RankReport[]>();
  /** When the evidence of the first finding existed (the report's own time). */
  evidenceAt: number | null = null;
  /** The latest report time applied: when a cycle closes, its evidence is the last block. */
  lastAt = -Infinity;

  constructor(
    mesh: Mesh,
    private readonly listener: FeedListener = {},
    retain = true,
  ) {
    this.tracker = new CollectiveTracker(mesh, retain);
  }

  push(report: RankReport): void {
    const queue = this.waiting.get(report.rank);
    if (queue || this.tracker.blockedOn(report.rank)) {
      if (queue) queue.push(report);
      else this.waiting.set(report.rank, [report]);
      return;
    }
    this.apply(report);
  }

  /** Reports still waiting for a completion the tracker has not seen. */
  get pending(): boolean {
    return this.waiting.size > 0;
  }


  /**
   * Every rank blocked in a collective or finished (`gone`: ranks that will report nothing
   * more), and no report waiting. With `heldByFinding`, a rank whose reports wait behind a
   * collective the tracker proved inconsistent counts as held there, as NCCL would hold it.
   */
  quiescent(ranks: number, gone: ReadonlySet<number> = new Set(), heldByFinding = false): boolean {
    if (this.pending && !heldByFinding) return false;
    for (let r = 0; r < ranks; r++) {
      if (!this.tracker.isFinished(r) && !this.tracker.blockedOn(r) && !gone.has(r) && !(heldByFinding && this.waiting.has(r))) return false;
    }
    return true;
  }

  /**
   * Nothing can move any more: quiescent, or, once a finding exists and no rank is on its own
   * work (`idle`), quiescent with the ranks whose transport let them past the collective the
   * tracker proved inconsistent counted as held there (their reports wait behind it forever).
   */
  settled(ranks: number, gone: ReadonlySet<number>, idle: () => boolean): boolean {
    return this.quiescent(ranks, gone) || (this.evidenceAt !== null && idle() && this.quiescent(ranks, gone, true));
  }

  private apply(report: RankReport): void {
    this.lastAt = Math.max(this.lastAt, report.at);
    if (report.kind === 'finish') {
      if (this.tracker.finish(report.rank)) this.evidenceAt ??= report.at;
      return;
    }
    const issued = this.tracker.issue(report.rank, report.collective, report.dtype);
    this.listener.issued?.(issued.entry, report.at);
    if (issued.finding) this.evidenceAt ??= report.at;
    if (issued.completed) {
      this.listener.completed?.(issued.completed);
      for (const e of issued.completed) this.release(e.rank);
    }
  }

  private release(rank: number): void {
    const queue = this.waiting.get(rank);
    if (!queue) return;
    this.waiting.delete(rank);
    while (queue.length > 0 && !this.tracker.blockedOn(rank)) this.apply(queue.shift()!);
    if (queue.length > 0) {
      // Blocked again: whatever is left waits for that collective.
      const later = this.waiting.get(rank);
      this.waiting.set(rank, later ? [...queue, ...later] : queue);
    }
  }
}
