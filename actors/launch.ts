// One rank in this process, placed by a launcher (torchrun, srun): it meets the other
// ranks through the rendezvous, connects to each over TCP (or joins an NCCL communicator
// for the EP layer's all-to-alls), and runs its rank of a case or a scenario under its rank machine
// (actors/rankRun.ts), exactly as a worker rank does. With no supervisor to hold the
// ledger, every rank holds it: each tells every peer the collectives it issues and when it
// computes again, and feeds its own and its peers' reports to the ledger feed every engine
// keeps. A rank waiting in a collective stops once the run is quiescent (every rank blocked
// in the ledger, finished, or held for good), so every hung communicator is reached, as on
// the engine; a compute that does not return within the compute limit is a stall (that rank
// stops and its peers count it as held); a connection that closes without a goodbye is a
// crashed peer; a collective whose data never arrives is a timeout.
// A rank that stops (on what it saw, on a peer's stop, or on SIGTERM) drops its own work,
// tells every peer why in its goodbye, and ends once its connections have closed.
import { createServer } from 'node:net';
import type { CaseData, RankResult } from '../src/case.js';
import { cudaDevices, type BackendName } from '../src/backends.js';
import { UsageError } from '../src/errors.js';
import type { IssuedCollective } from '../machines/snapshot.js';
import { casePayloads, rankResult } from './caseRanks.js';
import { now, type Fault, type WorkerJob, type WorkerMessage } from './messages.js';
import { type Scenario } from '../machines/scenario.js';
import { freePort, rendezvous, type LaunchEnv, type Rendezvous } from './rendezvous.js';
import { runRank } from './rankRun.js';
import { acceptEarly, socketMesh, type Goodbye, type PeerReport } from './socketPort.js';
import { LedgerFeed, type RankReport } from '../machines/feed.js';
import { runIdentity, type RefusedConnection, type RunIdentity } from './runIdentity.js';
import { RANK_RECORD_VERSION, STALL, type RankRecord } from './rankRecord.js';
import { generatedIndices, rankRouting } from '../machines/routing.js';
import { commOf, communicators, ppOf, worldSize, type CommKind } from '../machines/mesh.js';
import { toIndexArray, type FloatDType } from '../src/tensor.js';
import { DEFAULT_COMPUTE_TIMEOUT_MS } from './supervisor.js';
import { compileOnFirstCall } from './jit.js';

/** The run stopped because the ranks diverged, a peer crashed or nothing moved: exit code 2. */
export class LaunchedRankError extends Error {
  override name = 'LaunchedRankError';
  constructor(
    message: string,
    /** When a peer's stop stopped this rank: the rank that stopped first and its reason, passed on in this rank's goodbye. */
    readonly origin?: { readonly rank: number; readonly reason: string },
  ) {
    super(message);
  }
}

/** The rank was told to stop (SIGTERM, SIGINT) and told its peers: an error, exit code 1. */
export class TerminatedRankError extends Error {
  override name = 'TerminatedRankError';
}

export interface LaunchOptions<F extends FloatDType> {
  /** What the ranks run: the protocol, the layout, and (without `data`) the generated inputs. */
  readonly scenario: Scenario;
  /** A case's inputs, when the ranks compute on a case (its scenario from caseScenario()). */
  readonly data?: CaseData<F>;
  readonly env: LaunchEnv;
  /** Which job this rank is of: every connection's hello carries it (default: no run id, rank 0 makes one up; no secret). */
  readonly identity?: RunIdentity;
  /** tcp: msgpack chunks over a TCP connection per pair; nccl: the EP layer's all-to-alls over NCCL. */
  readonly exchange: 'tcp' | 'nccl';
  readonly backend: BackendName;
  /**
   * The collective limit (ms): a collective every member issued whose data has not arrived
   * this long, or a wait with no report from any rank this long past the compute limit (by
   * then a peer that computes would have reported its own stall), stops the rank with a
   * timeout; the rendezvous and the connections give up after it too.
   */
  readonly timeoutMs: number;
  /** A compute of this rank (routing, expert forward or backward) that has not returned for this long: a stall (ms; default 10 min). */
  readonly computeTimeoutMs?: number;
  /** Aborted (its reason the signal's name, say): the rank stops, tells its peers, and rejects with a TerminatedRankError. */
  readonly signal?: AbortSignal;
  /** Hears each connection the hello refused, as it happens (it is in the record too). */
  readonly refused?: (r: RefusedConnection) => void;
  /** Hears the run id once this rank is connected to every peer. */
  readonly connected?: (runId: string) => void;
  /** Injected faults, for tests of what a rank reports. */
  readonly faults?: readonly Fault[];
  /** Training steps back to back (default 1); the results are the last step's. */
  readonly steps?: number;
  /** Receives this rank's record when it ends, finished or stopped (for `viz report --ranks`). */
  readonly keep?: (record: RankRecord) => void;
}

