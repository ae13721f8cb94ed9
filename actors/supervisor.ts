// The supervisor (main thread): spawns one worker thread per rank (several ranks per thread
// in a large run: a thread costs more memory than a rank), wires a MessagePort per pair of
// threads whose ranks share a communicator, feeds the ranks' reports to the collective
// tracker (machines/feed.ts, as every engine does), and ends the run with a verdict:
// - at quiescence (every rank blocked in a collective or finished), the tracker's hangs
//   (mismatch, missing, cycle), or ok when every rank finished;
// - crash (a rank threw, or its worker exited), a protocol violation, or a corrupt message, at once;
// - stall: a rank's own work (routing, expert compute) has not returned for the compute
//   limit — the ranks waiting for it are not hung, they wait for a compute;
// - timeout: a collective every member issued has not completed on a rank for the
//   collective limit (bytes that never arrive).
// Every worker is terminated before the result is returned: no thread outlives a run.
import { availableParallelism } from 'node:os';
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import type { LedgerEntry } from '../machines/ledger.js';
import { commOf, communicators, worldSize } from '../machines/mesh.js';
import { LedgerFeed } from '../machines/feed.js';
import { diagnoseHangs, okDiagnosis, rankReports, rankWord, stallDiagnosis, type Diagnosis, type VerdictKind } from '../machines/diagnosis.js';
import type { IssuedCollective, RankSnapshot } from '../machines/snapshot.js';
import { CollectiveSpans, type TraceEvent } from '../machines/spans.js';
import { type Scenario } from '../machines/scenario.js';
import type { BackendName } from '../src/backends.js';
import { gpuPlacement, type ExchangeName } from './exchanges.js';
import { now, threadOfRank, type Fault, type SnapshotWire, type ThreadJob, type WorkerMessage } from './messages.js';
import { PendingArrivals } from './arrivals.js';
import { rankSnapshots } from './rankRecord.js';
import type { ReportInput } from '../machines/record.js';
import { routingOf } from '../machines/routing.js';
import { compileOnFirstCall } from './jit.js';

export interface RuntimeOptions {
  backend?: BackendName;
  /** How all-to-all data moves between ranks (default: msgpack over MessagePorts). */
  exchange?: ExchangeName;
  faults?: readonly Fault[];
  /** A collective every member issued that has not completed on a rank for this long: `timeout` (default 10 s). */
  timeoutMs?: number;
  /** A rank's own work (routing, expert compute) that has not returned for this long: `stall` (default 10 min). */
  computeTimeoutMs?: number;
  /** Per rank, msgpack of a CaseRankJob (ranks compute on these instead of generated inputs). */
  casePayloads?: readonly Uint8Array[];
  /** Receives every xstate inspection event of every rank. */
  onInspect?: (rank: number, event: unknown) => void;
  /** Called for every collective a rank issues (progress display). */
  onIssue?: (rank: number, collective: IssuedCollective) => void;
  /** Training steps back to back in the same workers (default 1). */
  steps?: number;
  /** Keep the ledger, state paths and trace (default true; off for long benchmark runs). */
  record?: boolean;
  /** Ranks per worker thread (default: one up to MANY_RANKS ranks or on GPUs; beyond, as many as fill THREADS_AT_SCALE threads). */
  ranksPerThread?: number;
}

export interface RuntimeResult {
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  readonly trace: readonly TraceEvent[];
  /** Per rank, the machine state paths it went through. */
  readonly paths: readonly string[][];
  /** Per rank, the msgpack result a case run sent home (undefined for generated steps). */
  readonly results: readonly (Uint8Array | undefined)[];
  /** Per step, the slowest rank's wall time for it (ms), as measured in the workers. */
  readonly stepMs: readonly number[];
  readonly wallMs: number;
}

const WORKER_URL = new URL('./rankWorker.js', import.meta.url);

/**
 * Up to this many ranks, each rank has a worker thread of its own; beyond, a thread hosts
 * several ranks, each its own async task, spread over THREADS_AT_SCALE threads: one per core
 * (more threads compute nothing sooner), at most 16. A thread (a V8 isolate with Node and
 * our modules) costs about 16 MB before its ranks do anything: at 256 ranks, 16 threads
 * peak at about 1.05 GB, 2 threads at 0.7 GB, one per rank at 4.4 GB (docs/BENCHMARKS.md,
 * "Several ranks per worker thread").
 */
