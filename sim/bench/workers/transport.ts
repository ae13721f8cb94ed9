// Worker side of the transport benchmark (kept out of sim/bench itself, where every module is
// imported as a benchmark): one rank of a 4-rank ep group exchanging equal
// chunks with every peer over the PortMesh (or staged in shared memory), as the EP layer's all-to-alls do.
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { communicators } from '../../../machines/mesh.js';
import { MeshCommunicator, PortMesh } from '../../../actors/transport.js';
import { stagingMemory } from '../../../actors/staging.js';
import { Tensor } from '../../../src/tensor.js';

const { rank, ep, rowsPerPeer, rowSize, iterations, exchange } = workerData as { rank: number; ep: number; rowsPerPeer: number; rowSize: number; iterations: number; exchange: 'ports' | 'shared' };

parentPort!.once('message', async (m: { ports: Record<number, MessagePort> }) => {
  const spec = communicators({ ep, dp: 1 })[0]!;
  const mesh = new PortMesh(rank, new Map(Object.entries(m.ports).map(([k, p]) => [Number(k), p])), [spec], (e) => {
    throw new Error(e);
  });
  const comm = new MeshCommunicator(spec, rank, mesh, await stagingMemory(exchange));
  const splits = new Array<number>(ep).fill(rowsPerPeer);
  const send = Tensor.zeros('f32', [rowsPerPeer * ep, rowSize]);
  const tag = { op: 'fwd.dispatch' as const, layer: 0, microBatch: 0 };
  comm.release(await comm.allToAll(tag, send, splits, splits)); // warm-up
  const samples: number[] = [];
  for (let i = 0; i < iterations; i++) {
    const t0 = performance.now();
    const got = await comm.allToAll(tag, send, splits, splits);
    samples.push(performance.now() - t0);
    comm.release(got); // the consumer is done with it, as the EP layer releases what it copied out
  }
  parentPort!.postMessage(samples);
  for (const p of Object.values(m.ports)) p.close();
});