export interface LaunchedRankResult<F extends FloatDType> {
  /** The rank's outputs and gradients, for a case run. */
  readonly result: RankResult<F> | null;
  /** This rank's wall time per step (ms). */
  readonly stepMs: readonly number[];
}

export async function runLaunchedRank<F extends FloatDType>(o: LaunchOptions<F>): Promise<LaunchedRankResult<F>> {
  compileOnFirstCall();
  const { env, scenario } = o;
  const ranks = worldSize(scenario);
  if (ranks !== env.worldSize) {
    const what = o.data ? `the case has ep=${scenario.ep}` : `the scenario has ${ranks} ranks (${ppOf(scenario) > 1 ? `pp ${ppOf(scenario)} × ` : ''}dp ${scenario.dp} × ep ${scenario.ep})`;
    throw new UsageError(`${what} but WORLD_SIZE is ${env.worldSize}: launch one process per rank`);
  }
  const gpu = o.exchange === 'nccl' || o.backend === 'cuda' ? await gpuOf(env, o.exchange) : null;
  const identity = o.identity ?? runIdentity({}, {});
  const refusals: NonNullable<RankRecord['refused']>[number][] = [];
  const refused = (r: RefusedConnection) => {
    refusals.push({ at: now(), from: r.from, line: r.line });
    o.refused?.(r);
  };
  const server = createServer();
  const listening = acceptEarly(server);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(new UsageError(`rank ${env.rank} cannot open its data port: ${err.message}`)));
    server.listen(0, () => resolve());
  });
  try {
    const rdv = rendezvous(env, (server.address() as { port: number }).port, { timeoutMs: o.timeoutMs, identity, newId: gpu?.newId, refused });
    const met = await (o.signal ? Promise.race([rdv, terminated(o.signal)]) : rdv);
    return await runConnected(o, identity.secret, listening, met, gpu?.device, { refusals, refused });
  } finally {
    if (server.listening) server.close();
  }
}

/** Rejects with a TerminatedRankError once `signal` aborts. */
function terminated(signal: AbortSignal): Promise<never> {
  return new Promise((_, reject) => {
    const stop = () => reject(new TerminatedRankError(`terminated by ${String(signal.reason)}`));
    if (signal.aborted) stop();
    else signal.addEventListener('abort', stop, { once: true });
  });
}

async function gpuOf(env: LaunchEnv, exchange: 'tcp' | 'nccl'): Promise<{ device: number; newId?: () => Uint8Array }> {
  const { addon, count } = await cudaDevices(exchange === 'nccl' ? 'the nccl exchange' : 'the cuda backend');
  // LOCAL_RANK picks the GPU, as torchrun intends; NCCL refuses two ranks on one GPU itself.
  return { device: env.localRank % count, newId: exchange === 'nccl' && env.rank === 0 ? () => addon.ncclGetUniqueId() : undefined };
}

