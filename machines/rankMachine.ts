// The rank machine: one EP rank's training step as an xstate v5 machine. It is the single
// source of truth for which collectives a rank issues and in what order. The actor runtime
// runs it inside each worker (the real EP code asks it before every collective); the
// discrete-event engine steps it with xstate's pure transition(). Guards are named as the
// fact they test and every guarded choice records a Decision, so a diagnosis can quote why
// a rank issued or skipped a collective.
//
// Step shape: for each micro-batch, forward over layers 0..L-1 (route, A fwd.counts,
// B fwd.dispatch, C fwd.expert_ids, expert compute, D fwd.combine), then backward over
// layers L-1..0 (FSDP all-gather, D' bwd.combine, expert backward, B' bwd.dispatch, FSDP
// reduce-scatters as the wrap policy places them), then, under wrong-group, the experts'
// gradient all-gather, under layer-metric, the aux-loss metric all-reduce, and with pipeline
// stages, the aux-loss tracker's all-reduce over the pipeline group (once with every stage's
// keys; under stage-metric once per local key). A stage without MoE layers goes straight to
// the step's end.
import { assign, setup } from 'xstate';
import type { CollectiveOp } from '../src/ep/types.js';
import { hungExpert, shardBatches, type Variant } from './variants.js';
import type { CommKind } from './mesh.js';

/** FSDP wrap policies: where the data-parallel collectives land relative to the EP ones. */
export type WrapPolicy = 'block' | 'split' | 'experts';
export const WRAP_POLICIES: readonly WrapPolicy[] = ['block', 'split', 'experts'];

export interface RankConfig {
  /** Global rank, and its coordinates in the pp × dp × ep mesh (rank = (ppRank · dp + dpRank) · ep + epRank). */
  readonly rank: number;
  readonly epRank: number;
  readonly dpRank: number;
  readonly ppRank: number;
  readonly ep: number;
  readonly dp: number;
  readonly pp: number;
  /** MoE layers on this rank's pipeline stage (0: a dense stage). */
  readonly layers: number;
  /** MoE layers on every pipeline stage, by stage: the aux-loss tracker's keys. */
  readonly stageLayers: readonly number[];
  readonly microBatches: number;
  readonly numExperts: number;
  readonly topK: number;
  /** Packed experts: one row reaching any local expert gives every packed parameter a gradient. */
  readonly packed: boolean;
  /** FSDP over the dp communicator, or null for none. */
  readonly fsdp: WrapPolicy | null;
  /** Parameter elements of one expert and of the rest of a block (attention, router). */
  readonly paramsPerExpert: number;
  readonly attentionParams: number;
  readonly variant: Variant;
}

/** What routing and the exchanges told the rank about one layer of the current micro-batch. */
export interface LayerFacts {
  readonly tokens: number;
  /** Rows this rank sends to each EP peer (from routing), before any capacity padding. */
  readonly sendCounts: readonly number[];
  /** Rows each EP peer sends here (the fwd.counts result). */
  readonly recvCounts: readonly number[] | null;
  /** Rows received per local expert (known after fwd.expert_ids). */
  readonly rowsPerExpert: readonly number[] | null;
}

/** A guarded choice the machine made, with the facts that decided it. */
export interface Decision {
  readonly guard: string;
  readonly held: boolean;
  /** Collectives this choice removed from the rank's path (empty when it added or kept them). */
  readonly skipped: readonly CollectiveOp[];
  readonly fact: string;
  readonly layer: number;
  readonly microBatch: number;
}

export interface RankContext {
  readonly cfg: RankConfig;
  readonly layer: number;
  readonly microBatch: number;
  /** Layer calls made so far in this step (early-exit counts them). */
  readonly layerCalls: number;
  readonly facts: readonly (LayerFacts | null)[];
  /** Decisions since the last collective was issued; the next ledger entry carries them. */
  readonly trail: readonly Decision[];
  /** Every decision that skipped a collective, for the diagnosis. */
  readonly skips: readonly Decision[];
  readonly failure: string | null;
}

export type RankEvent =
  | { type: 'layer.routed'; tokens: number; sendCounts: readonly number[] }
  | { type: 'collective.done'; op: CollectiveOp; recvCounts?: readonly number[]; rowsPerExpert?: readonly number[] }
  /** firstReady: of two collectives this compute makes ready at once (completion-order, second-stream), the one whose completion landed first. */
  | { type: 'compute.done'; firstReady?: CollectiveOp }
  | { type: 'supervisor.abort'; reason: string }
  | { type: 'rank.failed'; error: string };

