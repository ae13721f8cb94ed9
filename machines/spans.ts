// A run's timeline: one span per collective per rank, from its issue to its completion on
// that rank (or to the run's end when it never completed). Every engine builds its lanes
// here: the discrete-event engine in simulated time, worker ranks and rank records in wall
// time.
import type { LedgerEntry } from './ledger.js';

/** One collective on one rank: a Chrome 'X' (complete) event, times in µs. */
export interface TraceEvent {
  readonly name: string;
  readonly ph: 'X';
  readonly ts: number;
  readonly dur: number;
  readonly pid: 0;
  /** The global rank: one lane per rank. */
  readonly tid: number;
  readonly args: { readonly communicator: string; readonly position: number; readonly layer: number; readonly microBatch: number; readonly completed?: false };
}

export class CollectiveSpans {
  private readonly spans: TraceEvent[] = [];
  private readonly open = new Map<number, { entry: Pick<LedgerEntry, 'op' | 'communicator' | 'position' | 'layer' | 'microBatch'>; at: number }>();

  /** t0: the run's start, in the clock's unit (ms); spans are in µs from it. */
  constructor(private readonly t0 = 0) {}

  issue(entry: Pick<LedgerEntry, 'rank' | 'op' | 'communicator' | 'position' | 'layer' | 'microBatch'>, at: number): void {
    this.complete(entry.rank, at);
    this.open.set(entry.rank, { entry, at });
  }

  complete(rank: number, at: number, completed = true): void {
    const o = this.open.get(rank);
    if (!o) return;
    this.open.delete(rank);
    const { op, communicator, position, layer, microBatch } = o.entry;
    const ts = Math.round((o.at - this.t0) * 1000);
    this.spans.push({ name: op, ph: 'X', ts, dur: Math.max(0, Math.round((at - this.t0) * 1000) - ts), pid: 0, tid: rank, args: { communicator, position, layer, microBatch, ...(completed ? {} : { completed: false as const }) } });
  }

  /** The timeline at the run's end: collectives still open last until `end`. */
  close(end: number): TraceEvent[] {
    for (const rank of [...this.open.keys()]) this.complete(rank, end, false);
    return this.spans;
  }
}
