// Entry point of one rank's worker thread: it waits for its MessagePorts from the
// supervisor, then runs its rank (actors/rankRun.ts), reporting to the supervisor.
import { parentPort, workerData } from 'node:worker_threads';
import { runRank } from './rankRun.js';
import type { SupervisorMessage, WorkerJob, WorkerMessage } from './messages.js';

parentPort!.once('message', (m: SupervisorMessage) => {
  const ports = new Map(Object.entries(m.ports).map(([k, p]) => [Number(k), p]));
  // An exception here ends the worker with an 'error' event: the supervisor's crash verdict.
  void runRank(workerData as WorkerJob, ports, (msg: WorkerMessage) => parentPort!.postMessage(msg)).catch((err: unknown) => {
    setImmediate(() => {
      throw err;
    });
  });
});