const MANY_RANKS = 32;
const THREADS_AT_SCALE = Math.min(16, availableParallelism());
/**
 * From MANY_RANKS ranks on, each worker's young generation is capped at YOUNG_GENERATION_MB:
 * V8 lets every isolate's grow to several MB (sim at ep=64 on 64 threads: peak RSS
 * 1000–1073 MB by default, 955–964 MB capped at 2 MB, CPU time the same within the noise).
 * Smaller runs keep V8's default, which the EP-step benchmarks were measured with.
 */
const YOUNG_GENERATION_MB = 2;

export const DEFAULT_TIMEOUT_MS = 10_000;
export const DEFAULT_COMPUTE_TIMEOUT_MS = 600_000;

function describeMessage(m: unknown): string {
  const type = m && typeof m === 'object' && 'type' in m ? String((m as { type: unknown }).type) : typeof m;
  return `type ${type}`;
}
/** A transport error waits this long for the ledger to prove the divergence it shows (the ledger says more). */
const TRANSPORT_GRACE_MS = 20;

export async function runActors(s: Scenario, opts: RuntimeOptions = {}): Promise<RuntimeResult> {
  const n = worldSize(s);
  const t0 = now();
  const record = opts.record ?? true;
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const computeTimeoutMs = opts.computeTimeoutMs ?? DEFAULT_COMPUTE_TIMEOUT_MS;
  const stepMs: number[] = [];
  const wires: (SnapshotWire | null)[] = new Array(n).fill(null);
  const paths: string[][] = Array.from({ length: n }, () => []);
  const results: (Uint8Array | undefined)[] = new Array(n).fill(undefined);
  const spans = new CollectiveSpans(t0);
  /** Per rank: since when it has been on its own work (routing, compute; null while in a collective or done), and what that is. */
  const working: ({ since: number; what: string } | null)[] = Array.from({ length: n }, () => ({ since: t0, what: 'starting its worker' }));
  const pending = new PendingArrivals(n);
  const lastIssued: (LedgerEntry | undefined)[] = new Array(n).fill(undefined);
  const feed = new LedgerFeed(
    s,
    {
      issued: (e, at) => {
        lastIssued[e.rank] = e;
        if (record) spans.issue(e, at);
      },
      completed: (entries) => {
        const at = now();
        for (const e of entries) pending.proven(e.rank, at);
      },
    },
    record,
  );
  const tracker = feed.tracker;
  /** Ranks that died after the ledger already held a finding: a consequence, not the cause. */
  const dead = new Set<number>();

  const backend = opts.backend ?? 'ts';
  const exchange = opts.exchange ?? 'ports';
  const comms = communicators(s);
  const gpu = await gpuPlacement(backend, exchange, n, comms.filter((c) => c.kind === 'ep').map((c) => c.id));
  // Ranks on GPUs keep a thread each: a thread has one current CUDA device and one stream of the addon's.
  const ranksPerThread = opts.ranksPerThread ?? (n > MANY_RANKS && !gpu ? Math.ceil(n / THREADS_AT_SCALE) : 1);
  if (!Number.isSafeInteger(ranksPerThread) || ranksPerThread < 1) throw new RangeError(`ranksPerThread must be a positive integer, got ${ranksPerThread}`);
  if (gpu && ranksPerThread > 1) throw new RangeError(`ranks on GPUs run one per worker thread (a thread has one current CUDA device), not ${ranksPerThread}`);
  /** Per worker thread, the ranks it hosts. */
  const hosted = Array.from({ length: Math.ceil(n / ranksPerThread) }, (_, t) => Array.from({ length: Math.min(ranksPerThread, n - t * ranksPerThread) }, (_, i) => t * ranksPerThread + i));
  compileOnFirstCall();
  const workers = hosted.map((ranks) => {
    const job: ThreadJob = {
      scenario: s,
      ranksPerThread,
      ranks: ranks.map((rank) => ({
        rank, casePayload: opts.casePayloads?.[rank], backend, exchange, device: gpu?.devices[rank], ncclId: gpu?.ncclIds[commOf(s, rank, 'ep')],
        faults: opts.faults ?? [], inspect: !!opts.onInspect, steps: opts.steps ?? 1, record,
      })),
    };
    return new Worker(WORKER_URL, { workerData: job, ...(n >= MANY_RANKS && { resourceLimits: { maxYoungGenerationSizeMb: YOUNG_GENERATION_MB } }) });
  });
  const exited = workers.map((w) => new Promise<void>((resolve) => w.once('exit', () => resolve())));

  const snapshots = (): RankSnapshot[] => rankSnapshots(s, wires);

  return new Promise<RuntimeResult>((resolve) => {
    let done = false;
    let pendingTransportError: NodeJS.Timeout | undefined;
    const end = (diagnosis: Diagnosis) => {
      if (done) return;
      done = true;
      clearInterval(watch);
      clearTimeout(pendingTransportError);
      // Pending collectives end at the verdict, not after the workers' exit.
      const trace = spans.close(now());
      for (const w of workers) void w.terminate();
      void Promise.all(exited).then(() => resolve({ diagnosis, ledger: tracker.entries, trace, paths, results, stepMs, wallMs: now() - t0 }));
    };
    const failure = (kind: VerdictKind, culprits: readonly number[], cause: string, decidedAt: number) => {
      end({ verdict: kind, communicator: null, position: null, culprits, ranks: rankReports(snapshots(), tracker), cause, detectedAfterMs: now() - decidedAt });
    };
    /** At quiescence the tracker's hangs are the verdict (or every rank finished); a rank still working or awaiting its data can move. */
    const idle = () => working.every((w, r) => w === null || dead.has(r)) && pending.none();
    const settle = () => {
      if (done || !feed.settled(n, dead, idle)) return;
      const hangs = tracker.hangs();
      if (hangs.length > 0) {
        const evidence = feed.evidenceAt ?? feed.lastAt;
        end({ ...diagnoseHangs(hangs, snapshots(), tracker), detectedAfterMs: Math.max(0, now() - evidence) });
      } else if (dead.size > 0) {
        failure('crash', [...dead], `${rankWord([...dead])} died and no hang explains it`, now());
      } else end(okDiagnosis(snapshots(), tracker));
    };
    // The limits: a rank's own work that never returns, or a collective whose bytes never arrive.
    const check = () => {
      if (done) return;
      const t = now();
      const stalled = working.flatMap((w, r) => (w && !dead.has(r) && t - w.since > computeTimeoutMs ? [r] : []));
      // A rank still inside its limit may be stalled too: it joins the verdict or blocks, within one more limit.
      const computing = working.some((w, r) => w && !dead.has(r) && t - w.since <= computeTimeoutMs);
      if (stalled.length > 0 && !computing) {
        const d = stallDiagnosis(stalled.map((r) => ({ rank: r, what: working[r]!.what, forMs: t - working[r]!.since })), snapshots(), tracker, computeTimeoutMs);
        return end({ ...d, detectedAfterMs: now() - t });
      }
      const late = pending.lateAt(t, timeoutMs);
      if (late.length > 0) {
        const where = late.map((r) => {
          const e = lastIssued[r];
          return `rank ${r}${e ? ` in ${e.op} (${e.communicator}, position ${e.position})` : ''}`;
        });
        return failure('timeout', late, `every member issued the collective but its data has not arrived for ${timeoutMs} ms: ${where.join(', ')}`, t);
      }
    };
    const watch = setInterval(check, Math.max(5, Math.min(500, Math.min(timeoutMs, computeTimeoutMs) / 10)));

    const handle = (m: WorkerMessage) => {
      switch (m.type) {
        case 'paths':
          paths[m.rank]!.push(...m.paths);
          return;
        case 'inspect':
          opts.onInspect?.(m.rank, m.event);
          return;
        case 'issue':
          wires[m.rank] = m.snapshot;
          working[m.rank] = null;
          feed.push({ kind: 'issue', rank: m.rank, collective: m.collective, dtype: m.dtype, at: m.at });
          opts.onIssue?.(m.rank, m.collective);
          return settle();
        case 'started':
          working[m.rank] = { since: m.at, what: 'routing layer 0' };
          return;
        case 'step':
          stepMs[m.step] = Math.max(stepMs[m.step] ?? 0, m.ms);
          return;
        case 'completed':
          if (record) spans.complete(m.rank, m.at);
          pending.arrived(m.rank, m.at);
          working[m.rank] = { since: m.at, what: m.next };
          return;
        case 'finished':
          wires[m.rank] = m.snapshot;
          results[m.rank] = m.result;
          working[m.rank] = null;
          feed.push({ kind: 'finish', rank: m.rank, at: m.at });
          return settle();
        case 'violation':
          wires[m.rank] = m.snapshot;
          return failure('violation', [m.rank], `protocol violation: ${m.message}`, m.at);
        case 'transport-error':
          // The data shows a divergence; the ledger usually proves it from the issues and
          // says more. Without that proof it is a bad message between actors.
          pendingTransportError ??= setTimeout(() => {
            if (feed.evidenceAt === null) failure('violation', [m.rank], `bad message between actors: ${m.message}`, m.at);
          }, TRANSPORT_GRACE_MS);
          return;
      }
    };
    /** Ranks whose thread ended: those of them that had not finished died. */
    const died = (ranks: readonly number[], cause: string) => {
      const gone = ranks.filter((r) => !tracker.isFinished(r));
      if (done || gone.length === 0) return;
      // After a proved divergence a rank may fail on the data it was sent: the ledger has the cause.
      if (feed.evidenceAt !== null) {
        for (const r of gone) {
          dead.add(r);
          working[r] = null;
        }
        return settle();
      }
      failure('crash', gone, cause, now());
    };

    workers.forEach((w, t) => {
      const ranks = hosted[t]!;
      /** What a crash or an exit of this thread says about its other ranks, which end with it. */
      const others = (rank: number) => (ranks.length > 1 ? `; its worker thread, which ended with it, also hosted ${rankWord(ranks.filter((r) => r !== rank))}` : '');
      w.on('message', (m: unknown) => {
        if (done) return;
        // A rank names itself in every message; one that is not this thread's is not to be trusted.
        const rank = (m as { rank?: unknown } | null)?.rank;
        const from = ranks.includes(rank as number) ? (rank as number) : ranks[0]!;
        // A worker's message that does not make sense must not take the supervisor down.
        try {
          if (from !== rank) throw new Error(`it names rank ${String(rank)}, which this worker thread does not host`);
          handle(m as WorkerMessage);
        } catch (err) {
          failure('violation', [from], `rank ${from} sent the supervisor a message it cannot use (${describeMessage(m)}): ${(err as Error).message}`, now());
        }
      });
      w.on('error', (err) => {
        // The thread names the rank whose task threw; anything else (its start) is the whole thread's.
        const named = (err as { rank?: unknown }).rank as number;
        const rank = ranks.length === 1 ? ranks[0]! : ranks.includes(named) ? named : null;
        if (rank !== null) died([rank], `rank ${rank} crashed: ${err.message}${others(rank)}; every rank was aborted`);
        else died(ranks, `the worker thread of ${rankWord(ranks)} crashed: ${err.message}; every rank was aborted`);
      });
      w.on('exit', (code) => died(ranks, `${rankWord(ranks)} exited (code ${code}) before finishing ${ranks.length > 1 ? 'their' : 'its'} step; every rank was aborted`));
    });

    // One MessageChannel per pair of threads whose ranks share a communicator.
    const links: Record<number, MessagePort>[] = workers.map(() => ({}));
    for (const c of comms) {
      const threads = new Set(c.members.map((r) => threadOfRank(r, ranksPerThread)));
      for (const a of threads) {
        for (const b of threads) {
          if (a >= b || links[a]![b]) continue;
          const { port1, port2 } = new MessageChannel();
          links[a]![b] = port1;
          links[b]![a] = port2;
        }
      }
    }
    workers.forEach((w, t) => w.postMessage({ type: 'start', links: links[t] }, Object.values(links[t]!)));
  });
}

/** A report input from a worker-thread run: its diagnosis, ledger, paths and wall-clock trace. */
export function reportFromRun(scenario: Scenario, run: Pick<RuntimeResult, 'diagnosis' | 'ledger' | 'paths' | 'trace'>): ReportInput {
  return { scenario, diagnosis: run.diagnosis, ledger: run.ledger, paths: run.paths, trace: run.trace, routing: routingOf(scenario), clock: 'real' };
}
