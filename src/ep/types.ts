// The two seams the EP layer is written against: a Communicator (the collectives of one
// process group) and an ExpertBackend (the local expert math). The same layer code runs
// over an in-process group, worker-thread actors, or NCCL; over TypeScript, C++ or CUDA.
//
// Shape legend used in names across src/: T tokens on this rank, K top-k, D model dim,
// H expert hidden dim, E global experts, N local experts (E / ep), R received rows.
import type { DType, FloatDType, Tensor } from '../tensor.js';
import type { ScratchPool } from './scratch.js';

/** Every collective the protocol knows, named as the ledger and the machines name them. */
export type CollectiveOp =
  | 'fwd.counts' // A: one int64 per peer
  | 'fwd.dispatch' // B: token rows to the expert owners
  | 'fwd.expert_ids' // C: global expert id of each dispatched row
  | 'fwd.combine' // D: expert outputs back home
  | 'bwd.combine' // D': grad of the returned rows to the expert owners
  | 'bwd.dispatch' // B': grad of the dispatched rows back home
  | 'fsdp.all_gather'
  | 'fsdp.reduce_scatter'
  | 'metric.all_reduce'
  | 'shared.all_gather' // the shared expert's weights, gathered on a second stream beside the routed experts' exchange
  | 'grad.all_gather' // the experts' (LoRA adapter) gradients, gathered over the expert group at the step's end
  | 'barrier'
  // a collective read from a PyTorch Flight Recorder dump that is none of the above (torch.all_reduce, …)
  | `torch.${string}`;

/** Why a collective is issued: which op, in which layer and micro-batch of the step. */
export interface CollectiveTag {
  readonly op: CollectiveOp;
  readonly layer: number;
  readonly microBatch: number;
}

export interface Communicator {
  /** The mesh dimension this group spans ('ep', 'dp'). */
  readonly name: string;
  readonly rank: number;
  readonly size: number;
  /**
   * Uneven all-to-all along dim 0 (torch's all_to_all_single): sendSplits[j] rows of
   * `send`, in order, go to rank j; the result holds recvSplits[j] rows from each rank j,
   * grouped by source rank 0..size-1. Once it resolves the communicator holds no reference
   * to `send` (NCCL's contract too): the caller may overwrite or reuse its memory.
   */
  allToAll<D extends DType>(
    tag: CollectiveTag,
    send: Tensor<D>,
    sendSplits: readonly number[],
    recvSplits: readonly number[],
  ): Promise<Tensor<D>>;
  /**
   * Optional: the caller is done with a tensor this communicator returned, so its memory
   * may back a later result (fresh multi-MiB buffers per exchange cost page faults and GC).
   * Tensors the communicator did not return are ignored.
   */
  release?(t: Tensor): void;
}

export type Activation = 'silu' | 'gelu' | 'relu';
export const ACTIVATIONS: readonly Activation[] = ['silu', 'gelu', 'relu'];

/** Stacked expert weights stored (in, out): up [N,D,H], gate [N,D,H] (silu only), down [N,H,D]. */
export interface PackedExperts<F extends FloatDType = FloatDType> {
  readonly layout: 'packed';
  readonly activation: Activation;
  readonly up: Tensor<F>;
  readonly gate: Tensor<F> | null;
  readonly down: Tensor<F>;
}

/** One Linear per projection in torch's (out, in) order: up [H,D], gate [H,D], down [D,H]. */
export interface UnpackedExpert<F extends FloatDType = FloatDType> {
  readonly up: Tensor<F>;
  readonly gate: Tensor<F> | null;
  readonly down: Tensor<F>;
}
export interface UnpackedExperts<F extends FloatDType = FloatDType> {
  readonly layout: 'unpacked';
  readonly activation: Activation;
  readonly experts: readonly UnpackedExpert<F>[];
}

export type ExpertWeights<F extends FloatDType = FloatDType> = PackedExperts<F> | UnpackedExperts<F>;

/** What a backend's forward returns: outputs plus whatever its backward needs (opaque). */
export interface ExpertForward<F extends FloatDType = FloatDType> {
  /** The caller's: backward never reads it. */
  readonly y: Tensor<F>;
  readonly saved: unknown;
}

export interface ExpertBackward<F extends FloatDType = FloatDType> {
  readonly gradX: Tensor<F>;
  /** Parameter gradients in the same layout as the weights; zero for experts with no rows. */
  readonly grads: ExpertWeights<F>;
}

export interface ExpertBackend {
  readonly name: string;
  /**
   * Grouped forward: x [R,D] holds rowsPerExpert[0] rows of local expert 0, then
   * rowsPerExpert[1] rows of expert 1, and so on (sum = R; any count may be 0).
   */
  forward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[], scratch?: ScratchPool): ExpertForward<F> | Promise<ExpertForward<F>>;
  /**
   * Backward of the forward call that produced `fwd`, given gradY [R,D]. With `scratch`, the
   * backend may take its outputs (not the parameter gradients) from the pool and give the
   * forward's saved buffers back to it: such a forward is consumed (one backward each).
   */
  backward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[], fwd: ExpertForward<F>, gradY: Tensor<F>, scratch?: ScratchPool): ExpertBackward<F> | Promise<ExpertBackward<F>>;
}