function runConnected<F extends FloatDType>(
  o: LaunchOptions<F>,
  secret: Buffer | null,
  listening: ReturnType<typeof acceptEarly>,
  met: Rendezvous,
  device: number | undefined,
  refusing: { readonly refusals: NonNullable<RankRecord['refused']>; refused(r: RefusedConnection): void },
): Promise<LaunchedRankResult<F>> {
  const { rank } = o.env;
  const n = o.env.worldSize;
  const mesh = o.scenario;
  const membersOf = (kind: CommKind) => communicators(mesh).find((c) => c.id === commOf(mesh, rank, kind))?.members ?? [];
  /** Collectives issued so far per communicator kind, and the one this rank waits in. */
  const issued: Record<string, number> = {};
  let waiting: Waiting | null = null;
  /** Peers that finished their step, with what they issued. */
  const finishedPeers = new Map<number, Goodbye['issued']>();
  /** Peers that stopped where they are held for good (a hung run's collective, a stalled compute), with why: they will report nothing more. */
  const heldPeers = new Map<number, string>();
  /** Peers that stopped on an error or went away: the error that stops a rank waiting on them. */
  const brokenPeers = new Map<number, () => LaunchedRankError>();
  /** Peers whose last word is that they compute (every step begins with routing). */
  const computingPeers = new Set(Array.from({ length: n }, (_, r) => r).filter((r) => r !== rank));
  let fail: (err: Error, held?: boolean) => void = () => {};

  const describe = (w: Waiting) => `${w.c.op} (layer ${w.c.layer}, ${w.c.comm} position ${w.position})`;
  /** A member of the communicator this rank waits in that stopped on an error or went away: this rank stops on its word at once. */
  const brokenMember = (w: Waiting) => {
    for (const [peer, error] of brokenPeers) if (membersOf(w.c.comm).includes(peer)) return fail(error());
  };
  const job: WorkerJob = {
    rank, scenario: o.scenario, casePayload: o.data ? casePayloads(o.data)[rank] : undefined, backend: o.backend,
    exchange: o.exchange === 'nccl' ? 'nccl' : 'ports', device, ncclId: met.id ?? undefined, faults: o.faults ?? [], inspect: false, steps: o.steps ?? 1, record: !!o.keep,
  };
  return new Promise<LaunchedRankResult<F>>((resolve, reject) => {
    let settled = false;
    let ports: Map<number, { goodbye(g: Goodbye): Promise<void>; report(r: PeerReport): void }> = new Map();
    const computeTimeoutMs = o.computeTimeoutMs ?? DEFAULT_COMPUTE_TIMEOUT_MS;
    /** What this rank computes now (set when a collective completes), for a stall. */
    let computing = 'routing layer 0';
    /** The compute limit while this rank computes; while it waits, the collective limit. */
    let watchdog: NodeJS.Timeout | undefined;
    /** What the data of this rank's collective brought instead of the collective (the ledger usually proves why). */
    let badMessage: string | null = null;
    const computeLimit = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => fail(new LaunchedRankError(`${STALL}rank ${rank} has not returned from ${computing} for ${computeTimeoutMs} ms (compute limit)`), true), computeTimeoutMs);
    };
    // Waiting while the ledger has this rank blocked: a member that computes reports within
    // its compute limit, so only silence past that and the collective limit is a timeout.
    const blockedLimit = (w: Waiting) => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => fail(new LaunchedRankError(`timeout: rank ${rank} waits in ${describe(w)} and no rank has reported anything for ${computeTimeoutMs + o.timeoutMs} ms (compute limit + collective limit)${badMessage ? `; ${badMessage}` : ''}`)), computeTimeoutMs + o.timeoutMs);
    };
    const waitLimit = (w: Waiting) => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => fail(new LaunchedRankError(`timeout: rank ${rank} waits in ${describe(w)}: every member issued it, but its data has not arrived for ${o.timeoutMs} ms (collective limit)${badMessage ? `; ${badMessage}` : ''}`)), o.timeoutMs);
    };
    // The whole run's ledger, fed with this rank's reports and its peers' as the supervisor's
    // is with its workers': at quiescence its hangs are the run's, whichever rank looks.
    const feed = new LedgerFeed(mesh, {
      completed: (entries) => {
        // Every member issued the collective this rank waits in: now only its data is awaited.
        if (waiting && entries.some((e) => e.rank === rank && e.comm === waiting!.c.comm && e.position === waiting!.position)) waitLimit(waiting);
      },
    }, false);
    const tracker = feed.tracker;

    /** Why this rank, held in `w` at quiescence, stops: a stalled peer, a member that finished without the collective, or the hang the ledger names. */
    const heldReason = (w: Waiting): string => {
      const members = membersOf(w.c.comm);
      const stalled = [...heldPeers].filter(([, why]) => why.startsWith(STALL));
      const stall = stalled.find(([p]) => members.includes(p)) ?? stalled[0];
      if (stall) return `rank ${stall[0]} stopped: ${stall[1]}`;
      for (const [peer, its] of finishedPeers) {
        if (members.includes(peer) && (its[w.c.comm] ?? 0) <= w.position) {
          return `missing collective: rank ${rank} waits in ${describe(w)} but rank ${peer} finished its step after issuing ${its[w.c.comm] ?? 0} collective(s) on ${w.c.comm}; under NCCL both would hang until the watchdog`;
        }
      }
      const mine = tracker.blockedOn(rank);
      const hangs = tracker.hangs();
      const h = hangs.find((x) => x.communicator === mine?.communicator && x.position === mine.position) ?? hangs[0];
      return h ? `${h.kind}: rank ${rank} waits in ${describe(w)}; ${h.communicator} position ${h.position}: ${h.detail}` : `rank ${rank} waits in ${describe(w)} and no rank can move`;
    };
    /** News from a peer: a rank the ledger has blocked waits again for the next. */
    const heard = () => {
      if (waiting && tracker.blockedOn(rank)) blockedLimit(waiting);
    };
    /** At quiescence (every rank blocked in the ledger, finished, or held for good) nothing can move any more: this rank, waiting, stops there. */
    const settle = () => {
      if (settled || !waiting) return;
      const gone = new Set(heldPeers.keys());
      if (feed.settled(n, gone, () => computingPeers.size === 0)) fail(new LaunchedRankError(heldReason(waiting)), true);
    };
    const follow = (report: RankReport) => {
      try {
        feed.push(report);
      } catch (err) {
        return fail(new LaunchedRankError(`rank ${report.rank} reported what its ledger cannot hold: ${(err as Error).message}`));
      }
      settle();
    };
    const messages: WorkerMessage[] = [];
    const keep = (stopped?: string) =>
      o.keep?.({
        epActorsRankRecord: RANK_RECORD_VERSION, rank, scenario: o.scenario, ...routingOfRank(o, rank), messages,
        ...(stopped === undefined ? {} : { stopped, stoppedAt: now() }),
        ...(refusing.refusals.length ? { refused: refusing.refusals } : {}),
      });
    /** What this rank said when its run ended: peers connected after that hear it too. */
    let farewell: Goodbye | null = null;
    /** The run is over for this rank: say goodbye to every peer, and settle once the connections have closed. */
    const end = (goodbye: Goodbye, settle: () => void) => {
      settled = true;
      farewell = goodbye;
      clearTimeout(watchdog);
      void Promise.all([...ports.values()].map((p) => p.goodbye(goodbye))).then(settle);
    };
    fail = (err, held = false) => {
      if (settled) return;
      keep(err.message);
      // Peers hear why the run stopped and which rank stopped it first, so they report the cause rather than a lost connection.
      const origin = err instanceof LaunchedRankError && err.origin ? err.origin : { rank, reason: err.message };
      end({ issued, stopped: origin.reason, stoppedBy: origin.rank, ...(held ? { held } : {}) }, () => reject(err));
    };
    if (o.signal) terminated(o.signal).catch((err: Error) => fail(err));
    let result: Uint8Array | undefined;
    const stepMs: number[] = [];
    const post = (m: WorkerMessage) => {
      if (settled) return; // a stopped rank's layer may still be finishing a compute: what it reports no longer counts
      if (m.type === 'issue' || m.type === 'completed' || m.type === 'paths') messages.push(m);
      // The record says how the rank finished; the case's numbers go to their own file (as
      // JSON, a result's bytes were a key per byte: seconds of CPU and tens of MB per rank).
      else if (m.type === 'finished') messages.push({ ...m, result: undefined });
      switch (m.type) {
        case 'issue': {
          ports.forEach((p) => p.report({ kind: 'issue', collective: m.collective, dtype: m.dtype }));
          const position = issued[m.collective.comm] ?? 0;
          issued[m.collective.comm] = position + 1;
          waiting = { c: m.collective, position };
          blockedLimit(waiting);
          brokenMember(waiting);
          return follow({ kind: 'issue', rank, collective: m.collective, dtype: m.dtype, at: m.at });
        }
        case 'completed':
          ports.forEach((p) => p.report({ kind: 'computing' }));
          waiting = null;
          badMessage = null;
          computing = m.next;
          return computeLimit();
        case 'violation':
          return fail(new LaunchedRankError(`protocol violation: ${m.message}`));
        case 'transport-error':
          // The collective stays waiting, as under NCCL: the ledger proves the divergence at quiescence.
          badMessage ??= `bad message between ranks: ${m.message}`;
          return;
        case 'step':
          stepMs[m.step] = m.ms; // positions keep counting across steps, as a communicator's do
          return;
        case 'finished':
          result = m.result;
          return;
        default:
          return;
      }
    };
    const broken = (peer: number, error: () => LaunchedRankError) => {
      computingPeers.delete(peer);
      brokenPeers.set(peer, error);
      if (waiting) brokenMember(waiting);
    };
    socketMesh({ run: met.runId, rank, world: n }, secret, met.peers, listening, {
      broken: (peer, reason) => broken(peer, () => new LaunchedRankError(`rank ${peer} went away before finishing its step (${reason}): it crashed or was killed${waiting ? `; rank ${rank} waits in ${describe(waiting)}` : ''}`)),
      finished: (peer, goodbye) => {
        computingPeers.delete(peer);
        heard();
        const { stopped } = goodbye;
        if (stopped === undefined) {
          finishedPeers.set(peer, goodbye.issued);
          return follow({ kind: 'finish', rank: peer, at: now() });
        }
        if (goodbye.held) {
          heldPeers.set(peer, stopped);
          return settle();
        }
        const by = goodbye.stoppedBy ?? peer;
        broken(peer, () => new LaunchedRankError(`rank ${by} stopped: ${stopped}`, { rank: by, reason: stopped }));
      },
      refused: refusing.refused,
      report: (peer, r) => {
        if (r.kind === 'computing') return void computingPeers.add(peer);
        computingPeers.delete(peer);
        heard();
        follow({ kind: 'issue', rank: peer, collective: r.collective, dtype: r.dtype, at: now() });
      },
    }, o.timeoutMs).then((mesh) => {
      ports = mesh;
      if (farewell) {
        // Stopped while connecting (a signal): the peers still hear why.
        mesh.forEach((p) => void p.goodbye(farewell!));
        return;
      }
      o.connected?.(met.runId);
      computeLimit(); // the watchdog times the step; the rendezvous and the connections have their own limits
      return runRank(job, mesh, post).then(() => {
        if (settled) return;
        keep();
        end({ issued }, () => resolve({ result: o.data ? rankResult<F>(result, rank) : null, stepMs }));
      });
    }).catch((err: Error) => fail(err));
  });
}

/** The collective a rank waits in, and its position on that communicator. */
interface Waiting {
  readonly c: IssuedCollective;
  readonly position: number;
}

/** This rank's row of the report's routing: from the case's indices, or the scenario's generated ones. */
function routingOfRank(o: LaunchOptions<FloatDType>, rank: number): Pick<RankRecord, 'sendRows' | 'rowsPerExpert'> {
  return rankRouting(o.scenario, o.data ? [toIndexArray(o.data.ranks[rank]!.indices_TK, `rank${rank}.indices`)] : generatedIndices(o.scenario, rank));
}
