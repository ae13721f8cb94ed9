// Worker side of the all-to-all's copy floor: one of `ep` threads that do nothing but the
// copies an all-to-all cannot avoid, each byte once. Every round, rank r copies chunk j of its
// send rows into result j at r's place, its own chunk included (NCCL and gloo copy it too),
// between two barriers on shared memory, so the rounds of all ranks overlap as an exchange's do.
import { parentPort, workerData } from 'node:worker_threads';

export interface CopyFloorJob {
  rank: number;
  ep: number;
  /** f32 elements per chunk (one chunk per peer). */
  chunk: number;
  /** Each rank's result, shared: ep chunks, chunk j from rank j. */
  results: SharedArrayBuffer[];
  /** Two Int32 cells: arrivals, and the generation that released the last barrier. */
  barrier: SharedArrayBuffer;
  iterations: number;
}

const { rank, ep, chunk, results, barrier, iterations } = workerData as CopyFloorJob;
const cells = new Int32Array(barrier);
let generation = 0;

function arriveAndWait(): void {
  generation++;
  if (Atomics.add(cells, 0, 1) + 1 === ep * generation) {
    Atomics.store(cells, 1, generation);
    Atomics.notify(cells, 1);
    return;
  }
  // Bounded: a peer that died leaves this worker to the parent's terminate, not a hang.
  for (let waited = 0; Atomics.load(cells, 1) < generation; waited++) {
    if (waited > 10_000) throw new Error(`copy floor: rank ${rank} waited 10 s at barrier ${generation}`);
    Atomics.wait(cells, 1, generation - 1, 1);
  }
}

const send = new Float32Array(ep * chunk).fill(rank + 1); // written: fresh zero pages would read unrealistically fast
const into = results.map((r) => new Float32Array(r));
const samples: number[] = [];
// As many rounds untimed as timed, as the exchange rows do.
for (let i = 0; i < 2 * iterations; i++) {
  arriveAndWait();
  const t0 = performance.now();
  for (let k = 0; k < ep; k++) {
    const j = (rank + k) % ep; // staggered, as the exchange sends to peers
    into[j]!.set(send.subarray(j * chunk, (j + 1) * chunk), rank * chunk);
  }
  arriveAndWait();
  if (i >= iterations) samples.push(performance.now() - t0);
}
parentPort!.postMessage(samples);
