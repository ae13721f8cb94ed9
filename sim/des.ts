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
import { CollectiveTracker, type Finding, type LedgerEntry } from '../machines/ledger.js';
import { diagnose, okDiagnosis, type Diagnosis } from '../machines/diagnosis.js';
import { activity, collectiveDtype, issuedCollective, startRank, statePath, stepRank, type RankSnapshot } from '../machines/protocol.js';
import type { RankEvent } from '../machines/rankMachine.js';
import type { CollectiveOp } from '../src/ep/types.js';
import { seededRng } from '../src/moe/random.js';
import { collectiveMs, computeMs, DEFAULT_COST, expertFlops, routerFlops, type CostModel } from './cost.js';
import { rankConfig, worldSize, type Scenario } from './scenario.js';
import { routeTokens } from './routing.js';

export interface EngineResult {
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  readonly snapshots: readonly RankSnapshot[];
}

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
 * Which of two collectives made ready by one compute a rank issues first (variant
 * completion-order); the explorer enumerates these, a plain run draws them from the seed.
 */
export type FirstReady = (rank: number, layer: number, microBatch: number) => CollectiveOp;

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

/** A scenario that fixes every completion order: per global rank, per layer call (micro-batch · layers + layer). */
export interface ScheduledScenario extends Scenario {
  firstReady?: CollectiveOp[][];
}

export interface DesOptions {
  /** Called after every machine step (reports use it to record each rank's path). */
  readonly onStep?: (rank: number, before: RankSnapshot, event: RankEvent, after: RankSnapshot) => void;
  readonly trace?: boolean;
  readonly cost?: CostModel;
  readonly firstReady?: FirstReady;
  /** Every rank's initial snapshot, when the caller runs many routings of one layout. */
  readonly initial?: readonly RankSnapshot[];
  readonly memo?: TransitionMemo;
}

