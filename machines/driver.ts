// The one driver of a rank machine. Every engine (the discrete-event engine, worker-thread
// ranks, launched processes) asks it what a rank does next, which facts a completed
// exchange reveals, which event ends a compute (with the completion order the scenario
// fixes) and whether a call of the real EP layer is issued, skipped or a violation. The
// engines differ only in how bytes move and how time passes.
import type { CollectiveOp, CollectiveTag } from '../src/ep/types.js';
import { STATE_TAGS, type CollectiveMeta, type Decision, type RankEvent } from './rankMachine.js';
import { issuedCollective, statePath, type IssuedCollective, type RankSnapshot } from './snapshot.js';

export type FinalState = 'done' | 'exited' | 'aborted' | 'failed';

/** What a rank does next, read from its machine's snapshot. */
export type RankAction =
  | { readonly kind: 'route'; readonly layer: number; readonly microBatch: number }
  | { readonly kind: 'compute'; readonly phase: 'forward' | 'backward'; readonly layer: number; readonly microBatch: number }
  /** A compute that never returns (variant kernel-hang): the engine waits on it forever; the decision says why. */
  | { readonly kind: 'stall'; readonly phase: 'forward' | 'backward'; readonly layer: number; readonly microBatch: number; readonly decision: Decision; readonly rule: string }
  | { readonly kind: 'collective'; readonly collective: IssuedCollective; readonly issuer: CollectiveMeta['issuer'] }
  | { readonly kind: 'final'; readonly how: FinalState };

export function nextAction(snap: RankSnapshot): RankAction {
  const { layer, microBatch } = snap.context;
  if (snap.status === 'done') return { kind: 'final', how: statePath(snap) as FinalState };
  if (snap.hasTag(STATE_TAGS.routing)) return { kind: 'route', layer, microBatch };
  if (snap.hasTag(STATE_TAGS.stalled)) {
    const decision = snap.context.trail.at(-1);
    if (!decision) throw new Error(`rank ${snap.context.cfg.rank}: stalled in ${statePath(snap)} with no decision that put it there`);
    return { kind: 'stall', phase: 'backward', layer, microBatch, decision, rule: snap.context.cfg.variant.rule };
  }
  if (snap.hasTag(STATE_TAGS.computing)) return { kind: 'compute', phase: snap.matches('backward') ? 'backward' : 'forward', layer, microBatch };
  const c = issuedCollective(snap);
  if (!c) throw new Error(`rank ${snap.context.cfg.rank}: state ${statePath(snap)} is neither routing, compute, a collective nor final`);
  return { kind: 'collective', collective: c, issuer: c.issuer };
}

/** What a rank is doing, in words, for a stall or a timeout. */
export function describeAction(a: RankAction): string {
  switch (a.kind) {
    case 'route':
      return `routing layer ${a.layer}${a.microBatch ? ` (micro-batch ${a.microBatch})` : ''}`;
    case 'compute':
      return `the expert ${a.phase} of layer ${a.layer}${a.microBatch ? ` (micro-batch ${a.microBatch})` : ''}`;
    case 'stall':
      return `the expert ${a.phase} of layer ${a.layer}${a.microBatch ? ` (micro-batch ${a.microBatch})` : ''}, which never returns: ${a.decision.fact} (guard ${a.decision.guard}; ${a.rule})`;
    case 'collective':
      return `its work before ${a.collective.op} of layer ${a.collective.layer}`;
    case 'final':
      return a.how;
  }
}

/** The facts a finished exchange can tell a rank; an engine answers only what is asked. */
export interface ExchangeOutcome {
  /** Rows each EP peer sends here (the fwd.counts result). */
  recvCounts(): readonly number[];
  /** Rows received per local expert (known from the fwd.expert_ids result). */
  rowsPerExpert(): readonly number[];
}

/** The event that completes `op` on a rank: fwd.counts reveals the received counts, fwd.expert_ids the rows per local expert. */
export function completedEvent(op: CollectiveOp, outcome: ExchangeOutcome): RankEvent {
  if (op === 'fwd.counts') return { type: 'collective.done', op, recvCounts: outcome.recvCounts() };
  if (op === 'fwd.expert_ids') return { type: 'collective.done', op, rowsPerExpert: outcome.rowsPerExpert() };
  return { type: 'collective.done', op };
}

export function routedEvent(tokens: number, sendCounts: readonly number[]): RankEvent {
  return { type: 'layer.routed', tokens, sendCounts };
}

/**
 * Which of two collectives made ready by one compute a rank issues first, per global rank,
 * layer, micro-batch and phase: after the expert backward, bwd.dispatch or the experts
 * reduce-scatter (completion-order); after the expert forward, fwd.combine or the shared
 * expert's all-gather (second-stream). A scenario fixes it (or draws it from its seed); the
 * explorer enumerates the backward one.
 */
export type FirstReady = (rank: number, layer: number, microBatch: number, phase: 'forward' | 'backward') => CollectiveOp;

/** The event that ends the compute a rank is in, carrying the completion order of what it made ready. */
export function computedEvent(snap: RankSnapshot, firstReady: FirstReady): RankEvent {
  const { cfg, layer, microBatch } = snap.context;
  if (snap.matches('backward')) return { type: 'compute.done', firstReady: firstReady(cfg.rank, layer, microBatch, 'backward') };
  // Only a second stream makes two collectives ready after the forward compute.
  return cfg.variant.secondStream ? { type: 'compute.done', firstReady: firstReady(cfg.rank, layer, microBatch, 'forward') } : { type: 'compute.done' };
}

/** The layer's call of a collective: issued now, skipped because a guard removed it from this layer call, or not allowed. */
export type Admission =
  | { readonly kind: 'issue'; readonly collective: IssuedCollective }
  | { readonly kind: 'skip'; readonly decision: Decision }
  | { readonly kind: 'violation'; readonly message: string };

/**
 * Judge the EP layer's call of `tag` against the machine, after the driver has issued the
 * collectives it issues itself. A skip is found among every skip decision of the same layer
 * call, not only the latest: the driver's own collectives may have run since the guard chose.
 */
export function admission(snap: RankSnapshot, tag: CollectiveTag): Admission {
  const c = issuedCollective(snap);
  if (c && c.issuer === 'layer' && c.op === tag.op && c.layer === tag.layer && c.microBatch === tag.microBatch) return { kind: 'issue', collective: c };
  const { skips, cfg } = snap.context;
  const skip = skips.find((d) => d.skipped.includes(tag.op) && d.layer === tag.layer && d.microBatch === tag.microBatch);
  if (skip) return { kind: 'skip', decision: skip };
  const expected = c ? `${c.op} (layer ${c.layer}, micro-batch ${c.microBatch})` : `no collective (state ${statePath(snap)})`;
  return { kind: 'violation', message: `rank ${cfg.rank} called ${tag.op} (layer ${tag.layer}, micro-batch ${tag.microBatch}) but the protocol expects ${expected}` };
}
