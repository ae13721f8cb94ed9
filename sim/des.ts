// The single-thread engine: every rank's machine stepped with xstate's pure transition(),
// no workers and no tensors, only the facts the guards need (routing counts, rows received
// per expert). Collective matching and verdicts come from machines/ledger.ts, as in the
// actor runtime, so both produce the same ledger for the same scenario.
import { CollectiveTracker, type Finding, type LedgerEntry } from '../machines/ledger.js';
import { diagnose, okDiagnosis, type Diagnosis } from '../machines/diagnosis.js';
import { activity, issuedCollective, startRank, stepRank, type RankSnapshot } from '../machines/protocol.js';
import type { RankEvent } from '../machines/rankMachine.js';
import { rankConfig, worldSize, type Scenario } from './scenario.js';
import { routeTokens, sendCountsOf } from './routing.js';

export interface EngineResult {
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  readonly snapshots: readonly RankSnapshot[];
}

/** Routing of every rank for the (micro-batch, layer) being run, computed once per pair. */
class RoutingCache {
  private readonly cache = new Map<string, Int32Array>();
  constructor(private readonly s: Scenario) {}
  indices(rank: number, microBatch: number, layer: number): Int32Array {
    const key = `${rank}/${microBatch}/${layer}`;
    let v = this.cache.get(key);
    if (!v) this.cache.set(key, (v = routeTokens(this.s, rank, microBatch, layer)));
    return v;
  }
}

/** Rows that EP peers route to each local expert of `rank` (what fwd.expert_ids delivers). */
function rowsPerLocalExpert(s: Scenario, routing: RoutingCache, rank: number, microBatch: number, layer: number): number[] {
  const nLocal = s.experts / s.ep;
  const epRank = rank % s.ep;
  const groupBase = rank - epRank;
  const rows = new Array<number>(nLocal).fill(0);
  for (let peer = 0; peer < s.ep; peer++) {
    for (const e of routing.indices(groupBase + peer, microBatch, layer)) {
      if (Math.floor(e / nLocal) === epRank) rows[e - epRank * nLocal]!++;
    }
  }
  return rows;
}

export interface DesOptions {
  /** Called after every machine step (reports use it to record each rank's path). */
  onStep?: (rank: number, before: RankSnapshot, event: RankEvent, after: RankSnapshot) => void;
}

export function runDes(s: Scenario, opts: DesOptions = {}): EngineResult {
  const n = worldSize(s);
  const tracker = new CollectiveTracker({ ep: s.ep, dp: s.dp });
  const routing = new RoutingCache(s);
  const snaps: RankSnapshot[] = Array.from({ length: n }, (_, r) => startRank(rankConfig(s, r)));
  const finished = new Set<number>();
  const step = (r: number, event: RankEvent) => {
    const before = snaps[r]!;
    snaps[r] = stepRank(before, event);
    opts.onStep?.(r, before, event, snaps[r]!);
  };
  const result = (finding: Finding | null): EngineResult => ({
    diagnosis: finding ? diagnose(finding, snaps, tracker) : okDiagnosis(snaps, tracker),
    ledger: tracker.entries,
    snapshots: snaps,
  });

  const complete = (entries: readonly LedgerEntry[]) => {
    for (const e of entries) {
      const ctx = snaps[e.rank]!.context;
      let extra = {};
      if (e.op === 'fwd.counts') {
        // recv_counts[j] = what EP peer j routes to this rank (peer j's send_counts[me]).
        const base = e.rank - (e.rank % s.ep);
        extra = { recvCounts: Array.from({ length: s.ep }, (_, j) => sendCountsOf(routing.indices(base + j, ctx.microBatch, ctx.layer), s.experts, s.ep)[e.rank % s.ep]!) };
      } else if (e.op === 'fwd.expert_ids') {
        extra = { rowsPerExpert: rowsPerLocalExpert(s, routing, e.rank, ctx.microBatch, ctx.layer) };
      }
      step(e.rank, { type: 'collective.done', op: e.op, ...extra });
    }
  };

  // The first finding is the verdict, but every other rank still runs until it blocks, so
  // the diagnosis shows where each one ends up (e.g. all peers waiting in bwd.dispatch).
  let first: Finding | null = null;
  const note = (f: Finding | null) => {
    first ??= f;
  };
  for (;;) {
    let progressed = false;
    for (let r = 0; r < n; r++) {
      if (finished.has(r) || tracker.blockedOn(r)) continue;
      // Run rank r until it blocks in a collective or finishes.
      for (;;) {
        const snap = snaps[r]!;
        const what = activity(snap);
        if (what === 'routing') {
          const idx = routing.indices(r, snap.context.microBatch, snap.context.layer);
          step(r, { type: 'layer.routed', tokens: idx.length / s.topK, sendCounts: sendCountsOf(idx, s.experts, s.ep) });
        } else if (what === 'compute') {
          step(r, { type: 'compute.done' });
        } else if (what === 'collective') {
          const issued = tracker.issue(r, issuedCollective(snap)!, 'f32');
          note(issued.finding);
          if (issued.completed) complete(issued.completed);
          progressed = true;
          if (tracker.blockedOn(r)) break;
          continue;
        } else {
          finished.add(r);
          note(tracker.finish(r));
          break;
        }
        progressed = true;
      }
    }
    if (finished.size === n) return result(first);
    if (!progressed) {
      if (first) return result(first);
      const cycle = tracker.findCycle();
      if (cycle) return result(cycle);
      throw new Error('engine stalled: ranks are blocked with no cycle and no missing member (a bug in the tracker)');
    }
  }
}
