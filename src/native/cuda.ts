// The CUDA expert backend (f32 tensors in and out; 'bf16' rounds inputs and weights to
// bf16 on the device and accumulates in f32) and the device-copy exchange's memory, used
// when several ranks share one GPU (NCCL refuses duplicate GPUs).
import type { Tensor, FloatDType } from '../tensor.js';
import type { ExpertBackend, ExpertBackward, ExpertForward, ExpertWeights } from '../ep/types.js';
import type { ScratchPool } from '../ep/scratch.js';
import { NativeError, NativeExpertBackend, requireNative, type ExpertJob } from './backend.js';

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
      requireNative()[fn](job, this.#precision);
    };
    this.#jobs = new NativeExpertBackend({ sync: true, runForward: run('cudaExpertForward'), runBackward: run('cudaExpertBackward') });
  }

  forward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[], scratch?: ScratchPool): Promise<ExpertForward<F>> {
    return this.#jobs.forward(w, x, rowsPerExpert, scratch);
  }

  backward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[], fwd: ExpertForward<F>, gradY: Tensor<F>, scratch?: ScratchPool): Promise<ExpertBackward<F>> {
    return this.#jobs.backward(w, x, rowsPerExpert, fwd, gradY, scratch);
  }
}

/** Device memory through the addon: allocations and copies, each complete when it returns (the device-copy exchange stages rows in it). */
export interface DeviceMemory {
  alloc(bytes: number): bigint;
  free(pointer: bigint): void;
  upload(pointer: bigint, bytes: Uint8Array): void;
  download(pointer: bigint, out: Uint8Array): void;
  copy(dst: bigint, src: bigint, bytes: number): void;
}

export function deviceMemory(): DeviceMemory {
  const a = requireNative();
  return {
    alloc: (bytes) => a.cudaAlloc(bytes),
    free: (p) => a.cudaFree(p),
    upload: (p, bytes) => a.cudaUpload(p, bytes),
    download: (p, out) => a.cudaDownload(p, out),
    copy: (dst, src, bytes) => a.cudaCopy(dst, src, bytes),
  };
}