/** A collective state's meta: the op the rank issues there and the communicator it uses. */
export interface CollectiveMeta {
  readonly op: CollectiveOp;
  readonly comm: CommKind;
  /**
   * Who issues it in a real run: the EP layer's own code (which asks the machine first), or
   * the driver on the layer's behalf (FSDP's collectives and the step's metric all-reduce,
   * which sit outside the layer).
   */
  readonly issuer: 'layer' | 'driver';
  /** FSDP unit whose parameters the collective moves. */
  readonly unit?: 'block' | 'moe' | 'experts' | 'attention';
}

/**
 * Kinds of state, as xstate tags, so engines ask what a rank is doing instead of matching
 * state paths: waiting for the layer's routing, computing its experts (or stalled in a compute
 * that never returns), or in a collective.
 */
export const STATE_TAGS = { routing: 'routing', computing: 'computing', collective: 'collective', stalled: 'stalled' } as const;

/** Collectives outside the EP layer on the ep communicator (the step's, the shared expert's): the driver issues them. */
const STEP_OPS: readonly CollectiveOp[] = ['metric.all_reduce', 'grad.all_gather', 'shared.all_gather'];

const collective = (meta: Omit<CollectiveMeta, 'issuer'>) => ({
  tags: [STATE_TAGS.collective],
  meta: { collective: { ...meta, issuer: meta.comm !== 'ep' || STEP_OPS.includes(meta.op) ? 'driver' : 'layer' } satisfies CollectiveMeta },
});

export function currentFacts(ctx: RankContext): LayerFacts {
  const f = ctx.facts[ctx.layer];
  if (!f) throw new Error(`rank ${ctx.cfg.rank}: no routing facts for layer ${ctx.layer}`);
  return f;
}

const sum = (xs: readonly number[] | null) => (xs ?? []).reduce((a, b) => a + b, 0);
const receivedRows = (ctx: RankContext) => sum(currentFacts(ctx).recvCounts);
const where = (ctx: RankContext, phase: string) =>
  `in layer ${ctx.layer} ${phase}${ctx.cfg.microBatches > 1 ? ` (micro-batch ${ctx.microBatch})` : ''}`;

/** Experts of this rank whose parameters get a gradient in the current layer's backward. */
export function expertsWithGrads(ctx: RankContext): number {
  const { cfg } = ctx;
  const n = cfg.numExperts / cfg.ep;
  if (cfg.variant.unusedExpertGrads) return n;
  const rows = currentFacts(ctx).rowsPerExpert ?? [];
  if (cfg.packed) return sum(rows) > 0 ? n : 0;
  return rows.filter((r) => r > 0).length;
}

/** Rows this rank sends and receives in an all-to-all, as the variant sizes them. */
export function dataSplits(ctx: RankContext): { send: readonly number[]; recv: readonly number[] } {
  const { cfg } = ctx;
  const f = currentFacts(ctx);
  const cap = cfg.variant.localCapacity;
  if (cap) {
    // GShard-style padding to a capacity from local counts: every peer gets n_local · C rows
    // and the rank expects as many back, whatever its peers computed.
    const nLocal = cfg.numExperts / cfg.ep;
    const c = Math.ceil((cap.factor * f.tokens * cfg.topK) / cfg.numExperts);
    const rows = Array.from({ length: cfg.ep }, () => nLocal * c);
    return { send: rows, recv: rows };
  }
  // The facts themselves, not copies: they are immutable, and the ledger keeps every entry's splits.
  return { send: f.sendCounts, recv: f.recvCounts ?? f.sendCounts.map(() => 0) };
}

/** Under kernel-hang, the local expert (index on this rank) whose backward GEMM never returns in the current layer, else null. */
const stalledExpert = (ctx: RankContext) => hungExpert(ctx.cfg.variant, currentFacts(ctx).rowsPerExpert ?? []);

/**
 * Micro-batches this rank runs: all of them, or under uneven-batches its shard of the
 * evaluation batches (sharded over one stage's ranks: every stage of a replica runs its data).
 */
const ownMicroBatches = ({ cfg }: RankContext) => (cfg.variant.unevenBatches ? shardBatches(cfg.variant.unevenBatches.total, cfg.ep * cfg.dp, cfg.dpRank * cfg.ep + cfg.epRank) : cfg.microBatches);

