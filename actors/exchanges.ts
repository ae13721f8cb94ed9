// Exchanges by name, as the CLI chooses them for worker ranks: all-to-all data over
// MessagePorts, host shared memory, one GPU's memory, or NCCL; and where on the GPUs the
// ranks then run.
import { UsageError } from '../src/errors.js';
import { cudaDevices, type BackendName } from '../src/backends.js';

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
      for (const id of epCommunicators) ncclIds[id] = addon.ncclGetUniqueId();
    } catch (err) {
      throw new UsageError(`the nccl exchange cannot run here: ${(err as Error).message}`);
    }
  }
  return { devices: Array.from({ length: ranks }, (_, r) => (exchange === 'device-copy' ? 0 : r % count)), ncclIds };
}
