// The discrete-event engine: every rank's machine stepped with xstate's pure transition()
// in one thread, no workers and no tensors, only the facts the guards need (routing counts,
// rows received per expert). Collective matching and verdicts come from machines/ledger.ts,
// as in the actor runtime, so both produce the same ledger for the same scenario.
//
// Simulated time: each rank keeps its own clock. Routing and expert compute advance it by
// the cost model's FLOPs / rate; a collective completes when its last member issues it,
// plus its latency + bytes / bandwidth, and sets every member's clock to that moment.
// Ranks are sequential programs that only meet in collectives, so running each rank until
// it blocks gives the same times as a global event queue, without one.
import { epRankOf, worldSize } from '../machines/mesh.js';
import type { LedgerEntry } from '../machines/ledger.js';
import { LedgerFeed } from '../machines/feed.js';
import { CollectiveSpans, type TraceEvent as CollectiveSpan } from '../machines/spans.js';
import { diagnoseHangs, okDiagnosis, stallDiagnosis, type Diagnosis } from '../machines/diagnosis.js';
import { collectiveDtype, startRank, stepRank, type RankSnapshot } from '../machines/snapshot.js';
import { completedEvent, computedEvent, describeAction, nextAction, routedEvent, type FirstReady } from '../machines/driver.js';
import type { RankEvent } from '../machines/rankMachine.js';
import { collectiveMs, computeMs, DEFAULT_COST, expertFlops, routerFlops, type CostModel } from './cost.js';
import { firstReadyOf, rankConfig, type Scenario } from '../machines/scenario.js';
import { routeTokens } from '../machines/routing.js';

/** Chrome Trace Event (https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU): ts, dur in µs. */
export interface TraceEvent {
  readonly name: string;
  readonly cat: string;
  readonly ph: 'X' | 'M';
  readonly ts: number;
  readonly dur?: number;
  readonly pid: number;
  readonly tid: number;
  readonly args: Record<string, unknown>;
}

/**
 * Memo of transitions for callers that run many routings of one layout (the explorer):
 * transition() is pure, so a snapshot and an event always give the same next snapshot,
 * and identical prefixes across routing classes cost one xstate step instead of many.
 */
export class TransitionMemo {
  private readonly next = new WeakMap<RankSnapshot, Map<string, RankSnapshot>>();

  step(snapshot: RankSnapshot, event: RankEvent): RankSnapshot {
    let byEvent = this.next.get(snapshot);
    if (!byEvent) this.next.set(snapshot, (byEvent = new Map()));
    const key = JSON.stringify(event);
    let after = byEvent.get(key);
    if (!after) byEvent.set(key, (after = stepRank(snapshot, event)));
    return after;
  }
}

export interface DesOptions {
  /** Called after every machine step (reports use it to record each rank's path). */
  readonly onStep?: (rank: number, before: RankSnapshot, event: RankEvent, after: RankSnapshot) => void;
  readonly trace?: boolean;
  readonly cost?: CostModel;
  /** Completion orders to follow instead of the scenario's (the explorer enumerates them). */
  readonly firstReady?: FirstReady;
  /** Every rank's initial snapshot, when the caller runs many routings of one layout. */
  readonly initial?: readonly RankSnapshot[];
  readonly memo?: TransitionMemo;
}

export interface DesResult {
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  readonly snapshots: readonly RankSnapshot[];
  /** With `trace`: compute spans and lane names (Chrome trace events), in simulated time. */
  readonly trace?: TraceEvent[];
  /** With `trace`: each rank's collectives as report lanes, in simulated time. */
  readonly spans?: CollectiveSpan[];
  /** Simulated step time: the latest rank clock, ms. */
  readonly simulatedMs: number;
}

/**
 * One EP group's routing for one (micro-batch, layer), built once for all its members:
 * send counts as an ep × ep matrix (row = source) and rows per global expert. Received
 * counts and rows per local expert are slices of these, so a layer costs O(ep² + ep·T·K)
 * rather than every rank rescanning every peer's routing.
 */
