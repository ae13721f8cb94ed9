// One rank in this process, placed by a launcher (torchrun, srun): it meets the other
// ranks through the rendezvous, connects to each over TCP (or joins an NCCL communicator
// for the EP layer's all-to-alls), and runs its rank of a case or a scenario under its rank machine
// (actors/rankRun.ts), exactly as a worker rank does. With no supervisor to hold the
// ledger, each rank watches for itself: a peer that finished after issuing fewer
// collectives than this rank is now waiting in is a missing collective, a connection that
// closes without a goodbye is a crashed peer, and no progress for the timeout is a stall.
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
import { acceptEarly, socketMesh, type Goodbye, type PeerState } from './socketPort.js';
import { runIdentity, type RefusedConnection, type RunIdentity } from './runIdentity.js';
import { RANK_RECORD_VERSION, STALL, type RankRecord } from './rankRecord.js';
import { generatedIndices, rankRouting } from '../machines/routing.js';
import { commOf, communicators, ppOf, worldSize, type CommKind } from '../machines/mesh.js';
import { toIndexArray, type FloatDType } from '../src/tensor.js';
import { DEFAULT_COMPUTE_TIMEOUT_MS } from './supervisor.js';

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
   * The collective limit (ms): a rank waiting in a collective this long past the compute
   * limit (by then a peer that computes would have reported its own stall) stops with a
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
  /** Collectives issued so far per communicator kind, and the one this rank waits in. */
  const issued: Record<string, number> = {};
  let waiting: { c: IssuedCollective; position: number } | null = null;
  /** Peers that ended: finished (with what they issued), or stopped or went away (the error that says so). */
  const endedPeers = new Map<number, Goodbye['issued'] | (() => LaunchedRankError)>();
  let fail: (err: Error) => void = () => {};
  const mesh = o.scenario;
  const membersOf = (kind: CommKind) => communicators(mesh).find((c) => c.id === commOf(mesh, rank, kind))?.members ?? [];

  const describe = (w: { c: IssuedCollective; position: number }) => `${w.c.op} (layer ${w.c.layer}, ${w.c.comm} position ${w.position})`;
  /**
   * A member of the communicator this rank waits on that will never join: one that
   * finished after issuing no more than `position` collectives on it, or that stopped or
   * went away. A peer this rank does not wait on does not stop it: ranks that need none of
   * the ended ones finish their step.
   */
  const missingPeer = (w: { c: IssuedCollective; position: number }) => {
    const members = membersOf(w.c.comm);
    for (const [peer, ended] of endedPeers) {
      if (!members.includes(peer)) continue;
      if (typeof ended === 'function') return fail(ended());
      if ((ended[w.c.comm] ?? 0) <= w.position) {
        return fail(new LaunchedRankError(`missing collective: rank ${rank} waits in ${describe(w)} but rank ${peer} finished its step after issuing ${ended[w.c.comm] ?? 0} collective(s) on ${w.c.comm}; under NCCL both would hang until the watchdog`));
      }
    }
  };

  const job: WorkerJob = {
    rank, scenario: o.scenario, casePayload: o.data ? casePayloads(o.data)[rank] : undefined, backend: o.backend,
    exchange: o.exchange === 'nccl' ? 'nccl' : 'ports', device, ncclId: met.id ?? undefined, faults: o.faults ?? [], inspect: false, steps: o.steps ?? 1, record: !!o.keep,
  };
  return new Promise<LaunchedRankResult<F>>((resolve, reject) => {
    let settled = false;
    let watchdog: NodeJS.Timeout | undefined;
    let ports: Map<number, { goodbye(g: Goodbye): Promise<void>; state(s: PeerState): void }> = new Map();
    /** What each peer last said it does; a peer computes until it says otherwise (every step begins with routing). */
    const peerState = new Map<number, PeerState>();
    const computingMember = (w: { c: IssuedCollective }) => membersOf(w.c.comm).some((m) => m !== rank && !endedPeers.has(m) && (peerState.get(m) ?? 'computing') === 'computing');
    /** What this rank computes now (set when a collective completes), for a stall. */
    let computing = 'routing layer 0';
    const computeTimeoutMs = o.computeTimeoutMs ?? DEFAULT_COMPUTE_TIMEOUT_MS;
    const arm = () => {
      clearTimeout(watchdog);
      const w = waiting;
      // Waiting: every collective limit, unless a member it waits on still computes (that member's compute limit holds it).
      const check = (w: { c: IssuedCollective; position: number }) => () => {
        if (computingMember(w)) watchdog = setTimeout(check(w), o.timeoutMs);
        else fail(new LaunchedRankError(`timeout: rank ${rank} waits in ${describe(w)} and no member it waits on has computed or ended for ${o.timeoutMs} ms (collective limit)`));
      };
      watchdog = w
        ? setTimeout(check(w), o.timeoutMs)
        : setTimeout(() => fail(new LaunchedRankError(`${STALL}rank ${rank} has not returned from ${computing} for ${computeTimeoutMs} ms (compute limit)`)), computeTimeoutMs);
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
    fail = (err) => {
      if (settled) return;
      keep(err.message);
      // Peers hear why the run stopped and which rank stopped it first, so they report the cause rather than a lost connection.
      const origin = err instanceof LaunchedRankError && err.origin ? err.origin : { rank, reason: err.message };
      end({ issued, stopped: origin.reason, stoppedBy: origin.rank }, () => reject(err));
    };
    if (o.signal) terminated(o.signal).catch((err: Error) => fail(err));
    let result: Uint8Array | undefined;
    const stepMs: number[] = [];
    const post = (m: WorkerMessage) => {
      if (settled) return; // a stopped rank's layer may still be finishing a compute: what it reports no longer counts
      if (m.type === 'issue' || m.type === 'completed' || m.type === 'paths' || m.type === 'finished') messages.push(m);
      switch (m.type) {
        case 'issue': {
          ports.forEach((p) => p.state('waiting'));
          const position = issued[m.collective.comm] ?? 0;
          issued[m.collective.comm] = position + 1;
          waiting = { c: m.collective, position };
          arm();
          missingPeer(waiting);
          return;
        }
        case 'completed':
          ports.forEach((p) => p.state('computing'));
          waiting = null;
          computing = m.next;
          arm();
          return;
        case 'violation':
          return fail(new LaunchedRankError(`protocol violation: ${m.message}`));
        case 'transport-error':
          return fail(new LaunchedRankError(`bad message between ranks: ${m.message}`));
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
    const ended = (peer: number, how: Goodbye['issued'] | (() => LaunchedRankError)) => {
      endedPeers.set(peer, how);
      if (waiting) missingPeer(waiting);
    };
    socketMesh({ run: met.runId, rank, world: o.env.worldSize }, secret, met.peers, listening, {
      broken: (peer, reason) => ended(peer, () => new LaunchedRankError(`rank ${peer} went away before finishing its step (${reason}): it crashed or was killed${waiting ? `; rank ${rank} waits in ${describe(waiting)}` : ''}`)),
      finished: (peer, goodbye) => {
        const { stopped } = goodbye;
        if (stopped === undefined) return ended(peer, goodbye.issued);
        const by = goodbye.stoppedBy ?? peer;
        ended(peer, () => new LaunchedRankError(`rank ${by} stopped: ${stopped}`, { rank: by, reason: stopped }));
      },
      refused: refusing.refused,
      state: (peer, s) => peerState.set(peer, s),
    }, o.timeoutMs).then((mesh) => {
      ports = mesh;
      if (farewell) {
        // Stopped while connecting (a signal): the peers still hear why.
        mesh.forEach((p) => void p.goodbye(farewell!));
        return;
      }
      o.connected?.(met.runId);
      arm(); // the watchdog times the step; the rendezvous and the connections have their own limits
      return runRank(job, mesh, post).then(() => {
        if (settled) return;
        keep();
        end({ issued }, () => resolve({ result: o.data ? rankResult<F>(result, rank) : null, stepMs }));
      });
    }).catch((err: Error) => fail(err));
  });
}

/** This rank's row of the report's routing: from the case's indices, or the scenario's generated ones. */
function routingOfRank(o: LaunchOptions<FloatDType>, rank: number): Pick<RankRecord, 'sendRows' | 'rowsPerExpert'> {
  return rankRouting(o.scenario, o.data ? [toIndexArray(o.data.ranks[rank]!.indices_TK, `rank${rank}.indices`)] : generatedIndices(o.scenario, rank));
}
