// Variants remove one of the seed's safeties at a time, so the simulator can reproduce the
// real hazard each safety exists for. The rank machine's guards read these flags; nothing
// else branches on the variant name.

export const VARIANT_NAMES = ['seed', 'no-dispatch-edge', 'no-unused-expert-grads', 'skip-empty-sends', 'early-exit', 'local-capacity', 'completion-order', 'layer-metric', 'kernel-hang', 'wrong-group', 'uneven-batches', 'second-stream', 'stage-metric'] as const;
export type VariantName = (typeof VARIANT_NAMES)[number];

export interface Variant {
  readonly name: VariantName;
  /** `received_tokens.sum()*0` keeps bwd.dispatch in the autograd graph on a rank that received nothing. */
  readonly dispatchEdge: boolean;
  /** Zero contributions keep every expert parameter's gradient hook firing (FSDP2 reduce-scatter sizes agree). */
  readonly unusedExpertGrads: boolean;
  /** A rank with nothing to send skips the exchange (old NCCL zero-byte hazard). */
  readonly skipEmptySends: boolean;
  /** The rank that stops calling the MoE layer after `afterLayers` layer calls in the step (generation with unequal lengths). */
  readonly earlyExit: { readonly rank: number; readonly afterLayers: number } | null;
  /** Capacity per expert from the rank's own token count: ceil(factor · T_r · K / E), rows padded to it (GShard style). */
  readonly localCapacity: { readonly factor: number } | null;
  /** B′ and the experts' gradient reduce-scatter, made ready by one expert backward, go out in the order their completions land. */
  readonly completionOrder: boolean;
  /** An aux-loss metric all-reduce sized layers + 1 where the router recorded, layers where it was force-initialized. */
  readonly layerMetric: boolean;
  /** A local expert that received no rows runs its backward grouped GEMM with K = 0, which never returns (torchtitan #1118). */
  readonly kernelHang: boolean;
  /**
   * The experts' gradients are all-gathered at the step's end; `rank` (an EP rank, in every
   * replica) issues it on its dp communicator instead of its ep one (Megatron-Bridge #1363).
   */
  readonly wrongGroup: { readonly rank: number } | null;
  /**
   * `total` evaluation batches sharded round-robin over every rank (the dense data-parallel
   * group), each rank running its shard as micro-batches: the counts differ by one where
   * `total` does not divide (NVIDIA Model-Optimizer PR #1966).
   */
  readonly unevenBatches: { readonly total: number } | null;
  /**
   * A shared expert whose all-gather runs on a second stream: it and D (fwd.combine), both
   * ready after the expert forward, go out in the order their completions land
   * (Megatron-LM #1810, vllm-ascend PR #15500).
   */
  readonly secondStream: boolean;
  /**
   * The aux-loss tracker all-reduced over the pipeline group once per key, one key per local
   * MoE layer, instead of once with every stage's keys: stages with different numbers of MoE
   * layers issue different numbers of all-reduces (Megatron-LM #1444, NeMo-RL PR #3419,
   * Megatron-LM PR #3401).
   */
  readonly stageMetric: boolean;
  /** One sentence: which safety is gone and what that does. */
  readonly rule: string;
}

const SEED: Variant = {
  name: 'seed',
  dispatchEdge: true,
  unusedExpertGrads: true,
  skipEmptySends: false,
  earlyExit: null,
  localCapacity: null,
  completionOrder: false,
  layerMetric: false,
  kernelHang: false,
  wrongGroup: null,
  unevenBatches: null,
  secondStream: false,
  stageMetric: false,
  rule: 'the seed keeps every collective on every rank',
};

export interface VariantOptions {
  /** early-exit: which rank stops and after how many layer calls (default rank ep-1, one layer). */
  earlyExitRank?: number;
  earlyExitAfterLayers?: number;
  /** local-capacity: the capacity factor (default 1.0). */
  capacityFactor?: number;
  /** wrong-group: the EP rank that gathers on the dp communicator (default ep-1). */
  wrongGroupRank?: number;
  /** uneven-batches: the evaluation batches sharded over every rank (default world · micro-batches − 1). */
  evalBatches?: number;
}

