// Expert backends and exchanges by name, as the CLI and the rank workers choose them: the
// TypeScript kernels, the native C++ kernels, or CUDA through the native addon; all-to-all
// data over MessagePorts, host shared memory, one GPU's memory, or NCCL.
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

export const EXCHANGE_NAMES = ['ports', 'shared', 'device-copy', 'nccl'] as const;
/**
 * How rank workers move all-to-all data: msgpack chunks over MessagePorts (the default),
 * staged in host shared memory, staged in one GPU's memory with device-to-device copies
 * (several ranks on one GPU), or NCCL (one GPU per rank of an ep group).
 */
export type ExchangeName = (typeof EXCHANGE_NAMES)[number];

export function parseExchange(value: unknown): ExchangeName {
  const name = value ?? 'ports';
  if (!(EXCHANGE_NAMES as readonly unknown[]).includes(name)) throw new UsageError(`--exchange must be one of ${EXCHANGE_NAMES.join(', ')}, got '${String(name)}'`);
  return name as ExchangeName;
}

/** Where rank workers run their GPU work: the device per rank, and one NCCL unique id per ep communicator. */
export interface GpuPlacement {
  readonly devices: readonly number[];
  readonly ncclIds: Readonly<Record<string, Uint8Array>>;
}

/**
 * The GPU placement for `ranks` ranks (null when neither the kernels
 * nor the exchange use a GPU), failing with one clear line when the exchange cannot run
 * here. device-copy keeps every rank on device 0; nccl and cuda kernels over another
 * exchange put rank r on device r mod (devices).
 */
export async function gpuPlacement(backend: BackendName, exchange: ExchangeName, ranks: number, epCommunicators: readonly string[]): Promise<GpuPlacement | null> {
  const gpuExchange = exchange === 'device-copy' || exchange === 'nccl';
  if (backend !== 'cuda' && !gpuExchange) return null;
  const { addon, count } = await cudaDevices(gpuExchange ? `the ${exchange} exchange` : 'the cuda backend');
  const ncclIds: Record<string, Uint8Array> = {};
  if (exchange === 'nccl') {
    // One GPU per rank: NCCL refuses duplicate GPUs within a communicator, and communicators of
    // different ep groups driven from different threads on one GPU can deadlock each other.
    if (ranks > count) throw new UsageError(`the nccl exchange needs one GPU per rank (NCCL refuses duplicate GPUs): ${ranks} rank${ranks === 1 ? '' : 's'} but ${count} CUDA device${count === 1 ? '' : 's'}; --exchange device-copy runs several ranks on one GPU`);
    try {
      for (const id of epCommunicators) ncclIds[id] = (addon.ncclGetUniqueId as () => Uint8Array)();
    } catch (err) {
      throw new UsageError(`the nccl exchange cannot run here: ${(err as Error).message}`);
    }
  }
  return { devices: Array.from({ length: ranks }, (_, r) => (exchange === 'device-copy' ? 0 : r % count)), ncclIds };
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

/** Load a backend, failing with one clear line when it cannot run here (no addon, no CUDA device). */
export async function loadBackend(name: BackendName): Promise<ExpertBackend> {
  if (name === 'ts') return tsBackend;
  if (name === 'cuda') {
    await cudaDevices('the cuda backend');
    const { CudaExpertBackend } = await import('./native/cuda.js');
    return new CudaExpertBackend('f32');
  }
  const native = await import('./native/backend.js');
  if (!native.loadNative()) throw new UsageError(`the native backend needs the native addon, which is not available: ${native.nativeUnavailableReason()}`);
  return native.nativeBackend;
}
