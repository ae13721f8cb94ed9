// The supervisor (main thread): spawns one worker thread per rank, wires a MessagePort
// per pair of ranks that share a communicator, feeds the ranks' reports to the collective
// tracker (machines/feed.ts, as every engine does), and ends the run with a verdict:
// - at quiescence (every rank blocked in a collective or finished), the tracker's hangs
//   (mismatch, missing, cycle), or ok when every rank finished;
// - crash (a worker threw or exited), a protocol violation, or a corrupt message, at once;
// - stall: a rank's own work (routing, expert compute) has not returned for the compute
//   limit — the ranks waiting for it are not hung, they wait for a compute;
// - timeout: a collective every member issued has not completed on a rank for the
//   collective limit (bytes that never arrive).
// Every worker is terminated before the result is returned: no thread outlives a run.
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
import { now, type Fault, type SnapshotWire, type WorkerJob, type WorkerMessage } from './messages.js';
import { PendingArrivals } from './arrivals.js';
import { rankSnapshots } from './rankRecord.js';
import type { ReportInput } from '../machines/record.js';
import { routingOf } from '../machines/routing.js';

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
 * From this many ranks on, each rank worker's young generation is capped at
 * YOUNG_GENERATION_MB: V8 lets every isolate's grow to several MB, which a run pays once per
 * rank (sim at ep=64: peak RSS 1000–1073 MB by default, 955–964 MB capped at 2 MB, CPU time
 * the same within the noise). Smaller runs keep V8's default, which the EP-step benchmarks
 * were measured with.
 */
const MANY_WORKERS = 32;
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
  const workers = Array.from({ length: n }, (_, rank) => {
    const job: WorkerJob = {
      rank, scenario: s, casePayload: opts.casePayloads?.[rank], backend, exchange, device: gpu?.devices[rank], ncclId: gpu?.ncclIds[commOf(s, rank, 'ep')],
      faults: opts.faults ?? [], inspect: !!opts.onInspect, steps: opts.steps ?? 1, record,
    };
    return new Worker(WORKER_URL, { workerData: job, ...(n >= MANY_WORKERS && { resourceLimits: { maxYoungGenerationSizeMb: YOUNG_GENERATION_MB } }) });
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
    const died = (rank: number, cause: string) => {
      if (done || tracker.isFinished(rank)) return;
      // After a proved divergence a rank may fail on the data it was sent: the ledger has the cause.
      if (feed.evidenceAt !== null) {
        dead.add(rank);
        working[rank] = null;
        return settle();
      }
      failure('crash', [rank], cause, now());
    };

    workers.forEach((w, rank) => {
      w.on('message', (m: unknown) => {
        if (done) return;
        // A worker's message that does not make sense must not take the supervisor down.
        try {
          handle(m as WorkerMessage);
        } catch (err) {
          failure('violation', [rank], `rank ${rank} sent the supervisor a message it cannot use (${describeMessage(m)}): ${(err as Error).message}`, now());
        }
      });
      w.on('error', (err) => died(rank, `rank ${rank} crashed: ${err.message}; every rank was aborted`));
      w.on('exit', (code) => died(rank, `rank ${rank} exited (code ${code}) before finishing its step; every rank was aborted`));
    });

    // One MessageChannel per pair of ranks that share a communicator.
    const ports: Record<number, MessagePort>[] = Array.from({ length: n }, () => ({}));
    for (const c of comms) {
      for (const a of c.members) {
        for (const b of c.members) {
          if (a >= b || ports[a]![b]) continue;
          const { port1, port2 } = new MessageChannel();
          ports[a]![b] = port1;
          ports[b]![a] = port2;
        }
      }
    }
    workers.forEach((w, rank) => w.postMessage({ type: 'start', ports: ports[rank] }, Object.values(ports[rank]!)));
  });
}

/** A report input from a worker-thread run: its diagnosis, ledger, paths and wall-clock trace. */
export function reportFromRun(scenario: Scenario, run: Pick<RuntimeResult, 'diagnosis' | 'ledger' | 'paths' | 'trace'>): ReportInput {
  return { scenario, diagnosis: run.diagnosis, ledger: run.ledger, paths: run.paths, trace: run.trace, routing: routingOf(scenario), clock: 'real' };
}