interface GroupRouting {
  readonly tokens: Int32Array;
  readonly sendCounts: Int32Array;
  readonly rowsPerExpert: Int32Array;
}

class RoutingCache {
  private readonly groups = new Map<string, GroupRouting>();
  constructor(private readonly s: Scenario) {}

  group(rank: number, microBatch: number, layer: number): GroupRouting {
    const { ep, experts, topK } = this.s;
    const base = rank - epRankOf(this.s, rank);
    const key = `${base}/${microBatch}/${layer}`;
    let g = this.groups.get(key);
    if (g) return g;
    const nLocal = experts / ep;
    g = { tokens: new Int32Array(ep), sendCounts: new Int32Array(ep * ep), rowsPerExpert: new Int32Array(experts) };
    for (let src = 0; src < ep; src++) {
      const idx = routeTokens(this.s, base + src, microBatch, layer);
      g.tokens[src] = idx.length / topK;
      for (const e of idx) {
        g.sendCounts[src * ep + Math.floor(e / nLocal)]!++;
        g.rowsPerExpert[e]!++;
      }
    }
    this.groups.set(key, g);
    return g;
  }
}

/** A completed exchange's facts, read off the group's routing (the engine moves no tensors). */
function outcomeOf(s: Scenario, g: GroupRouting, rank: number) {
  const epRank = epRankOf(s, rank);
  const nLocal = s.experts / s.ep;
  return {
    // recv_counts[j] = what EP peer j routes to this rank: column epRank of the matrix.
    recvCounts: () => {
      const column = new Array<number>(s.ep);
      for (let j = 0; j < s.ep; j++) column[j] = g.sendCounts[j * s.ep + epRank]!;
      return column;
    },
    rowsPerExpert: () => Array.from(g.rowsPerExpert.subarray(epRank * nLocal, (epRank + 1) * nLocal)),
  };
}

