// Expert backends by name, as the CLI and the rank workers choose them: the TypeScript
// kernels, the native C++ kernels, or CUDA through the native addon.
import { UsageError } from './errors.js';
import type { ExpertBackend } from './ep/types.js';
import { tsBackend } from './moe/experts.js';
import type { NativeAddon } from './native/backend.js';

export const BACKEND_NAMES = ['ts', 'native', 'cuda'] as const;
export type BackendName = (typeof BACKEND_NAMES)[number];

export function parseBackend(value: unknown): BackendName {
  const name = value ?? 'ts';
  if (!(BACKEND_NAMES as readonly unknown[]).includes(name)) throw new UsageError(`--backend must be one of ${BACKEND_NAMES.join(', ')}, got '${String(name)}'`);
  return name as BackendName;
}

/**
 * The backend `--backend` names or, when none is named, the native kernels where the addon
 * loads (much faster than ts); otherwise ts, with the reason to tell the user.
 */
export async function chooseBackend(value: unknown): Promise<{ name: BackendName; fallback?: string }> {
  if (value !== undefined) return { name: parseBackend(value) };
  const native = await import('./native/backend.js');
  if (native.loadNative()) return { name: 'native' };
  return { name: 'ts', fallback: `using the TypeScript kernels: the native addon is not available (${native.nativeUnavailableReason()})` };
}

/** The addon and its CUDA device count, or one clear line saying why `what` cannot run here. */
export async function cudaDevices(what: string): Promise<{ addon: NativeAddon; count: number }> {
  const native = await import('./native/backend.js');
  const addon = native.loadNative();
  if (!addon) throw new UsageError(`${what} needs the native addon, which is not available: ${native.nativeUnavailableReason()}`);
  let count = 0;
  try {
    count = addon.cudaInfo().devices;
  } catch (err) {
    throw new UsageError(`${what} cannot run here: ${(err as Error).message}`);
  }
  if (count === 0) throw new UsageError(`${what} cannot run here: no CUDA device`);
  return { addon, count };
}

/**
 * Load a backend, failing with one clear line when it cannot run here (no addon, no CUDA
 * device). onCallingThread: the native CPU kernels run on the calling thread rather than
 * libuv's pool, for a caller that has nothing else to do meanwhile.
 */
export async function loadBackend(name: BackendName, opts: { onCallingThread?: boolean } = {}): Promise<ExpertBackend> {
  if (name === 'ts') return tsBackend;
  if (name === 'cuda') {
    await cudaDevices('the cuda backend');
    const { CudaExpertBackend } = await import('./native/cuda.js');
    return new CudaExpertBackend('f32');
  }
  const native = await import('./native/backend.js');
  if (!native.loadNative()) throw new UsageError(`the native backend needs the native addon, which is not available: ${native.nativeUnavailableReason()}`);
  return opts.onCallingThread ? native.nativeBackendOnCaller : native.nativeBackend;
}
