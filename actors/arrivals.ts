// Which ranks wait for the bytes of a collective the ledger already proved complete (every
// member issued it), and since when: the supervisor's collective limit reads this.
//
// Two sources say a rank's collective completed and they race: the ledger (when the last
// member's issue reaches the supervisor) and the rank's own report (when its data arrived).
// They come from different workers, so a rank's report can come first; counting both per
// rank, in order (a rank is in one collective at a time), keeps a rank that already
// reported from being taken for one whose data never came.

export class PendingArrivals {
  /** Per rank: collectives the ledger proved complete. */
  private readonly proved: number[];
  /** Per rank: collectives the rank reported complete. */
  private readonly reported: number[];
  /** Per rank: since when its oldest proved, unreported collective has waited (null: none). */
  private readonly since: (number | null)[];

  constructor(ranks: number) {
    this.proved = new Array<number>(ranks).fill(0);
    this.reported = new Array<number>(ranks).fill(0);
    this.since = new Array<number | null>(ranks).fill(null);
  }

  /** The ledger proved one more collective of `rank` complete at `at`. */
  proven(rank: number, at: number): void {
    this.proved[rank]!++;
    if (this.proved[rank]! > this.reported[rank]! && this.since[rank] === null) this.since[rank] = at;
  }

  /** `rank` reported one more collective complete at `at`. */
  arrived(rank: number, at: number): void {
    this.reported[rank]!++;
    // Still behind: its next proved collective has waited since this report at most.
    this.since[rank] = this.proved[rank]! > this.reported[rank]! ? at : null;
  }

  /** Whether no rank waits for bytes of a proved collective. */
  none(): boolean {
    return this.since.every((s) => s === null);
  }

  /** Ranks whose proved collective's data has not arrived for more than `limitMs` at `t`. */
  lateAt(t: number, limitMs: number): number[] {
    return this.since.flatMap((s, r) => (s !== null && t - s > limitMs ? [r] : []));
  }
}