/** The router recorded into the aux-loss tracker: it routed tokens in some layer of the last micro-batch. */
const routedTokens = (ctx: RankContext) => ctx.facts.some((f) => f !== null && f.tokens > 0);

/** Elements of the aux-loss metric all-reduce: one per layer, plus the MTP slot the router adds when it records. */
export const metricSize = (ctx: RankContext) => ctx.cfg.layers + (routedTokens(ctx) ? 1 : 0);

/** Elements of the aux-loss tracker's all-reduce over the pipeline group: one key, or every stage's keys at once. */
export const stageMetricSize = ({ cfg }: RankContext) => (cfg.variant.stageMetric ? 1 : cfg.stageLayers.reduce((a, b) => a + b, 0));

const count = (n: number, what: string) => `${n} ${what}${n === 1 ? '' : 's'}`;

const decide = (ctx: RankContext, d: Omit<Decision, 'layer' | 'microBatch'>): Partial<RankContext> => {
  const full: Decision = { ...d, layer: ctx.layer, microBatch: ctx.microBatch };
  return { trail: [...ctx.trail, full], skips: d.skipped.length ? [...ctx.skips, full] : ctx.skips };
};

export const rankMachine = setup({
  types: {
    context: {} as RankContext,
    events: {} as RankEvent,
    input: {} as RankConfig,
  },
  guards: {
    stopsEarly: ({ context: c }) => c.cfg.variant.earlyExit?.rank === c.cfg.epRank && c.layerCalls >= c.cfg.variant.earlyExit.afterLayers,
    sendsNoRowsAndSkips: ({ context: c }) => c.cfg.variant.skipEmptySends && sum(dataSplits(c).send) === 0,
    returnsNoRowsAndSkips: ({ context: c }) => c.cfg.variant.skipEmptySends && sum(dataSplits(c).recv) === 0,
    moreLayersForward: ({ context: c }) => c.layer + 1 < c.cfg.layers,
    moreLayersBackward: ({ context: c }) => c.layer > 0,
    moreMicroBatches: ({ context: c }) => c.microBatch + 1 < ownMicroBatches(c),
    shardEndsBeforePeers: ({ context: c }) => c.microBatch + 1 < c.cfg.microBatches,
    fsdpWrapsMoe: ({ context: c }) => c.cfg.fsdp !== null,
    expertsUnitHasGrads: ({ context: c }) => c.cfg.fsdp === 'experts' && expertsWithGrads(c) > 0,
    expertsUnitWithoutGrads: ({ context: c }) => c.cfg.fsdp === 'experts' && expertsWithGrads(c) === 0,
    keepsDispatchEdge: ({ context: c }) => c.cfg.variant.dispatchEdge || receivedRows(c) > 0,
    moeUnitReduceScatters: ({ context: c }) => c.cfg.fsdp === 'block' || (c.cfg.fsdp === 'split' && expertsWithGrads(c) > 0),
    moeUnitWithoutGrads: ({ context: c }) => c.cfg.fsdp === 'split' && expertsWithGrads(c) === 0,
    attentionIsOwnUnit: ({ context: c }) => c.cfg.fsdp === 'split' || c.cfg.fsdp === 'experts',
    dispatchReadyFirst: ({ context: c, event }) =>
      c.cfg.variant.completionOrder && event.type === 'compute.done' && event.firstReady === 'bwd.dispatch' && c.cfg.fsdp === 'experts' && expertsWithGrads(c) > 0,
    logsLayerMetric: ({ context: c }) => c.cfg.variant.layerMetric,
    zeroRowExpertHangsKernel: ({ context: c }) => stalledExpert(c) !== null,
    sharedReadyFirst: ({ context: c, event }) => c.cfg.variant.secondStream && event.type === 'compute.done' && event.firstReady === 'shared.all_gather',
    combineReadyFirst: ({ context: c }) => c.cfg.variant.secondStream,
    gathersExpertGradsOnOwnGroup: ({ context: c }) => c.cfg.variant.wrongGroup !== null && c.cfg.variant.wrongGroup.rank !== c.cfg.epRank,
    gathersExpertGradsOnDpGroup: ({ context: c }) => c.cfg.variant.wrongGroup?.rank === c.cfg.epRank,
    stageHoldsNoMoeLayer: ({ context: c }) => c.cfg.layers === 0,
    // Under stage-metric `layer` counts the local keys all-reduced so far (one key per MoE layer).
    allReducesNextLocalKey: ({ context: c }) => c.cfg.variant.stageMetric && c.layer < c.cfg.layers,
    stageHoldsFewerKeys: ({ context: c }) => c.cfg.variant.stageMetric && c.cfg.layers < Math.max(...c.cfg.stageLayers),
    allReducesPerLocalKey: ({ context: c }) => c.cfg.variant.stageMetric,
    pipelineHasStages: ({ context: c }) => c.cfg.pp > 1,
  },
  actions: {
    recordRouting: assign(({ context: c, event }) => {
      if (event.type !== 'layer.routed') return {};
      const facts = [...c.facts];
      facts[c.layer] = { tokens: event.tokens, sendCounts: [...event.sendCounts], recvCounts: null, rowsPerExpert: null };
      return { facts, layerCalls: c.layerCalls + 1 };
    }),
    recordExchange: assign(({ context: c, event }) => {
      if (event.type !== 'collective.done') return { trail: [] };
      const prev = currentFacts(c);
      const facts = [...c.facts];
      facts[c.layer] = {
        ...prev,
        recvCounts: event.recvCounts ? [...event.recvCounts] : prev.recvCounts,
        rowsPerExpert: event.rowsPerExpert ? [...event.rowsPerExpert] : prev.rowsPerExpert,
      };
      return { facts, trail: [] };
    }),
    clearTrail: assign({ trail: [] }),
    nextLayer: assign(({ context: c }) => ({ layer: c.layer + 1 })),
    previousLayer: assign(({ context: c }) => ({ layer: c.layer - 1 })),
    nextMicroBatch: assign(({ context: c }) => ({ microBatch: c.microBatch + 1, layer: 0, facts: c.facts.map(() => null) })),
    noteEarlyExit: assign(({ context: c }) =>
      decide(c, { guard: 'stopsEarly', held: true, skipped: ['fwd.counts'], fact: `rank ${c.cfg.rank} stopped calling the MoE layer after ${c.layerCalls} layer call(s)` }),
    ),
    noteSkippedDispatch: assign(({ context: c }) =>
      decide(c, { guard: 'sendsNoRowsAndSkips', held: true, skipped: ['fwd.dispatch', 'fwd.expert_ids'], fact: `rank ${c.cfg.rank} has 0 rows to send ${where(c, 'forward')}` }),
    ),
    noteSkippedCombine: assign(({ context: c }) =>
      decide(c, { guard: 'returnsNoRowsAndSkips', held: true, skipped: ['fwd.combine'], fact: `rank ${c.cfg.rank} received 0 rows ${where(c, 'forward')}, so it has nothing to return` }),
    ),
    noteSkippedCombineGrad: assign(({ context: c }) =>
      decide(c, { guard: 'sendsNoRowsAndSkips', held: true, skipped: ['bwd.combine'], fact: `rank ${c.cfg.rank} has 0 rows of combine gradient to send ${where(c, 'backward')}` }),
    ),
    noteSkippedDispatchGrad: assign(({ context: c }) =>
      decide(c, { guard: 'returnsNoRowsAndSkips', held: true, skipped: ['bwd.dispatch'], fact: `rank ${c.cfg.rank} received 0 rows ${where(c, 'forward')}, so it has no input gradient to return ${where(c, 'backward')}` }),
    ),
    noteDroppedDispatchEdge: assign(({ context: c }) =>
      decide(c, { guard: 'keepsDispatchEdge', held: false, skipped: ['bwd.dispatch'], fact: `rank ${c.cfg.rank} received 0 rows ${where(c, 'forward')}` }),
    ),
    noteSkippedExpertsReduceScatter: assign(({ context: c }) =>
      decide(c, { guard: 'expertsUnitHasGrads', held: false, skipped: ['fsdp.reduce_scatter'], fact: `no local expert of rank ${c.cfg.rank} has a gradient ${where(c, 'backward')}` }),
    ),
    noteSkippedMoeReduceScatter: assign(({ context: c }) =>
      decide(c, { guard: 'moeUnitReduceScatters', held: false, skipped: ['fsdp.reduce_scatter'], fact: `no local expert of rank ${c.cfg.rank} has a gradient ${where(c, 'backward')}` }),
    ),
    noteDispatchFirst: assign(({ context: c }) =>
      decide(c, { guard: 'dispatchReadyFirst', held: true, skipped: [], fact: `rank ${c.cfg.rank}'s input gradient completed before its expert-gradient hook ${where(c, 'backward')}, so it issued bwd.dispatch before the experts reduce-scatter` }),
    ),
    noteForcedMetric: assign(({ context: c }) =>
      routedTokens(c) ? {} : decide(c, { guard: 'logsLayerMetric', held: true, skipped: [], fact: `rank ${c.cfg.rank} routed no tokens this step, so its aux-loss tracker was force-initialized with ${c.cfg.layers} slots, without the MTP slot` }),
    ),
    noteKernelHang: assign(({ context: c }) => {
      const expert = stalledExpert(c)! + c.cfg.epRank * (c.cfg.numExperts / c.cfg.ep);
      return decide(c, { guard: 'zeroRowExpertHangsKernel', held: true, skipped: [], fact: `expert ${expert} of rank ${c.cfg.rank} received 0 rows ${where(c, 'forward')}, so its grouped GEMM runs with K = 0 in the expert backward` });
    }),
    noteWrongGroup: assign(({ context: c }) =>
      decide(c, {
        guard: 'gathersExpertGradsOnOwnGroup',
        held: false,
        skipped: ['grad.all_gather'],
        fact: `rank ${c.cfg.rank} all-gathers its experts' gradients on its dp communicator, not on its ep communicator where its EP peers gather them`,
      }),
    ),
    noteSharedFirst: assign(({ context: c }) =>
      decide(c, { guard: 'sharedReadyFirst', held: true, skipped: [], fact: `rank ${c.cfg.rank}'s shared expert on the second stream completed before its routed experts ${where(c, 'forward')}, so it issued shared.all_gather before fwd.combine` }),
    ),
    noteCombineFirst: assign(({ context: c }) =>
      decide(c, { guard: 'sharedReadyFirst', held: false, skipped: [], fact: `rank ${c.cfg.rank}'s routed experts completed before its shared expert on the second stream ${where(c, 'forward')}, so it issued fwd.combine before shared.all_gather` }),
    ),
    noteShortShard: assign(({ context: c }) =>
      decide(c, {
        guard: 'moreMicroBatches',
        held: false,
        skipped: ['fwd.counts'],
        fact: `rank ${c.cfg.rank}'s shard of the ${c.cfg.variant.unevenBatches?.total} evaluation batches over ${c.cfg.ep * c.cfg.dp} ranks holds ${ownMicroBatches(c)} micro-batch(es), the longest ${c.cfg.microBatches}`,
      }),
    ),
    noteFewerKeys: assign(({ context: c }) => {
      const most = Math.max(...c.cfg.stageLayers);
      return decide(c, {
        guard: 'allReducesNextLocalKey',
        held: false,
        skipped: ['metric.all_reduce'],
        fact: `rank ${c.cfg.rank} on pipeline stage ${c.cfg.ppRank} holds ${count(c.cfg.layers, 'MoE layer')}, so its aux-loss tracker has ${count(c.cfg.layers, 'key')} and it all-reduced ${count(c.cfg.layers, 'time')} over its pipeline group, where stage ${c.cfg.stageLayers.indexOf(most)} holds ${count(most, 'MoE layer')}`,
      });
    }),
    noteFailure: assign(({ event }) => ({ failure: event.type === 'rank.failed' ? event.error : event.type === 'supervisor.abort' ? event.reason : null })),
  },
}).createMachine({
  id: 'rank',
  context: ({ input }) => ({
    cfg: input,
    layer: 0,
    microBatch: 0,
    layerCalls: 0,
    facts: Array.from({ length: input.layers }, () => null),
    trail: [],
    skips: [],
    failure: null,
  }),
  initial: 'forward',
  on: {
    'supervisor.abort': { target: '.aborted', actions: 'noteFailure' },
    'rank.failed': { target: '.failed', actions: 'noteFailure' },
  },
  states: {
    forward: {
      initial: 'route',
      states: {
        route: {
          tags: [STATE_TAGS.routing],
          always: [
            { guard: 'stageHoldsNoMoeLayer', target: '#rank.stepEnd' },
            { guard: 'stopsEarly', target: '#rank.exited', actions: 'noteEarlyExit' },
          ],
          on: { 'layer.routed': { target: 'counts', actions: 'recordRouting' } },
        },
        counts: {
          ...collective({ op: 'fwd.counts', comm: 'ep' }),
          on: {
            'collective.done': [
              { guard: 'sendsNoRowsAndSkips', target: 'compute', actions: ['recordExchange', 'noteSkippedDispatch'] },
              { target: 'dispatch', actions: 'recordExchange' },
            ],
          },
        },
        dispatch: { ...collective({ op: 'fwd.dispatch', comm: 'ep' }), on: { 'collective.done': { target: 'expertIds', actions: 'recordExchange' } } },
        expertIds: { ...collective({ op: 'fwd.expert_ids', comm: 'ep' }), on: { 'collective.done': { target: 'compute', actions: 'recordExchange' } } },
        compute: {
          tags: [STATE_TAGS.computing],
          on: {
            'compute.done': [
              { guard: 'returnsNoRowsAndSkips', target: 'layerDone', actions: 'noteSkippedCombine' },
              { guard: 'sharedReadyFirst', target: 'sharedFirst', actions: 'noteSharedFirst' },
              { guard: 'combineReadyFirst', target: 'combine', actions: 'noteCombineFirst' },
              { target: 'combine' },
            ],
          },
        },
        combine: {
          ...collective({ op: 'fwd.combine', comm: 'ep' }),
          on: {
            'collective.done': [
              { guard: 'combineReadyFirst', target: 'sharedAfter', actions: 'recordExchange' },
              { target: 'layerDone', actions: 'recordExchange' },
            ],
          },
        },
        sharedAfter: { ...collective({ op: 'shared.all_gather', comm: 'ep' }), on: { 'collective.done': { target: 'layerDone', actions: 'clearTrail' } } },
        sharedFirst: { ...collective({ op: 'shared.all_gather', comm: 'ep' }), on: { 'collective.done': { target: 'combineAfter', actions: 'clearTrail' } } },
        combineAfter: { ...collective({ op: 'fwd.combine', comm: 'ep' }), on: { 'collective.done': { target: 'layerDone', actions: 'recordExchange' } } },
        layerDone: {
          always: [
            { guard: 'moreLayersForward', target: 'route', actions: 'nextLayer' },
            { target: '#rank.backward' },
          ],
        },
      },
    },
    backward: {
      initial: 'layerStart',
      states: {
        layerStart: {
          always: [
            { guard: 'fsdpWrapsMoe', target: 'moeAllGather' },
            { guard: 'sendsNoRowsAndSkips', target: 'expertBackward', actions: 'noteSkippedCombineGrad' },
            { target: 'combine' },
          ],
        },
        moeAllGather: {
          ...collective({ op: 'fsdp.all_gather', comm: 'dp', unit: 'moe' }),
          on: {
            'collective.done': [
              { guard: 'sendsNoRowsAndSkips', target: 'expertBackward', actions: ['recordExchange', 'noteSkippedCombineGrad'] },
              { target: 'combine', actions: 'recordExchange' },
            ],
          },
        },
        combine: { ...collective({ op: 'bwd.combine', comm: 'ep' }), on: { 'collective.done': { target: 'expertBackward', actions: 'recordExchange' } } },
        expertBackward: {
          tags: [STATE_TAGS.computing],
          always: { guard: 'zeroRowExpertHangsKernel', target: 'kernelHung', actions: 'noteKernelHang' },
          on: {
            'compute.done': [
              { guard: 'dispatchReadyFirst', target: 'dispatchFirst', actions: 'noteDispatchFirst' },
              { guard: 'expertsUnitHasGrads', target: 'expertsReduceScatter' },
              { guard: 'expertsUnitWithoutGrads', target: 'dispatchChoice', actions: 'noteSkippedExpertsReduceScatter' },
              { target: 'dispatchChoice' },
            ],
          },
        },
        // The expert backward never returns: no event leaves this state but an abort.
        kernelHung: { tags: [STATE_TAGS.computing, STATE_TAGS.stalled] },
        expertsReduceScatter: {
          ...collective({ op: 'fsdp.reduce_scatter', comm: 'dp', unit: 'experts' }),
          on: { 'collective.done': { target: 'dispatchChoice', actions: 'recordExchange' } },
        },
        dispatchChoice: {
          always: [
            { guard: 'returnsNoRowsAndSkips', target: 'moeDone', actions: 'noteSkippedDispatchGrad' },
            { guard: 'keepsDispatchEdge', target: 'dispatch' },
            { target: 'moeDone', actions: 'noteDroppedDispatchEdge' },
          ],
        },
        dispatch: { ...collective({ op: 'bwd.dispatch', comm: 'ep' }), on: { 'collective.done': { target: 'moeDone', actions: 'recordExchange' } } },
        dispatchFirst: { ...collective({ op: 'bwd.dispatch', comm: 'ep' }), on: { 'collective.done': { target: 'expertsReduceScatterAfterDispatch', actions: 'recordExchange' } } },
        expertsReduceScatterAfterDispatch: {
          ...collective({ op: 'fsdp.reduce_scatter', comm: 'dp', unit: 'experts' }),
          on: { 'collective.done': { target: 'moeDone', actions: 'recordExchange' } },
        },
        moeDone: {
          always: [
            { guard: 'moeUnitReduceScatters', target: 'moeReduceScatter' },
            { guard: 'moeUnitWithoutGrads', target: 'attentionChoice', actions: 'noteSkippedMoeReduceScatter' },
            { target: 'attentionChoice' },
          ],
        },
        moeReduceScatter: {
          ...collective({ op: 'fsdp.reduce_scatter', comm: 'dp', unit: 'moe' }),
          on: { 'collective.done': { target: 'attentionChoice', actions: 'recordExchange' } },
        },
        attentionChoice: {
          always: [{ guard: 'attentionIsOwnUnit', target: 'attentionAllGather' }, { target: 'layerDone' }],
        },
        attentionAllGather: {
          ...collective({ op: 'fsdp.all_gather', comm: 'dp', unit: 'attention' }),
          on: { 'collective.done': { target: 'attentionReduceScatter', actions: 'recordExchange' } },
        },
        attentionReduceScatter: {
          ...collective({ op: 'fsdp.reduce_scatter', comm: 'dp', unit: 'attention' }),
          on: { 'collective.done': { target: 'layerDone', actions: 'recordExchange' } },
        },
        layerDone: {
          always: [
            { guard: 'moreLayersBackward', target: 'layerStart', actions: 'previousLayer' },
            { guard: 'moreMicroBatches', target: '#rank.forward', actions: 'nextMicroBatch' },
            { guard: 'shardEndsBeforePeers', target: '#rank.stepEnd', actions: 'noteShortShard' },
            { target: '#rank.stepEnd' },
          ],
        },
      },
    },
    stepEnd: {
      always: [
        { guard: 'gathersExpertGradsOnDpGroup', target: 'gradGatherOnDp', actions: 'noteWrongGroup' },
        { guard: 'gathersExpertGradsOnOwnGroup', target: 'gradGather' },
        { target: 'metricChoice' },
      ],
    },
    gradGather: { ...collective({ op: 'grad.all_gather', comm: 'ep' }), on: { 'collective.done': { target: 'metricChoice', actions: 'clearTrail' } } },
    gradGatherOnDp: { ...collective({ op: 'grad.all_gather', comm: 'dp' }), on: { 'collective.done': { target: 'metricChoice', actions: 'clearTrail' } } },
    metricChoice: {
      always: [{ guard: 'logsLayerMetric', target: 'metricAllReduce', actions: 'noteForcedMetric' }, { target: 'pipelineMetric' }],
    },
    metricAllReduce: { ...collective({ op: 'metric.all_reduce', comm: 'ep' }), on: { 'collective.done': { target: 'pipelineMetric', actions: 'clearTrail' } } },
    pipelineMetric: {
      always: [
        { guard: 'allReducesNextLocalKey', target: 'stageMetricKey' },
        { guard: 'stageHoldsFewerKeys', target: 'done', actions: 'noteFewerKeys' },
        { guard: 'allReducesPerLocalKey', target: 'done' },
        { guard: 'pipelineHasStages', target: 'stageMetricAll' },
        { target: 'done' },
      ],
    },
    stageMetricKey: { ...collective({ op: 'metric.all_reduce', comm: 'pp' }), on: { 'collective.done': { target: 'pipelineMetric', actions: ['clearTrail', 'nextLayer'] } } },
    stageMetricAll: { ...collective({ op: 'metric.all_reduce', comm: 'pp' }), on: { 'collective.done': { target: 'done', actions: 'clearTrail' } } },
    done: { type: 'final' },
    exited: { type: 'final' },
    aborted: { type: 'final' },
    failed: { type: 'final' },
  },
});

