// Worker side of the transport benchmark (kept out of test/bench itself, where every module is
// imported as a benchmark): one rank of an ep group exchanging equal chunks with every peer
// over the PortMesh (or staged in shared memory), as the EP layer's all-to-alls do: either
// bulk f32 rows (fwd.dispatch) or one i64 per peer (fwd.counts).
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { communicators } from '../../../machines/mesh.js';
import { MeshCommunicator, PortMesh } from '../../../actors/transport.js';
import { stagingMemory } from '../../../actors/staging.js';
import { Tensor } from '../../../src/tensor.js';

export interface TransportJob {
  rank: number;
  ep: number;
  /** f32 rows of rowSize per peer, or null for a counts exchange (one i64 per peer). */
  rows: { perPeer: number; rowSize: number } | null;
  iterations: number;
  exchange: 'ports' | 'shared';
  /** Results in shared memory, which peers write straight into (a consumer that takes SharedArrayBuffer-backed arrays). */
  sharedResults?: boolean;
}

const { rank, ep, rows, iterations, exchange, sharedResults } = workerData as TransportJob;

parentPort!.once('message', async (m: { ports: Record<number, MessagePort> }) => {
  const spec = communicators({ ep, dp: 1 })[0]!;
  const mesh = new PortMesh(rank, new Map(Object.entries(m.ports).map(([k, p]) => [Number(k), p])), [spec], (e) => {
    throw new Error(e);
  });
  const comm = new MeshCommunicator(spec, rank, mesh, await stagingMemory(exchange), sharedResults);
  const splits = new Array<number>(ep).fill(rows?.perPeer ?? 1);
  // Real values: a fresh zeroed buffer maps the kernel's zero page, which reads unrealistically fast.
  const send = rows ? Tensor.zeros('f32', [rows.perPeer * ep, rows.rowSize]) : Tensor.from('i64', [ep], splits);
  if (rows) (send.data as Float32Array).fill(rank + 1);
  const tag = { op: rows ? ('fwd.dispatch' as const) : ('fwd.counts' as const), layer: 0, microBatch: 0 };
  // As many exchanges untimed as timed: the JIT has compiled the path by then, as in a run of many steps.
  for (let i = 0; i < Math.max(3, iterations); i++) comm.release(await comm.allToAll(tag, send, splits, splits));
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
