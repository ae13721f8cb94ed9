// The corpus: named scenarios, each reproducing a real class of MoE hang with the verdict
// it must give, and the seed's safeties passing the same scenario. Tests and `sweep` run it.
import type { VerdictKind } from '../../machines/diagnosis.js';
import { validateScenario, type Scenario } from '../../machines/scenario.js';

export interface CorpusCase {
  readonly name: string;
  /** Where the bug was seen and fixed. */
  readonly source: string;
  readonly what: string;
  /** How real code avoids it: the fix the source's maintainers made, in one line. */
  readonly fix: string;
  readonly scenario: Scenario;
  readonly expected: VerdictKind;
}

const make = (c: Omit<CorpusCase, 'scenario'> & { scenario: Partial<Scenario> }): CorpusCase => ({ ...c, scenario: validateScenario(c.scenario) });

export const CORPUS: readonly CorpusCase[] = [
  make({
    name: 'zero-token-rank-skips-bwd-dispatch',
    source: "the seed's own comment (received_tokens.sum()*0); fixed alike in Megatron-LM and PaddleFormers",
    what: 'a rank that received no rows has no autograd edge to B′, so it skips bwd.dispatch while its peers wait in it',
    fix: 'keep B′ in the autograd graph on every rank with received_tokens.sum()*0, as the seed does',
    scenario: { ep: 4, experts: 8, routing: 'starve:1', variant: 'no-dispatch-edge' },
    expected: 'missing',
  }),
  make({
    name: 'unused-experts-fire-no-grad-hook',
    source: 'DeepSpeed #4808',
    what: "experts that got no rows fire no gradient hook, so one data-parallel rank's FSDP reduce-scatter leaves their parameters out",
    fix: 'give every expert parameter a gradient (zero contributions from unused experts), so every hook fires and the reduce-scatter has one size',
    scenario: { ep: 2, dp: 2, experts: 4, fsdp: 'block', routing: 'starve:1', variant: 'no-unused-expert-grads' },
    expected: 'mismatch',
  }),
  make({
    name: 'zero-byte-send-skipped',
    source: 'old NCCL versions that could not send zero bytes; callers skipped the all-to-all',
    what: 'a rank with no tokens skips the exchanges in which it has nothing to send',
    fix: 'issue every all-to-all even with zero rows to send (NCCL accepts zero-byte sends)',
    scenario: { ep: 4, experts: 8, routing: 'empty:2', variant: 'skip-empty-sends' },
    expected: 'mismatch',
  }),
  make({
    name: 'capacity-from-local-counts',
    source: 'DeepSpeed #6809',
    what: 'all-to-all splits padded to a capacity computed from the local token count disagree between ranks holding different counts',
    fix: 'size the capacity from a global token count (an all-reduce of the counts) so every rank pads to the same splits',
    scenario: { ep: 4, experts: 8, routing: 'empty:3', variant: 'local-capacity' },
    expected: 'mismatch',
  }),
  make({
    name: 'rank-stops-calling-the-layer',
    source: 'DeepSpeed #6634',
    what: 'in generation with unequal lengths one rank stops calling the MoE layer while its peers still exchange',
    fix: 'keep calling the MoE layer with zero tokens until every rank has finished generating (synced GPUs)',
    scenario: { ep: 4, experts: 8, layers: 2, variant: 'early-exit' },
    expected: 'missing',
  }),
  make({
    name: 'two-ready-collectives-in-completion-order',
    source: 'Megatron-LM #1810',
    what: 'one expert backward makes B′ (ep) and the experts reduce-scatter (dp) ready at once; ranks issue them in the order their completions land, crossing communicators',
    fix: 'issue the collectives in program order on one stream, each gated by its own event, not in the order completions land',
    scenario: { ep: 2, dp: 2, experts: 4, fsdp: 'experts', variant: 'completion-order', firstReady: [['bwd.dispatch'], ['fsdp.reduce_scatter'], ['fsdp.reduce_scatter'], ['bwd.dispatch']] },
    expected: 'cycle',
  }),
  make({
    name: 'reduce-scatter-between-ep-backward-all-to-alls',
    source: "KempnerForge's split wrap policy (attention and MoE MLP as separate FSDP units)",
    what: 'with the experts as their own FSDP unit, its reduce-scatter lands between D′ and B′; a rank whose experts got no gradient skips it and waits in B′ while its dp peer waits in the reduce-scatter, around both communicators',
    fix: 'wrap the experts with the rest of the block in one FSDP unit, or keep zero gradients for unused experts so the unit always reduce-scatters',
    // Every row of dp group 0 goes to EP rank 0's experts, every row of group 1 to EP rank 1's:
    // ranks 1 and 2 skip the reduce-scatter, so 0 → 2 (dp) → 3 (ep) → 1 (dp) → 0 (ep).
    scenario: { ep: 2, dp: 2, experts: 4, fsdp: 'experts', routing: 'explicit', explicit: [[[[0, 1, 0, 1]]], [[[0, 1, 0, 1]]], [[[2, 3, 2, 3]]], [[[2, 3, 2, 3]]]], variant: 'no-unused-expert-grads' },
    expected: 'cycle',
  }),
  make({
    name: 'metric-all-reduce-sized-by-layers',
    source: 'Megatron-LM #3401',
    what: 'the aux-loss tracker is all-reduced with one slot per layer plus an MTP slot where the router recorded, without it where it was force-initialized',
    fix: 'initialize the aux-loss tracker with the same slots on every rank before the all-reduce',
    scenario: { ep: 4, experts: 8, layers: 2, routing: 'empty:2', variant: 'layer-metric' },
    expected: 'mismatch',
  }),
  make({
    name: 'zero-row-expert-gemm-never-returns',
    source: 'torchtitan #1118, fixed in PR #1166',
    what: 'a local expert that received no rows runs its backward grouped GEMM with K = 0 and the kernel never returns; the peers wait in bwd.dispatch, which is a stall in compute, not a collective mismatch',
    fix: 'pad every expert to at least one (alignment-sized) row before the grouped GEMM, so no GEMM has K = 0 (torchtitan PR #1166)',
    scenario: { ep: 4, experts: 8, routing: 'starve:1', variant: 'kernel-hang' },
    expected: 'stall',
  }),
  make({
    name: 'expert-grads-gathered-on-the-wrong-group',
    source: 'Megatron-Bridge #1363, fixed in #1380',
    what: "LoRA on the expert fc1/fc2 with expert-tensor-parallel size ≠ tensor-parallel size all-gathers the experts' gradients on a communicator of another parallel dimension, so its EP peers wait in a gather it never joins",
    fix: "take the expert layers' process group from the expert parallel state (the expert-tensor-parallel group), never the dense tensor-parallel one (Megatron-Bridge #1380)",
    scenario: { ep: 4, dp: 2, experts: 8, variant: 'wrong-group' },
    expected: 'missing',
  }),
  make({
    name: 'uneven-batches-per-data-parallel-replica',
    source: 'NVIDIA Model-Optimizer PR #1966; Tutel #173',
    what: 'evaluation batches sharded over the dense data-parallel group leave EP peers with different batch counts, so one EP peer runs a micro-batch the others never start',
    fix: 'shard the batches over the expert-model-parallel layout so every EP peer gets the same count (pad the last batch, or drop the remainder) before the MoE layer runs',
    scenario: { ep: 4, experts: 8, microBatches: 2, variant: 'uneven-batches' },
    expected: 'missing',
  }),
  make({
    name: 'shared-expert-collective-on-a-second-stream',
    source: 'Megatron-LM #1810; vllm-ascend PR #15500',
    what: "the shared expert's all-gather runs on a side stream; it and the routed experts' combine become ready together, and a rank whose shared expert finished first issues them in the other order, so the EP communicator pairs two different collectives",
    fix: 'issue the shared-expert collective at a fixed point of the program order on every rank (wait on its stream before the combine), never gated by which completes first',
    scenario: { ep: 4, experts: 8, variant: 'second-stream', streamOrder: [['shared.all_gather'], ['fwd.combine'], ['fwd.combine'], ['fwd.combine']] },
    expected: 'mismatch',
  }),
  make({
    name: 'aux-loss-keys-differ-across-pipeline-stages',
    source: 'Megatron-LM #1444; NeMo-RL PR #3419; Megatron-LM PR #3401',
    what: 'the aux-loss tracker is all-reduced over the pipeline group once per local key; a stage without MoE layers (or with an MTP layer) holds a different number of keys (15 vs 14), so the stages issue different numbers of all-reduces and the first logging step hangs',
    fix: "all-reduce one fixed-size tensor holding every stage's keys once (the tracker sized by the model's layers on every stage), or agree on the key set across the pipeline group first",
    scenario: { ep: 2, experts: 4, pp: 4, moeLayers: [0, 1, 1, 0], variant: 'stage-metric' },
    expected: 'missing',
  }),
];
