// Entry point of a worker thread hosting one rank, or several in a large run (see
// actors/supervisor.ts): it waits for its links to the other threads from the supervisor,
// gives each hosted rank a connection to each of its peers, and runs every hosted rank
// (actors/rankRun.ts) as its own async task, each reporting to the supervisor.
import { parentPort, workerData, type MessagePort } from 'node:worker_threads';
import { communicators } from '../machines/mesh.js';
import { runRank } from './rankRun.js';
import type { PeerPort } from './transport.js';
import { threadOfRank, type LinkMessage, type SupervisorMessage, type ThreadJob, type WorkerMessage } from './messages.js';

const job = workerData as ThreadJob;
const post = (msg: WorkerMessage) => parentPort!.postMessage(msg);

parentPort!.once('message', (m: SupervisorMessage) => {
  const ports = connect(job, m.links);
  // A rank that blocks the thread (waiting for the fast lane, running its kernels) would stall its other ranks.
  const ownsThread = job.ranks.length === 1;
  // The thread lives while a rank runs: one that awaits forever (a stall) with nothing else
  // pending must not end it, as a hung rank's thread would not end.
  const alive = setInterval(() => {}, 2 ** 30);
  let running = job.ranks.length;
  for (const r of job.ranks) {
    void runRank({ ...r, scenario: job.scenario }, ports.get(r.rank)!, post, ownsThread).then(
      () => {
        if (--running === 0) clearInterval(alive);
      },
      // An exception ends the thread with an 'error' event naming its rank: the supervisor's crash verdict.
      (err: unknown) => {
        setImmediate(() => {
          throw Object.assign(err instanceof Error ? err : new Error(String(err)), { rank: r.rank });
        });
      },
    );
  }
});

/** Per hosted rank, its connection to each peer it shares a communicator with. */
function connect({ scenario, ranks, ranksPerThread }: ThreadJob, links: Record<number, MessagePort>): Map<number, Map<number, PeerPort>> {
  const hosted = new Set(ranks.map((r) => r.rank));
  const ports = new Map([...hosted].map((r) => [r, new Map<number, PeerPort>()]));
  /** Per link, its addressed endpoints by (to, from). */
  const endpoints = new Map<MessagePort, Map<string, Endpoint>>();
  for (const c of communicators(scenario)) {
    for (const a of c.members) {
      if (!hosted.has(a)) continue;
      for (const b of c.members) {
        if (a === b || ports.get(a)!.has(b)) continue;
        if (hosted.has(b)) {
          const pa: Endpoint = new Endpoint((m) => handOver(pb, m));
          const pb: Endpoint = new Endpoint((m) => handOver(pa, m));
          ports.get(a)!.set(b, pa);
          ports.get(b)!.set(a, pb);
          continue;
        }
        const link = links[threadOfRank(b, ranksPerThread)];
        if (!link) throw new Error(`rank ${a}'s thread has no link to rank ${b}'s`);
        // Between threads of one rank each, the link carries this pair only: it is the port itself.
        if (ranksPerThread === 1) {
          ports.get(a)!.set(b, link);
          continue;
        }
        const end = new Endpoint((m, transfer) => link.postMessage({ from: a, to: b, m } satisfies LinkMessage, transfer), true);
        if (!endpoints.has(link)) {
          const byPair = new Map<string, Endpoint>();
          endpoints.set(link, byPair);
          link.on('message', (msg: LinkMessage) => byPair.get(`${msg.to}|${msg.from}`)?.deliver(msg.m));
        }
        endpoints.get(link)!.set(`${a}|${b}`, end);
        ports.get(a)!.set(b, end);
      }
    }
  }
  return ports;
}

/** Messages between ranks of this thread not yet delivered, in order: one turn of the event loop delivers them all. */
let handOvers: { to: Endpoint; message: unknown }[] = [];

/** Delivers on a later turn, as a MessagePort would (one Immediate for many messages: a large run sends n² per exchange). */
function handOver(to: Endpoint, message: unknown): void {
  if (handOvers.length === 0) {
    setImmediate(() => {
      const due = handOvers;
      handOvers = [];
      for (const h of due) h.to.deliver(h.message);
    });
  }
  handOvers.push({ to, message });
}

/**
 * A rank's end of its connection to one peer, when that is not a MessagePort of its own: the
 * peer runs in this thread (messages handed over on a later turn, in order, as a port does),
 * or in another thread, addressed over the link between the two threads.
 */
class Endpoint implements PeerPort {
  private listener: ((message: unknown) => void) | null = null;
  /** Messages that came before the rank listened. */
  private early: unknown[] = [];

  constructor(
    private readonly send: (message: unknown, transfer?: ArrayBuffer[]) => void,
    readonly betweenThreads = false,
  ) {}

  postMessage(message: unknown, transfer?: ArrayBuffer[]): void {
    this.send(message, transfer);
  }

  on(_event: 'message', listener: (message: unknown) => void): this {
    this.listener = listener;
    for (const m of this.early.splice(0)) listener(m);
    return this;
  }

  deliver(message: unknown): void {
    if (this.listener) this.listener(message);
    else this.early.push(message);
  }
}