export function makeVariant(name: VariantName, opts: VariantOptions = {}): Variant {
  switch (name) {
    case 'seed':
      return SEED;
    case 'no-dispatch-edge':
      return { ...SEED, name, dispatchEdge: false, rule: 'variant no-dispatch-edge drops bwd.dispatch when nothing was received' };
    case 'no-unused-expert-grads':
      return {
        ...SEED,
        name,
        unusedExpertGrads: false,
        rule: 'variant no-unused-expert-grads lets unused experts fire no gradient hook, so FSDP2 leaves their parameters out of the reduce-scatter (and skips a unit with no gradients)',
      };
    case 'skip-empty-sends':
      return { ...SEED, name, skipEmptySends: true, rule: 'variant skip-empty-sends skips an all-to-all in which the rank has no rows to send' };
    case 'early-exit':
      return {
        ...SEED,
        name,
        earlyExit: { rank: opts.earlyExitRank ?? -1, afterLayers: opts.earlyExitAfterLayers ?? 1 },
        rule: 'variant early-exit stops one rank calling the MoE layer before its peers (generation with unequal lengths)',
      };
    case 'local-capacity':
      return {
        ...SEED,
        name,
        localCapacity: { factor: opts.capacityFactor ?? 1 },
        rule: 'variant local-capacity sizes the all-to-all from a capacity computed from local token counts, so ranks with different token counts disagree on split sizes',
      };
    case 'completion-order':
      return {
        ...SEED,
        name,
        completionOrder: true,
        rule: 'variant completion-order issues bwd.dispatch and the experts reduce-scatter, both made ready by the expert backward, in the order their completions land instead of program order',
      };
    case 'layer-metric':
      return {
        ...SEED,
        name,
        layerMetric: true,
        rule: 'variant layer-metric all-reduces an aux-loss metric sized by the layers the router recorded (plus one MTP slot) on some ranks and force-initialized without it on ranks that routed nothing',
      };
    case 'kernel-hang':
      return {
        ...SEED,
        name,
        kernelHang: true,
        rule: 'variant kernel-hang runs the expert backward as one grouped GEMM without padding, so a local expert with 0 rows gives a K = 0 GEMM that never returns',
      };
    case 'wrong-group':
      return {
        ...SEED,
        name,
        wrongGroup: { rank: opts.wrongGroupRank ?? -1 },
        rule: "variant wrong-group all-gathers the experts' gradients at the step's end on the communicator of another parallel dimension on one EP rank (expert-tensor-parallel size ≠ tensor-parallel size picked the dense group)",
      };
    case 'uneven-batches':
      return {
        ...SEED,
        name,
        unevenBatches: { total: opts.evalBatches ?? -1 },
        rule: 'variant uneven-batches shards the evaluation batches over the dense data-parallel group, so EP peers run different numbers of micro-batches and the longer shard issues collectives its peers never start',
      };
    case 'second-stream':
      return {
        ...SEED,
        name,
        secondStream: true,
        rule: "variant second-stream issues the shared expert's all-gather from a second stream, so it and fwd.combine, both ready after the expert forward, go out in the order their completions land instead of program order",
      };
    case 'stage-metric':
      return {
        ...SEED,
        name,
        stageMetric: true,
        rule: "variant stage-metric all-reduces the aux-loss tracker over the pipeline group once per local key (one per MoE layer of the stage) instead of once with every stage's keys, so stages with different numbers of MoE layers issue different numbers of all-reduces",
      };
  }
}

/** Under uneven-batches, the micro-batches global rank `rank` of `world` runs: its round-robin share of the batches. */
export function shardBatches(total: number, world: number, rank: number): number {
  return Math.floor(total / world) + (rank < total % world ? 1 : 0);
}

/** Under kernel-hang, the local expert whose 0 rows make the backward GEMM never return (the first such), else null. */
export function hungExpert(v: Variant, rowsPerExpert: readonly number[]): number | null {
  if (!v.kernelHang) return null;
  const i = rowsPerExpert.indexOf(0);
  return i < 0 ? null : i;
}

export function isVariantName(s: string): s is VariantName {
  return (VARIANT_NAMES as readonly string[]).includes(s);
}