/** Run one training step of `s` in simulated time; with `trace`, a Chrome trace of it. */
export function simulateDes(s: Scenario, opts: DesOptions = {}): DesResult {
  const cost = opts.cost ?? DEFAULT_COST;
  const firstReady = opts.firstReady ?? firstReadyOf(s);
  const n = worldSize(s);
  const collectiveSpans = opts.trace ? new CollectiveSpans() : null;
  const feed = new LedgerFeed(s, { issued: (e) => collectiveSpans?.issue(e, clock[e.rank]!), completed: (entries) => complete(entries) });
  const tracker = feed.tracker;
  const routing = new RoutingCache(s);
  const snaps: RankSnapshot[] = opts.initial ? [...opts.initial] : Array.from({ length: n }, (_, r) => startRank(rankConfig(s, r)));
  const clock = new Float64Array(n);
  const finished = new Uint8Array(n);
  /** Ranks in a compute that never returns (variant kernel-hang), with what they compute. */
  const stalled = new Map<number, string>();
  const step = (r: number, event: RankEvent) => {
    const before = snaps[r]!;
    snaps[r] = opts.memo ? opts.memo.step(before, event) : stepRank(before, event);
    opts.onStep?.(r, before, event, snaps[r]!);
  };
  let finishedCount = 0;
  const trace: TraceEvent[] | undefined = opts.trace ? [] : undefined;
  const span = (rank: number, name: string, cat: string, startMs: number, endMs: number, args: Record<string, unknown>) =>
    trace?.push({ name, cat, ph: 'X', ts: startMs * 1e3, dur: (endMs - startMs) * 1e3, pid: 0, tid: rank, args });

  const result = (): DesResult => {
    const hangs = stalled.size > 0 ? [] : tracker.hangs();
    if (stalled.size === 0 && hangs.length === 0 && finishedCount < n) throw new Error('engine stalled: ranks are blocked with no hang the tracker can name (a bug in the tracker)');
    for (let r = 0; r < n && trace; r++) trace.push({ name: 'thread_name', cat: '__metadata', ph: 'M', ts: 0, pid: 0, tid: r, args: { name: `rank ${r}` } });
    // A compute that never returns is the finding, whatever waits on it (as a wall clock's compute limit finds it).
    const diagnosis = stalled.size > 0
      ? stallDiagnosis([...stalled].sort(([a], [b]) => a - b).map(([rank, what]) => ({ rank, what })), snaps, tracker)
      : hangs.length > 0 ? diagnoseHangs(hangs, snaps, tracker) : okDiagnosis(snaps, tracker);
    return {
      diagnosis,
      ledger: tracker.entries,
      snapshots: snaps,
      trace,
      // Collectives that never completed last until the end of simulated time.
      spans: collectiveSpans?.close(Math.max(0, ...clock)),
      simulatedMs: Math.max(0, ...clock),
    };
  };

  /** Every member issued: the collective ends for all of them at the last issue plus its cost. */
  function complete(entries: readonly LedgerEntry[]) {
    let start = 0;
    for (const e of entries) start = Math.max(start, clock[e.rank]!);
    const end = start + collectiveMs(cost, s, entries);
    for (const e of entries) {
      const ctx = snaps[e.rank]!.context;
      step(e.rank, completedEvent(e.op, outcomeOf(s, routing.group(e.rank, ctx.microBatch, ctx.layer), e.rank)));
      collectiveSpans?.complete(e.rank, end);
      clock[e.rank] = end;
    }
  }

  /** Advance rank r through routing or compute (no collective involved). */
  const computeStep = (r: number, snap: RankSnapshot, what: 'route' | 'compute') => {
    const ctx = snap.context;
    const t0 = clock[r]!;
    if (what === 'route') {
      const g = routing.group(r, ctx.microBatch, ctx.layer);
      const epRank = epRankOf(s, r);
      clock[r] = t0 + computeMs(cost, routerFlops(s, g.tokens[epRank]!));
      span(r, 'route', 'compute', t0, clock[r]!, { layer: ctx.layer, microBatch: ctx.microBatch });
      step(r, routedEvent(g.tokens[epRank]!, Array.from(g.sendCounts.subarray(epRank * s.ep, (epRank + 1) * s.ep))));
      return;
    }
    const backward = snap.matches('backward');
    const rows = (ctx.facts[ctx.layer]?.recvCounts ?? []).reduce((a, b) => a + b, 0);
    // Backward computes the input gradient and the weight gradients: twice the forward FLOPs.
    clock[r] = t0 + computeMs(cost, expertFlops(s, rows) * (backward ? 2 : 1));
    span(r, backward ? 'expert backward' : 'expert forward', 'compute', t0, clock[r]!, { layer: ctx.layer, microBatch: ctx.microBatch, rows });
    step(r, computedEvent(snap, firstReady));
  };

  // Every rank runs until it blocks, stalls or finishes; at quiescence a stall is the finding,
  // else the tracker lists every hung communicator, in the order every engine gives.
  for (;;) {
    let progressed = false;
    for (let r = 0; r < n; r++) {
      if (finished[r] || stalled.has(r) || tracker.blockedOn(r)) continue;
      // Run rank r until it blocks in a collective or finishes.
      for (;;) {
        const snap = snaps[r]!;
        const action = nextAction(snap);
        progressed = true;
        if (action.kind === 'route' || action.kind === 'compute') {
          computeStep(r, snap, action.kind);
        } else if (action.kind === 'stall') {
          stalled.set(r, describeAction(action));
          break;
        } else if (action.kind === 'collective') {
          feed.push({ kind: 'issue', rank: r, collective: action.collective, dtype: collectiveDtype(action.collective.op), at: clock[r]! });
          if (tracker.blockedOn(r)) break;
        } else {
          finished[r] = 1;
          finishedCount++;
          feed.push({ kind: 'finish', rank: r, at: clock[r]! });
          break;
        }
      }
    }
    if (finishedCount === n || !progressed) return result();
  }
}
