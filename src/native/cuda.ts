// The CUDA expert backend (f32 tensors in and out; 'bf16' rounds inputs and weights to
// bf16 on the device and accumulates in f32) and the device-copy transport used when
// several ranks share one GPU (NCCL refuses duplicate GPUs).
import type { Tensor, FloatDType } from '../tensor.js';
import type { ExpertBackend, ExpertBackward, ExpertForward, ExpertWeights } from '../ep/types.js';
import { NativeError, NativeExpertBackend, requireNative, type ExpertJob } from './backend.js';

interface CudaAddon {
  cudaExpertForward(job: ExpertJob, precision: 'f32' | 'bf16'): void;
  cudaExpertBackward(job: ExpertJob, precision: 'f32' | 'bf16'): void;
  cudaCopy(dst: bigint, src: bigint, bytes: number): void;
}

/**
 * Reuses the CPU backend's argument checks and job layout, then runs the job on the GPU
 * (synchronously on this thread's stream: each rank is its own worker, so its own stream).
 */
export class CudaExpertBackend implements ExpertBackend {
  readonly name: string;
  readonly #precision: 'f32' | 'bf16';
  readonly #jobs: NativeExpertBackend;

  constructor(precision: 'f32' | 'bf16' = 'f32') {
    this.#precision = precision;
    this.name = `cuda-${precision}`;
    const run = (fn: 'cudaExpertForward' | 'cudaExpertBackward') => (job: ExpertJob) => {
      if (job.dtype !== 'f32') throw new NativeError(`the CUDA backend takes f32 tensors, got ${job.dtype}`, 'BAD_ARGUMENT');
      (requireNative() as unknown as CudaAddon)[fn](job, this.#precision);
    };
    this.#jobs = new NativeExpertBackend({ sync: true, runForward: run('cudaExpertForward'), runBackward: run('cudaExpertBackward') });
  }

  forward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[]): Promise<ExpertForward<F>> {
    return this.#jobs.forward(w, x, rowsPerExpert);
  }

  backward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[], fwd: ExpertForward<F>, gradY: Tensor<F>): Promise<ExpertBackward<F>> {
    return this.#jobs.backward(w, x, rowsPerExpert, fwd, gradY);
  }
}

/**
 * All-to-all among ranks on one GPU by device-to-device copies: rank i's rows for rank j
 * (sendRows[i][j] rows, in order) land in rank j's receive buffer, grouped by source rank.
 * The ranks' buffers are device pointers (bigint) that the rank workers hand the caller.
 */
export function deviceCopyAllToAll(send: readonly bigint[], sendRows: readonly (readonly number[])[], recv: readonly bigint[], rowBytes: number): void {
  const n = send.length;
  if (recv.length !== n || sendRows.length !== n || sendRows.some((r) => r.length !== n))
    throw new NativeError(`device-copy all-to-all needs ${n} send buffers, receive buffers and split rows of ${n}`, 'BAD_ARGUMENT');
  const a = requireNative() as unknown as CudaAddon;
  for (let j = 0; j < n; j++) {
    let recvOff = 0;
    for (let i = 0; i < n; i++) {
      let sendOff = 0;
      for (let k = 0; k < j; k++) sendOff += sendRows[i]![k]!;
      const rows = sendRows[i]![j]!;
      if (rows > 0) a.cudaCopy(recv[j]! + BigInt(recvOff * rowBytes), send[i]! + BigInt(sendOff * rowBytes), rows * rowBytes);
      recvOff += rows;
    }
  }
}
