// One rank in this process, placed by a launcher (torchrun, srun): it meets the other
// ranks through the rendezvous, connects to each over TCP (or joins an NCCL communicator
// for the EP layer's all-to-alls), and runs its rank of a case or a scenario under its rank machine
// (actors/rankRun.ts), exactly as a worker rank does. With no supervisor to hold the
// ledger, each rank watches for itself: a peer that finished after issuing fewer
// collectives than this rank is now waiting in is a missing collective, a connection that
// closes without a goodbye is a crashed peer, and no progress for the timeout is a stall.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { fileURLToPath } from 'node:url';
import type { CaseData, RankResult } from '../src/case.js';
import { cudaDevices, type BackendName } from '../src/backends.js';
import { UsageError } from '../src/errors.js';
import type { IssuedCollective } from '../machines/protocol.js';
import { casePayloads, rankResult } from './caseRanks.js';
import { now, type Fault, type WorkerJob, type WorkerMessage } from './messages.js';
import { type Scenario } from '../machines/scenario.js';
import { freePort, rendezvous, type LaunchEnv } from './rendezvous.js';
import { runRank } from './rankRun.js';
import { acceptEarly, socketMesh, type Goodbye } from './socketPort.js';
import { mergeRankRecordsIn, RANK_RECORD_VERSION, type RankRecord } from './rankRecord.js';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { caseMetadata, caseTensors } from '../src/case.js';
import { writeSafetensorsFileAtomic } from '../src/codec/safetensors.js';
import type { ReportInput } from '../machines/record.js';
import { generatedIndices, rankRouting } from '../machines/routing.js';
import { commOf, communicators, worldSize } from '../machines/mesh.js';
import { toIndexArray, type FloatDType } from '../src/tensor.js';

/** The run stopped because the ranks diverged, a peer crashed or nothing moved: exit code 2. */
export class LaunchedRankError extends Error {
  override name = 'LaunchedRankError';
}

export interface LaunchOptions<F extends FloatDType> {
  /** What the ranks run: the protocol, the layout, and (without `data`) the generated inputs. */
  readonly scenario: Scenario;
  /** A case's inputs, when the ranks compute on a case (its scenario from caseScenario()). */
  readonly data?: CaseData<F>;
  readonly env: LaunchEnv;
  /** tcp: msgpack chunks over a TCP connection per pair; nccl: the EP layer's all-to-alls over NCCL. */
  readonly exchange: 'tcp' | 'nccl';
  readonly backend: BackendName;
  /** No progress on this rank for this long: stop with a stall (ms). */
  readonly timeoutMs: number;
  readonly rendezvousTimeoutMs?: number;
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
    const what = o.data ? `the case has ep=${scenario.ep}` : `the scenario has ${ranks} ranks (dp ${scenario.dp} × ep ${scenario.ep})`;
    throw new UsageError(`${what} but WORLD_SIZE is ${env.worldSize}: launch one process per rank`);
  }
  const gpu = o.exchange === 'nccl' || o.backend === 'cuda' ? await gpuOf(env, o.exchange) : null;
  const server = createServer();
  const listening = acceptEarly(server);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => reject(new UsageError(`rank ${env.rank} cannot open its data port: ${err.message}`)));
    server.listen(0, () => resolve());
  });
  try {
    const { peers, id } = await rendezvous(env, (server.address() as { port: number }).port, { timeoutMs: o.rendezvousTimeoutMs, newId: gpu?.newId });
    return await runConnected(o, listening, peers, id, gpu?.device);
  } finally {
    server.close();
  }
}

async function gpuOf(env: LaunchEnv, exchange: 'tcp' | 'nccl'): Promise<{ device: number; newId?: () => Uint8Array }> {
  const { addon, count } = await cudaDevices(exchange === 'nccl' ? 'the nccl exchange' : 'the cuda backend');
  // LOCAL_RANK picks the GPU, as torchrun intends; NCCL refuses two ranks on one GPU itself.
  return { device: env.localRank % count, newId: exchange === 'nccl' && env.rank === 0 ? () => (addon.ncclGetUniqueId as () => Uint8Array)() : undefined };
}

