// Reading a rank machine's snapshot: what the rank is doing now and, when it sits in a
// collective state, the exact collective it issues (op, communicator, splits, and the
// decisions that led there). Both engines turn snapshots into ledger entries here.
import { createActor, initialTransition, type ActorScope, type SnapshotFrom } from 'xstate';
import type { CollectiveOp } from '../src/ep/types.js';
import type { CommKind } from './mesh.js';
import { dataSplits, expertsWithGrads, metricSize, rankMachine, stageMetricSize, type CollectiveMeta, type Decision, type RankConfig, type RankContext, type RankEvent } from './rankMachine.js';

export type RankSnapshot = SnapshotFrom<typeof rankMachine>;

export interface IssuedCollective {
  readonly comm: CommKind;
  readonly op: CollectiveOp;
  /** Who issues it in a real run: the EP layer, or the driver on its behalf (FSDP, metric). */
  readonly issuer: CollectiveMeta['issuer'];
  readonly unit: string | null;
  readonly phase: 'forward' | 'backward';
  readonly layer: number;
  readonly microBatch: number;
  /** All-to-alls: rows to and from each peer. Other collectives: element count in `size`. */
  readonly sendSplits: readonly number[] | null;
  readonly recvSplits: readonly number[] | null;
  readonly size: number | null;
  readonly statePath: string;
  readonly why: readonly Decision[];
}

/** The element type an op moves: counts and expert ids are int64, activations and parameters f32. */
export function collectiveDtype(op: CollectiveOp): 'i64' | 'f32' {
  return op === 'fwd.counts' || op === 'fwd.expert_ids' ? 'i64' : 'f32';
}

export function startRank(cfg: RankConfig): RankSnapshot {
  return initialTransition(rankMachine, cfg)[0];
}

/**
 * xstate's transition() builds a throwaway actor, and with it a whole initial state (whose
 * guards throw without input), on every call: most of a step's cost. The rank machine's
 * actions are all assigns, resolved inside the transition, so one inert scope that runs
 * nothing serves every step with the same result.
 */
let inertScope: ActorScope<RankSnapshot, RankEvent> | undefined;

export function stepRank(snapshot: RankSnapshot, event: RankEvent): RankSnapshot {
  return rankMachine.transition(snapshot, event, scope());
}

/** The snapshots a step passes through, eventless choice states included (xstate's getMicrosteps, with the one inert scope). */
export function rankMicrosteps(snapshot: RankSnapshot, event: RankEvent): RankSnapshot[] {
  return rankMachine.microstep(snapshot, event, scope());
}

const scope = () => (inertScope ??= inert(createActor(rankMachine, { input: undefined as unknown as RankConfig })));

function inert(self: ActorScope<RankSnapshot, RankEvent>['self']): ActorScope<RankSnapshot, RankEvent> {
  const nothing = () => {};
  return { self, system: self.system, id: '', sessionId: '', logger: nothing, defer: nothing, stopChild: nothing, emit: nothing, actionExecutor: nothing };
}

export function statePath(snapshot: RankSnapshot): string {
  const parts: string[] = [];
  let v: unknown = snapshot.value;
  while (v && typeof v === 'object') {
    const [k, inner] = Object.entries(v as Record<string, unknown>)[0]!;
    parts.push(k);
    v = inner;
  }
  if (typeof v === 'string') parts.push(v);
  return parts.join('.');
}

function collectiveMeta(snapshot: RankSnapshot): CollectiveMeta | null {
  for (const meta of Object.values(snapshot.getMeta() as Record<string, { collective?: CollectiveMeta }>)) {
    if (meta?.collective) return meta.collective;
  }
  return null;
}

/** Parameter elements an FSDP collective moves for `unit`, given which experts have gradients. */
function fsdpSize(ctx: RankContext, meta: CollectiveMeta): number {
  const { cfg } = ctx;
  const nLocal = cfg.numExperts / cfg.ep;
  const experts = meta.op === 'fsdp.reduce_scatter' ? expertsWithGrads(ctx) : nLocal;
  switch (meta.unit) {
    case 'attention':
      return cfg.attentionParams;
    case 'block':
    case undefined:
      return cfg.attentionParams + experts * cfg.paramsPerExpert;
    default:
      return experts * cfg.paramsPerExpert;
  }
}

/** fwd.counts moves one count per peer: one array of ones per group size, shared by every rank's ledger entries. */
const onesByEp = new Map<number, readonly number[]>();
function onesOf(ep: number): readonly number[] {
  let a = onesByEp.get(ep);
  if (!a) onesByEp.set(ep, (a = Object.freeze(Array.from({ length: ep }, () => 1))));
  return a;
}

/** The collective a rank in a collective state issues, or null when it is not in one. */
export function issuedCollective(snapshot: RankSnapshot): IssuedCollective | null {
  const meta = collectiveMeta(snapshot);
  if (!meta) return null;
  const ctx = snapshot.context;
  const path = statePath(snapshot);
  const base = {
    comm: meta.comm,
    op: meta.op,
    issuer: meta.issuer,
    unit: meta.unit ?? null,
    phase: snapshot.matches('forward') ? ('forward' as const) : ('backward' as const),
    layer: ctx.layer,
    microBatch: ctx.microBatch,
    statePath: path,
    why: ctx.trail,
  };
  if (meta.op === 'shared.all_gather') return { ...base, sendSplits: null, recvSplits: null, size: ctx.cfg.paramsPerExpert };
  // The experts' gradients, on whichever communicator the variant chose.
  if (meta.op === 'grad.all_gather') return { ...base, sendSplits: null, recvSplits: null, size: (ctx.cfg.numExperts / ctx.cfg.ep) * ctx.cfg.paramsPerExpert };
  if (meta.comm === 'dp') {
    // The MoE-side unit is the whole block under `block` and the experts alone under `experts`.
    const unit = meta.unit === 'moe' && (ctx.cfg.fsdp === 'block' || ctx.cfg.fsdp === 'experts') ? ctx.cfg.fsdp : meta.unit;
    return { ...base, unit: unit ?? null, sendSplits: null, recvSplits: null, size: fsdpSize(ctx, { ...meta, unit }) };
  }
  if (meta.op === 'metric.all_reduce') return { ...base, sendSplits: null, recvSplits: null, size: meta.comm === 'pp' ? stageMetricSize(ctx) : metricSize(ctx) };
  if (meta.op === 'fwd.counts') {
    const ones = onesOf(ctx.cfg.ep);
    return { ...base, sendSplits: ones, recvSplits: ones, size: null };
  }
  const { send, recv } = dataSplits(ctx);
  // Forward dispatch-direction exchanges send what routing chose; combine-direction ones swap.
  const forwardDirection = meta.op === 'fwd.dispatch' || meta.op === 'fwd.expert_ids' || meta.op === 'bwd.combine';
  return { ...base, sendSplits: forwardDirection ? send : recv, recvSplits: forwardDirection ? recv : send, size: null };
}
