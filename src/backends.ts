// Expert backends by name, as the CLI and the rank workers choose them: the TypeScript
// kernels, the native C++ kernels, or CUDA through the native addon.
import { UsageError } from './errors.js';
import type { ExpertBackend } from './ep/types.js';
import { tsBackend } from './moe/experts.js';

export const BACKEND_NAMES = ['ts', 'native', 'cuda'] as const;
export type BackendName = (typeof BACKEND_NAMES)[number];

export function parseBackend(value: unknown): BackendName {
  const name = value ?? 'ts';
  if (!(BACKEND_NAMES as readonly unknown[]).includes(name)) throw new UsageError(`--backend must be one of ${BACKEND_NAMES.join(', ')}, got '${String(name)}'`);
  return name as BackendName;
}

/** Load a backend, failing with one clear line when it cannot run here (no addon, no CUDA device). */
export async function loadBackend(name: BackendName): Promise<ExpertBackend> {
  if (name === 'ts') return tsBackend;
  const native = await import('./native/backend.js');
  const addon = native.loadNative();
  if (!addon) throw new UsageError(`the ${name} backend needs the native addon, which is not available: ${native.nativeUnavailableReason()}`);
  if (name === 'native') return native.nativeBackend;
  let devices = 0;
  try {
    devices = addon.cudaInfo().devices;
  } catch (err) {
    throw new UsageError(`the cuda backend cannot run here: ${(err as Error).message}`);
  }
  if (devices === 0) throw new UsageError('the cuda backend cannot run here: no CUDA device');
  const { CudaExpertBackend } = await import('./native/cuda.js');
  return new CudaExpertBackend('f32');
}