function runConnected<F extends FloatDType>(o: LaunchOptions<F>, listening: ReturnType<typeof acceptEarly>, peers: Parameters<typeof socketMesh>[1], ncclId: Uint8Array | null, device: number | undefined): Promise<LaunchedRankResult<F>> {
  const { rank } = o.env;
  /** Collectives issued so far per communicator kind, and the one this rank waits in. */
  const issued: Record<string, number> = {};
  let waiting: { c: IssuedCollective; position: number } | null = null;
  const finishedPeers = new Map<number, Goodbye['issued']>();
  let fail: (err: Error) => void = () => {};
  const mesh = { ep: o.scenario.ep, dp: o.scenario.dp };
  const membersOf = (kind: 'ep' | 'dp') => communicators(mesh).find((c) => c.id === commOf(mesh, rank, kind))?.members ?? [];

  const describe = (w: { c: IssuedCollective; position: number }) => `${w.c.op} (layer ${w.c.layer}, ${w.c.comm} position ${w.position})`;
  /** A finished member of the communicator that issued no more than `position` collectives on it will never join. */
  const missingPeer = (w: { c: IssuedCollective; position: number }) => {
    const members = membersOf(w.c.comm);
    for (const [peer, g] of finishedPeers) {
      if (members.includes(peer) && (g[w.c.comm] ?? 0) <= w.position) {
        fail(new LaunchedRankError(`missing collective: rank ${rank} waits in ${describe(w)} but rank ${peer} finished its step after issuing ${g[w.c.comm] ?? 0} collective(s) on ${w.c.comm}; under NCCL both would hang until the watchdog`));
        return;
      }
    }
  };

  const job: WorkerJob = {
    rank, scenario: o.scenario, casePayload: o.data ? casePayloads(o.data)[rank] : undefined, backend: o.backend,
    exchange: o.exchange === 'nccl' ? 'nccl' : 'ports', device, ncclId: ncclId ?? undefined, faults: o.faults ?? [], inspect: false, steps: o.steps ?? 1, record: !!o.keep,
  };
  return new Promise<LaunchedRankResult<F>>((resolve, reject) => {
    let settled = false;
    let watchdog: NodeJS.Timeout | undefined;
    let ports: Map<number, { goodbye(g: Goodbye): void }> = new Map();
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => fail(new LaunchedRankError(`stall: rank ${rank} made no progress for ${o.timeoutMs} ms${waiting ? ` waiting in ${describe(waiting)}` : ''}`)), o.timeoutMs);
    };
    const messages: WorkerMessage[] = [];
    const keep = (stopped?: string) =>
      o.keep?.({ epActorsRankRecord: RANK_RECORD_VERSION, rank, scenario: o.scenario, ...routingOfRank(o, rank), messages, ...(stopped === undefined ? {} : { stopped, stoppedAt: now() }) });
    fail = (err) => {
      if (settled) return;
      settled = true;
      keep(err.message);
      clearTimeout(watchdog);
      // Peers hear why this rank stopped, so they report the cause rather than a lost connection.
      ports.forEach((p) => p.goodbye({ issued, stopped: err.message }));
      reject(err);
    };
    let result: Uint8Array | undefined;
    const stepMs: number[] = [];
    const post = (m: WorkerMessage) => {
      if (m.type === 'issue' || m.type === 'completed' || m.type === 'paths' || m.type === 'finished') messages.push(m);
      switch (m.type) {
        case 'issue': {
          const position = issued[m.collective.comm] ?? 0;
          issued[m.collective.comm] = position + 1;
          waiting = { c: m.collective, position };
          arm();
          missingPeer(waiting);
          return;
        }
        case 'completed':
          waiting = null;
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
    socketMesh(rank, peers, listening, {
      broken: (peer, reason) => fail(new LaunchedRankError(`rank ${peer} went away before finishing its step (${reason}): it crashed or was killed${waiting ? `; rank ${rank} waits in ${describe(waiting)}` : ''}`)),
      finished: (peer, goodbye) => {
        if (goodbye.stopped !== undefined) return fail(new LaunchedRankError(`rank ${peer} stopped: ${goodbye.stopped}`));
        finishedPeers.set(peer, goodbye.issued);
        if (waiting) missingPeer(waiting);
      },
    }).then((mesh) => {
      ports = mesh;
      arm(); // the watchdog times the step; the rendezvous and the connections have their own limits
      return runRank(job, mesh, post);
    }).then(() => {
      if (settled) return;
      settled = true;
      keep();
      clearTimeout(watchdog);
      ports.forEach((p) => p.goodbye({ issued }));
      resolve({ result: o.data ? rankResult<F>(result, rank) : null, stepMs });
    }, (err: Error) => fail(err));
  });
}

