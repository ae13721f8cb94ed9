// The supervisor (main thread): spawns one worker thread per rank, wires a MessagePort
// per pair of ranks that share a communicator, keeps the ledger through the shared
// CollectiveTracker, and ends the run with a verdict the moment the evidence exists:
// mismatch, missing, cycle (machines/ledger.ts), crash (a worker threw or exited), a
// protocol violation or a corrupt message, or timeout (no progress and no proof). Every
// worker is terminated before the result is returned: no thread outlives a run.
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import { CollectiveTracker, commOf, communicators, type Finding, type LedgerEntry } from '../machines/ledger.js';
import { diagnose, okDiagnosis, rankReports, type Diagnosis, type VerdictKind } from '../machines/diagnosis.js';
import type { IssuedCollective, RankSnapshot } from '../machines/protocol.js';
import { worldSize, type Scenario } from '../sim/scenario.js';
import type { TraceEvent } from '../sim/report/input.js';
import { gpuPlacement, type BackendName, type ExchangeName } from '../src/backends.js';
import { now, type Fault, type SnapshotWire, type WorkerJob, type WorkerMessage } from './messages.js';
import { rankSnapshots } from './rankRecord.js';

export interface RuntimeOptions {
  backend?: BackendName;
  /** How all-to-all data moves between ranks (default: msgpack over MessagePorts). */
  exchange?: ExchangeName;
  faults?: readonly Fault[];
  /** No message from any rank for this long, without proof of a hang: `timeout` (default 10 s). */
  timeoutMs?: number;
  /** Per rank, msgpack of a CaseRankJob (ranks compute on these instead of generated inputs). */
  casePayloads?: readonly Uint8Array[];
  /** Receives every xstate inspection event of every rank. */
  onInspect?: (rank: number, event: unknown) => void;
  /** Called for every collective a rank issues, in ledger order (progress display). */
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

function describeMessage(m: unknown): string {
  const type = m && typeof m === 'object' && 'type' in m ? String((m as { type: unknown }).type) : typeof m;
  return `type ${type}`;
}
/** Quiet time before a wait-for cycle seen by the supervisor counts as proved. */
const CYCLE_QUIET_MS = 5;
/** After a verdict, how long peers' in-flight messages may still update the diagnosis. */
const SETTLE_MS = 15;

export async function runActors(s: Scenario, opts: RuntimeOptions = {}): Promise<RuntimeResult> {
  const n = worldSize(s);
  const t0 = now();
  const record = opts.record ?? true;
  const tracker = new CollectiveTracker({ ep: s.ep, dp: s.dp }, record);
  const stepMs: number[] = [];
  const wires: (SnapshotWire | null)[] = new Array(n).fill(null);
  const paths: string[][] = Array.from({ length: n }, () => []);
  const results: (Uint8Array | undefined)[] = new Array(n).fill(undefined);
  const trace: TraceEvent[] = [];
  const openSpans = new Map<number, { name: string; ts: number; args: TraceEvent['args'] }>();
  const finished = new Set<number>();
  const us = (at: number) => Math.round((at - t0) * 1000);

  const backend = opts.backend ?? 'ts';
  const exchange = opts.exchange ?? 'ports';
  const comms = communicators({ ep: s.ep, dp: s.dp });
  const gpu = await gpuPlacement(backend, exchange, n, comms.filter((c) => c.kind === 'ep').map((c) => c.id));
  const workers = Array.from({ length: n }, (_, rank) => {
    const job: WorkerJob = {
      rank, scenario: s, casePayload: opts.casePayloads?.[rank], backend, exchange, device: gpu?.devices[rank], ncclId: gpu?.ncclIds[commOf({ ep: s.ep, dp: s.dp }, rank, 'ep')],
      faults: opts.faults ?? [], inspect: !!opts.onInspect, steps: opts.steps ?? 1, record,
    };
    return new Worker(WORKER_URL, { workerData: job });
  });
  const exited = workers.map((w) => new Promise<void>((resolve) => w.once('exit', () => resolve())));

  const snapshots = (): RankSnapshot[] => rankSnapshots(s, wires);

  return new Promise<RuntimeResult>((resolve) => {
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    let pendingTransportError: NodeJS.Timeout | undefined;
    let pendingCycle: NodeJS.Timeout | undefined;
    // Workers post to the supervisor over separate queues, so a rank's next issue can arrive
    // before a peer's issue that completed the rank's previous collective. A rank's messages
    // wait here until the tracker has seen that collective complete.
    const deferred = new Map<number, WorkerMessage[]>();
    // Mismatch and missing are proved by each rank's own ordered messages; a cycle is proved
    // only on a quiet, complete view, so it is confirmed after a short pause with no messages.
    const confirmCycle = () => {
      clearTimeout(pendingCycle);
      if (deferred.size > 0 || !tracker.findCycle()) return;
      const seen = now();
      pendingCycle = setTimeout(() => {
        const cycle = deferred.size === 0 ? tracker.findCycle() : null;
        if (cycle) verdict(cycle, seen);
      }, CYCLE_QUIET_MS);
    };

    const end = (diagnosis: Diagnosis) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearTimeout(pendingTransportError);
      clearTimeout(pendingCycle);
      // Collectives still waiting when the run ended last until its end.
      for (const [rank, span] of openSpans) trace.push({ name: span.name, ph: 'X', ts: span.ts, dur: us(now()) - span.ts, pid: 0, tid: rank, args: span.args });
      for (const w of workers) void w.terminate();
      void Promise.all(exited).then(() => resolve({ diagnosis, ledger: tracker.entries, trace, paths, results, stepMs, wallMs: now() - t0 }));
    };
    // The verdict is fixed the moment it is proved; the diagnosis is written a few ms later,
    // once the peers' in-flight messages show where each of them ended up.
    let decided = false;
    const verdict = (finding: Finding, decidedAt: number) => {
      if (decided) return;
      decided = true;
      const detectedAfterMs = now() - decidedAt;
      setTimeout(() => end({ ...diagnose(finding, snapshots(), tracker), detectedAfterMs }), SETTLE_MS);
    };
    const failure = (kind: VerdictKind, rank: number | null, cause: string, decidedAt: number) => {
      if (decided) return;
      const d: Diagnosis = { verdict: kind, communicator: null, position: null, culprits: rank === null ? [] : [rank], ranks: rankReports(snapshots(), tracker), cause, detectedAfterMs: now() - decidedAt };
      end(d);
    };
    const armTimeout = () => {
      clearTimeout(timer);
      const ms = opts.timeoutMs ?? 10_000;
      timer = setTimeout(() => {
        const blocked = [...Array(n).keys()].flatMap((r) => {
          const e = tracker.blockedOn(r);
          return e ? [`rank ${r} in ${e.op} (${e.communicator}, position ${e.position})`] : [];
        });
        failure('timeout', null, `no rank made progress for ${ms} ms and no deadlock was proved${blocked.length ? `; blocked: ${blocked.join(', ')}` : ''}`, now());
      }, ms);
    };

    const onMessage = (m: WorkerMessage) => {
      if (done) return;
      if (decided) {
        // Only bookkeeping now: the verdict stands.
        if (m.type === 'issue' && !tracker.blockedOn(m.rank)) {
          wires[m.rank] = m.snapshot;
          tracker.issue(m.rank, m.collective, m.dtype);
        } else if (m.type === 'paths') paths[m.rank]!.push(...m.paths);
        return;
      }
      armTimeout();
      clearTimeout(pendingCycle);
      if ((m.type === 'issue' || m.type === 'finished') && (tracker.blockedOn(m.rank) || deferred.has(m.rank))) {
        deferred.set(m.rank, [...(deferred.get(m.rank) ?? []), m]);
        return;
      }
      handle(m);
      confirmCycle();
    };
    const release = (ranks: readonly number[]) => {
      for (const r of ranks) {
        const queue = deferred.get(r);
        if (!queue) continue;
        deferred.delete(r);
        for (const m of queue) {
          if (done) return;
          if (tracker.blockedOn(r) || deferred.has(r)) deferred.set(r, [...(deferred.get(r) ?? []), m]);
          else handle(m);
        }
      }
    };

    const handle = (m: WorkerMessage) => {
      switch (m.type) {
        case 'paths':
          paths[m.rank]!.push(...m.paths);
          return;
        case 'inspect':
          opts.onInspect?.(m.rank, m.event);
          return;
        case 'issue': {
          wires[m.rank] = m.snapshot;
          const c = m.collective;
          const issued = tracker.issue(m.rank, c, m.dtype);
          opts.onIssue?.(m.rank, c);
          openSpans.set(m.rank, { name: c.op, ts: us(m.at), args: { communicator: issued.entry.communicator, position: issued.entry.position, layer: c.layer, microBatch: c.microBatch } });
          if (issued.finding) return verdict(issued.finding, m.at);
          if (issued.completed) release(issued.completed.map((e) => e.rank));
          return;
        }
        case 'step':
          stepMs[m.step] = Math.max(stepMs[m.step] ?? 0, m.ms);
          return;
        case 'completed': {
          const span = openSpans.get(m.rank);
          if (span && record) trace.push({ name: span.name, ph: 'X', ts: span.ts, dur: Math.max(0, us(m.at) - span.ts), pid: 0, tid: m.rank, args: span.args });
          openSpans.delete(m.rank);
          return;
        }
        case 'finished': {
          wires[m.rank] = m.snapshot;
          results[m.rank] = m.result;
          finished.add(m.rank);
          const finding = tracker.finish(m.rank);
          if (finding) return verdict(finding, m.at);
          if (finished.size === n) {
            const open = tracker.openPositions();
            if (open.length === 0) return end(okDiagnosis(snapshots(), tracker));
            failure('missing', null, `every rank finished but positions were left open: ${JSON.stringify(open)}`, m.at);
          }
          return;
        }
        case 'violation':
          wires[m.rank] = m.snapshot;
          return failure('violation', m.rank, `protocol violation: ${m.message}`, m.at);
        case 'transport-error':
          // The ledger usually proves the same divergence from the issue messages, and says
          // more; give those a moment to arrive before reporting the bare transport error.
          pendingTransportError ??= setTimeout(() => failure('violation', m.rank, `bad message between actors: ${m.message}`, m.at), 20);
          return;
      }
    };

    workers.forEach((w, rank) => {
      w.on('message', (m: unknown) => {
        // A worker's message that does not make sense must not take the supervisor down.
        try {
          onMessage(m as WorkerMessage);
        } catch (err) {
          failure('violation', rank, `rank ${rank} sent the supervisor a message it cannot use (${describeMessage(m)}): ${(err as Error).message}`, now());
        }
      });
      w.on('error', (err) => {
        if (!done && !decided) failure('crash', rank, `rank ${rank} crashed: ${err.message}; every rank was aborted`, now());
      });
      w.on('exit', (code) => {
        if (!done && !decided && !finished.has(rank)) failure('crash', rank, `rank ${rank} exited (code ${code}) before finishing its step; every rank was aborted`, now());
      });
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
    armTimeout();
  });
}
