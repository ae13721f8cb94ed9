// The CUDA expert backend (f32 tensors in and out; 'bf16' rounds inputs and weights to
// bf16 on the device and accumulates in f32) and the device-copy exchange's memory, used
// when several ranks share one GPU (NCCL refuses duplicate GPUs).
import type { Tensor, FloatDType } from '../tensor.js';
import type { ExpertBackend, ExpertBackward, ExpertForward, ExpertWeights } from '../ep/types.js';
import { NativeError, NativeExpertBackend, requireNative, type ExpertJob } from './backend.js';
import type { StagedHandle, StagingMemory } from '../staging.js';

interface CudaAddon {
  cudaExpertForward(job: ExpertJob, precision: 'f32' | 'bf16'): void;
  cudaExpertBackward(job: ExpertJob, precision: 'f32' | 'bf16'): void;
  cudaCopy(dst: bigint, src: bigint, bytes: number): void;
  cudaAlloc(bytes: number): bigint;
  cudaFree(p: bigint): void;
  cudaUpload(p: bigint, data: ArrayBufferView): void;
  cudaDownload(p: bigint, data: ArrayBufferView): void;
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
 * The device-copy exchange's memory (actors/staging.ts): a rank stages its send rows in
 * device memory; a receiver copies its pieces device-to-device into one receive buffer and
 * downloads that into its result. Device pointers are valid in every worker thread of the
 * process (one CUDA context per device), and every call here completes before it returns,
 * so a peer's acknowledgement means its copies are finished.
 */
export function deviceCopyMemory(): StagingMemory {
  const a = requireNative() as unknown as CudaAddon;
  const pointer = (h: StagedHandle): bigint => {
    if (typeof h !== 'bigint') throw new NativeError('the device-copy exchange got a region that is not a device pointer', 'BAD_ARGUMENT');
    return h;
  };
  return {
    name: 'device-copy',
    stage(bytes) {
      const p = a.cudaAlloc(bytes.byteLength);
      try {
        if (bytes.byteLength > 0) a.cudaUpload(p, bytes);
      } catch (err) {
        a.cudaFree(p);
        throw err;
      }
      return p;
    },
    gather(out, pieces) {
      const recv = a.cudaAlloc(out.byteLength);
      try {
        let at = 0;
        for (const piece of pieces) {
          const bytes = 'local' in piece ? piece.local.byteLength : piece.bytes;
          if (bytes > 0) {
            if ('local' in piece) a.cudaUpload(recv + BigInt(at), piece.local);
            else a.cudaCopy(recv + BigInt(at), pointer(piece.handle) + BigInt(piece.offset), bytes);
          }
          at += bytes;
        }
        if (out.byteLength > 0) a.cudaDownload(recv, out);
      } finally {
        a.cudaFree(recv);
      }
    },
    unstage: (h) => a.cudaFree(pointer(h)),
    isHandle: (v): v is bigint => typeof v === 'bigint',
  };
}