/** This rank's row of the report's routing: from the case's indices, or the scenario's generated ones. */
function routingOfRank(o: LaunchOptions<FloatDType>, rank: number): Pick<RankRecord, 'sendRows' | 'rowsPerExpert'> {
  return rankRouting(o.scenario, o.data ? [toIndexArray(o.data.ranks[rank]!.indices_TK, `rank${rank}.indices`)] : generatedIndices(o.scenario, rank));
}

export interface CliRun {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** `ep-actors ...args` as a child process of this Node, with its exit code and output; killed after timeoutMs. */
export function runEpActors(args: readonly string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliRun> {
  const cli = fileURLToPath(new URL('../cli/main.js', import.meta.url));
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { env: opts.env ?? process.env, timeout: opts.timeoutMs ?? 600_000 });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/**
 * Starts `n` processes of `ep-actors rank ...rankArgs` on this machine, placed as
 * `torchrun --nproc-per-node n` would place them (RANK, WORLD_SIZE, LOCAL_RANK and a free
 * MASTER_PORT on 127.0.0.1), and waits for all of them.
 */
export async function launchLocally(n: number, rankArgs: readonly string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliRun[]> {
  const port = await freePort();
  return Promise.all(
    Array.from({ length: n }, (_, rank) =>
      runEpActors(['rank', ...rankArgs], {
        env: { ...(opts.env ?? process.env), RANK: String(rank), WORLD_SIZE: String(n), LOCAL_RANK: String(rank), MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(port) },
        timeoutMs: opts.timeoutMs,
      }),
    ),
  );
}

/**
 * Runs `n` = the work's world size of `ep-actors rank` processes here on a case or a
 * scenario written to a temporary folder (their --out-dir), hands `use` the runs and the
 * folder, and removes the folder afterwards.
 */
export async function withLaunchedRanks<T>(
  work: { readonly case: CaseData } | { readonly scenario: Scenario },
  rankArgs: readonly string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number },
  use: (runs: CliRun[], dir: string) => Promise<T>,
): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'ep-actors-ranks-'));
  try {
    let input: string[];
    let n: number;
    if ('case' in work) {
      const path = join(dir, 'case.safetensors');
      await writeSafetensorsFileAtomic(path, caseTensors(work.case), caseMetadata(work.case.meta));
      [input, n] = [['--case', path], work.case.meta.ep];
    } else {
      const path = join(dir, 'scenario.json');
      await writeFile(path, JSON.stringify(work.scenario));
      [input, n] = [['--scenario', path], worldSize(work.scenario)];
    }
    return await use(await launchLocally(n, [...input, '--out-dir', dir, ...rankArgs], opts), dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A scenario as one `ep-actors rank` process per rank, their records merged (`sim --engine processes`). */
export function runScenarioOnProcesses(scenario: Scenario, rankArgs: readonly string[] = []): Promise<ReportInput> {
  return withLaunchedRanks({ scenario }, rankArgs, {}, async (runs, dir) => {
    // Exit 2 is a rank that stopped on what it saw (the records say what); anything else is a failure to run.
    const failed = runs.findIndex((r) => r.code !== 0 && r.code !== 2);
    if (failed >= 0) throw new Error(`rank ${failed} could not run (exit ${runs[failed]!.code}): ${runs[failed]!.stderr.trim()}`);
    return mergeRankRecordsIn(dir);
  });
}
