// Messages between the supervisor (main thread) and rank workers. Tensors never travel in
// these: rank-to-rank data goes over the MessagePort mesh (actors/transport.ts) and job
// inputs and results travel msgpack-encoded as `Uint8Array` payloads.
import type { MessagePort } from 'node:worker_threads';
import type { IssuedCollective } from '../machines/snapshot.js';
import type { RankContext } from '../machines/rankMachine.js';
import type { Scenario } from '../machines/scenario.js';
import type { BackendName } from '../src/backends.js';
import type { ExchangeName } from './exchanges.js';

/** Enough of a rank machine's snapshot for the supervisor to rebuild it for a diagnosis. */
export interface SnapshotWire {
  readonly value: unknown;
  readonly context: RankContext;
}

/** Faults a test or a user injects to check that the runtime reports them. */
export type Fault =
  | { kind: 'throw'; rank: number; op: string; layer?: number }
  /** The rank stops making progress before `op` without issuing anything (a stuck kernel, say). */
  | { kind: 'stall'; rank: number; op: string }
  /** The rank posts the supervisor an issue message without its collective: malformed, not merely unknown. */
  | { kind: 'garbage-to-supervisor'; rank: number; op: string }
  | { kind: 'corrupt-message'; rank: number; op: string }
  | { kind: 'wrong-communicator'; rank: number; op: string }
  | { kind: 'stale-position'; rank: number; op: string };

/** What a worker runs: a scenario step (sim) or one rank of a case file (run). */
export interface WorkerJob {
  readonly rank: number;
  readonly scenario: Scenario;
  /** msgpack of `CaseRankJob` when running a case; absent for a generated sim step. */
  readonly casePayload?: Uint8Array;
  readonly backend: BackendName;
  readonly exchange: ExchangeName;
  /** The CUDA device this rank uses, when its kernels or its exchange use a GPU. */
  readonly device?: number;
  /** The nccl exchange: the unique id of this rank's ep communicator, from the supervisor. */
  readonly ncclId?: Uint8Array;
  readonly faults: readonly Fault[];
  /** Stream xstate inspection events of this rank to the supervisor. */
  readonly inspect: boolean;
  /** Training steps to run back to back (a fresh rank machine each step). */
  readonly steps: number;
  /** Post state paths for reports; off for long benchmark runs. */
  readonly record: boolean;
}

export type WorkerMessage =
  | { type: 'issue'; rank: number; collective: IssuedCollective; dtype: string; snapshot: SnapshotWire; at: number }
  /** next: what the rank does now, in words (the supervisor names it if that never ends). */
  | { type: 'completed'; rank: number; op: string; next: string; at: number }
  /** The rank's worker is up and begins a training step (its own work starts here). */
  | { type: 'started'; rank: number; at: number }
  | { type: 'step'; rank: number; step: number; ms: number }
  /** State paths the rank went through since its last message (sent in batches, not per microstep). */
  | { type: 'paths'; rank: number; paths: string[] }
  | { type: 'finished'; rank: number; how: 'done' | 'exited'; snapshot: SnapshotWire; result?: Uint8Array; at: number }
  | { type: 'violation'; rank: number; message: string; snapshot: SnapshotWire; at: number }
  | { type: 'transport-error'; rank: number; message: string; at: number }
  | { type: 'inspect'; rank: number; event: unknown };

/**
 * What one worker thread hosts: its ranks' jobs (one scenario for all of them, not a copy
 * per rank) and how ranks are placed on threads (rank r runs on thread ⌊r / ranksPerThread⌋).
 */
export interface ThreadJob {
  readonly scenario: Scenario;
  readonly ranks: readonly Omit<WorkerJob, 'scenario'>[];
  readonly ranksPerThread: number;
}

/** The worker thread that hosts `rank` when each hosts `ranksPerThread` consecutive ranks. */
export function threadOfRank(rank: number, ranksPerThread: number): number {
  return Math.floor(rank / ranksPerThread);
}

/**
 * The connections of a worker thread, keyed by the other thread's index: one MessagePort per
 * pair of threads whose ranks share a communicator, carrying every pair of their ranks.
 */
export type SupervisorMessage = { type: 'start'; links: Record<number, MessagePort> };

/** A rank's message through a link shared by several pairs of ranks: addressed. */
export interface LinkMessage {
  readonly from: number;
  readonly to: number;
  readonly m: unknown;
}

/** Milliseconds on a clock shared by every thread of the process. */
export function now(): number {
  return performance.timeOrigin + performance.now();
}