export interface DesResult extends EngineResult {
  readonly trace?: TraceEvent[];
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
    const base = rank - (rank % ep);
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

/** The event that answers a rank waiting for routing, or a completed exchange, with its facts. */
function routedEvent(s: Scenario, g: GroupRouting, epRank: number): RankEvent {
  return { type: 'layer.routed', tokens: g.tokens[epRank]!, sendCounts: Array.from(g.sendCounts.subarray(epRank * s.ep, (epRank + 1) * s.ep)) };
}

function doneEvent(s: Scenario, g: GroupRouting, e: LedgerEntry): RankEvent {
  const epRank = e.rank % s.ep;
  if (e.op === 'fwd.counts') {
    // recv_counts[j] = what EP peer j routes to this rank: column epRank of the matrix.
    return { type: 'collective.done', op: e.op, recvCounts: Array.from({ length: s.ep }, (_, j) => g.sendCounts[j * s.ep + epRank]!) };
  }
  if (e.op === 'fwd.expert_ids') {
    const nLocal = s.experts / s.ep;
    return { type: 'collective.done', op: e.op, rowsPerExpert: Array.from(g.rowsPerExpert.subarray(epRank * nLocal, (epRank + 1) * nLocal)) };
  }
  return { type: 'collective.done', op: e.op };
}

/** The scenario's completion orders, or each drawn from its seed: arbitrary, but the same every run. */
function scenarioFirstReady(s: ScheduledScenario): FirstReady {
  const table = s.firstReady;
  if (table) return (rank, layer, microBatch) => table[rank]?.[microBatch * s.layers + layer] ?? 'fsdp.reduce_scatter';
  return (rank, layer, microBatch) => (seededRng((s.seed * 7919 + rank * 104729 + layer * 31 + microBatch) >>> 0)() < 0.5 ? 'bwd.dispatch' : 'fsdp.reduce_scatter');
}

export function runDes(s: Scenario, opts: DesOptions = {}): EngineResult {
  const { diagnosis, ledger, snapshots } = simulateDes(s, opts);
  return { diagnosis, ledger, snapshots };
}

/** Run one training step of `s` in simulated time; with `trace`, a Chrome trace of it. */
export function simulateDes(s: Scenario, opts: DesOptions = {}): DesResult {
  const cost = opts.cost ?? DEFAULT_COST;
  const firstReady = opts.firstReady ?? scenarioFirstReady(s);
  const n = worldSize(s);
  const tracker = new CollectiveTracker({ ep: s.ep, dp: s.dp });
  const routing = new RoutingCache(s);
  const snaps: RankSnapshot[] = opts.initial ? [...opts.initial] : Array.from({ length: n }, (_, r) => startRank(rankConfig(s, r)));
  const clock = new Float64Array(n);
  const issuedAt = new Float64Array(n);
  const finished = new Uint8Array(n);
  const step = (r: number, event: RankEvent) => {
    const before = snaps[r]!;
    snaps[r] = opts.memo ? opts.memo.step(before, event) : stepRank(before, event);
    opts.onStep?.(r, before, event, snaps[r]!);
  };
  let finishedCount = 0;
  const trace: TraceEvent[] | undefined = opts.trace ? [] : undefined;
  const span = (rank: number, name: string, cat: string, startMs: number, endMs: number, args: Record<string, unknown>) =>
    trace?.push({ name, cat, ph: 'X', ts: startMs * 1e3, dur: (endMs - startMs) * 1e3, pid: 0, tid: rank, args });

  const result = (finding: Finding | null): DesResult => {
    if (trace) {
      // Collectives that never completed: a span from the issue to the end of simulated time.
      const end = Math.max(...clock);
      for (let r = 0; r < n; r++) {
        const b = tracker.blockedOn(r);
        if (b) span(r, b.op, 'collective', issuedAt[r]!, end, { communicator: b.communicator, position: b.position, layer: b.layer, microBatch: b.microBatch, completed: false });
        trace.push({ name: 'thread_name', cat: '__metadata', ph: 'M', ts: 0, pid: 0, tid: r, args: { name: `rank ${r}` } });
      }
    }
    return {
      diagnosis: finding ? diagnose(finding, snaps, tracker) : okDiagnosis(snaps, tracker),
      ledger: tracker.entries,
      snapshots: snaps,
      trace,
      simulatedMs: Math.max(0, ...clock),
    };
  };

  const complete = (entries: readonly LedgerEntry[]) => {
    let start = 0;
    for (const e of entries) start = Math.max(start, issuedAt[e.rank]!);
    const end = start + collectiveMs(cost, s, entries);
    for (const e of entries) {
      const ctx = snaps[e.rank]!.context;
      step(e.rank, doneEvent(s, routing.group(e.rank, ctx.microBatch, ctx.layer), e));
      span(e.rank, e.op, 'collective', issuedAt[e.rank]!, end, { communicator: e.communicator, position: e.position, layer: e.layer, microBatch: e.microBatch });
      clock[e.rank] = end;
    }
  };

  /** Advance rank r through routing or compute (no collective involved). */
  const computeStep = (r: number, snap: RankSnapshot, what: 'routing' | 'compute') => {
    const ctx = snap.context;
    const t0 = clock[r]!;
    if (what === 'routing') {
      const g = routing.group(r, ctx.microBatch, ctx.layer);
      clock[r] = t0 + computeMs(cost, routerFlops(s, g.tokens[r % s.ep]!));
      span(r, 'route', 'compute', t0, clock[r]!, { layer: ctx.layer, microBatch: ctx.microBatch });
      step(r, routedEvent(s, g, r % s.ep));
      return;
    }
    const backward = statePath(snap).startsWith('backward');
    const rows = (ctx.facts[ctx.layer]?.recvCounts ?? []).reduce((a, b) => a + b, 0);
    // Backward computes the input gradient and the weight gradients: twice the forward FLOPs.
    clock[r] = t0 + computeMs(cost, expertFlops(s, rows) * (backward ? 2 : 1));
    span(r, backward ? 'expert backward' : 'expert forward', 'compute', t0, clock[r]!, { layer: ctx.layer, microBatch: ctx.microBatch, rows });
    step(r, backward ? { type: 'compute.done', firstReady: firstReady(r, ctx.layer, ctx.microBatch) } : { type: 'compute.done' });
  };

  // The first finding is the verdict, but every other rank still runs until it blocks, so
  // the diagnosis shows where each one ends up (e.g. all peers waiting in bwd.dispatch).
  let first: Finding | null = null;
  for (;;) {
    let progressed = false;
    for (let r = 0; r < n; r++) {
      if (finished[r] || tracker.blockedOn(r)) continue;
      // Run rank r until it blocks in a collective or finishes.
      for (;;) {
        const snap = snaps[r]!;
        const what = activity(snap);
        progressed = true;
        if (what === 'routing' || what === 'compute') {
          computeStep(r, snap, what);
        } else if (what === 'collective') {
          issuedAt[r] = clock[r]!;
          const c = issuedCollective(snap)!;
          const issued = tracker.issue(r, c, collectiveDtype(c.op));
          first ??= issued.finding;
          if (issued.completed) complete(issued.completed);
          if (tracker.blockedOn(r)) break;
        } else {
          finished[r] = 1;
          finishedCount++;
          first ??= tracker.finish(r);
          break;
        }
      }
    }
    if (finishedCount === n) return result(first);
    if (!progressed) {
      if (first) return result(first);
      // Only when nothing can move: a wait-for cycle is then the one explanation left.
      const cycle = tracker.findCycle();
      if (cycle) return result(cycle);
      throw new Error('engine stalled: ranks are blocked with no cycle and no missing member (a bug in the tracker)');
    }
  }
}
