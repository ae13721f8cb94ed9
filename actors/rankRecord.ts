// What a launched rank keeps of its run (`ep-actors rank` writes it next to its results),
// and the merge of every rank's record into the report a simulation gives: the ranks'
// collectives replayed through the same CollectiveTracker the supervisor keeps, so a
// production run gets the same ledger, verdict, diagnosis and HTML report.
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { rankMachine } from '../machines/rankMachine.js';
import { LedgerFeed } from '../machines/feed.js';
import { CollectiveSpans } from '../machines/spans.js';
import { diagnoseHangs, okDiagnosis, rankReports, rankWord, type Diagnosis } from '../machines/diagnosis.js';
import { withDeadRanks } from '../machines/postmortem.js';
import { startRank, type RankSnapshot } from '../machines/snapshot.js';
import { rankConfig, validateScenario, type Scenario } from '../machines/scenario.js';
import { commOf, communicators, COMM_KINDS, worldSize } from '../machines/mesh.js';
import type { ReportInput } from '../machines/record.js';
import type { ReportRouting } from '../machines/routing.js';
import type { SnapshotWire, WorkerMessage } from './messages.js';

export const RANK_RECORD_VERSION = 1;

/** How a launched rank's reason begins when its own compute limit stopped it (actors/launch.ts). */
export const STALL = 'stall: ';

export interface RankRecord {
  readonly epActorsRankRecord: typeof RANK_RECORD_VERSION;
  readonly rank: number;
  readonly scenario: Scenario;
  /** This rank's share of the report's routing: its row of sendRows and the rows it routed to each expert. */
  readonly sendRows: readonly number[];
  readonly rowsPerExpert: readonly number[];
  /** What its rank machine reported, in order (issue, completed, paths, finished), times in ms since the epoch. */
  readonly messages: readonly WorkerMessage[];
  /** Why the rank stopped, when it did not finish, and when (ms since the epoch). */
  readonly stopped?: string;
  readonly stoppedAt?: number;
  /** Connections refused by the hello (another job's rank, a stranger, a wrong secret): when, the other end's address, and the one-line reason. */
  readonly refused?: readonly { readonly at: number; readonly from: string; readonly line: string }[];
}

export class RankRecordError extends Error {
  override name = 'RankRecordError';
}

/** Checks what a file claims to be a set of rank records (it came from disk: trust nothing). */
export function checkRankRecords(values: readonly unknown[], names: readonly string[]): RankRecord[] {
  const records = values.map((v, i) => {
    const r = v as Partial<RankRecord> | null;
    if (!r || r.epActorsRankRecord !== RANK_RECORD_VERSION || !Number.isSafeInteger(r.rank) || !Array.isArray(r.messages) || !Array.isArray(r.sendRows) || !Array.isArray(r.rowsPerExpert)) {
      throw new RankRecordError(`${names[i]}: not an ep-actors rank record (version ${RANK_RECORD_VERSION})`);
    }
    try {
      validateScenario(r.scenario ?? {});
    } catch (err) {
      throw new RankRecordError(`${names[i]}: its scenario is invalid: ${(err as Error).message}`);
    }
    r.messages.forEach((m, k) => {
      const why = messageProblem(m);
      if (why) throw new RankRecordError(`${names[i]}: message ${k} ${why}`);
    });
    return r as RankRecord;
  });
  if (records.length === 0) throw new RankRecordError('no rank records to merge');
  const s = JSON.stringify(records[0]!.scenario);
  const n = worldSize(records[0]!.scenario);
  records.forEach((r, i) => {
    if (JSON.stringify(r.scenario) !== s) throw new RankRecordError(`${names[i]}: rank ${r.rank} ran another scenario than ${names[0]}`);
  });
  // A rank with no record died before writing it: the merge names it (a crash), so only strays and doubles are refused here.
  const seen = new Map<number, string>();
  records.forEach((r, i) => {
    if (r.rank < 0 || r.rank >= n) throw new RankRecordError(`${names[i]}: rank ${r.rank} is outside the scenario's ranks 0..${n - 1}`);
    if (seen.has(r.rank)) throw new RankRecordError(`${names[i]} and ${seen.get(r.rank)} are both records of rank ${r.rank}`);
    seen.set(r.rank, names[i]!);
  });
  return records.slice().sort((a, b) => a.rank - b.rank);
}

/** What is wrong with a recorded message, or null: enough for the replay to rely on its fields. */
function messageProblem(v: unknown): string | null {
  const m = v as Partial<Record<string, unknown>> | null;
  if (!m || typeof m !== 'object') return 'is not an object';
  const snapshot = (w: unknown) => !!w && typeof w === 'object' && 'value' in w && !!(w as SnapshotWire).context && typeof (w as SnapshotWire).context === 'object';
  switch (m.type) {
    case 'issue': {
      const c = m.collective as Partial<Record<string, unknown>> | null;
      if (!c || typeof c !== 'object' || !COMM_KINDS.includes(c.comm as never) || typeof c.op !== 'string' || !Number.isSafeInteger(c.layer) || !Number.isSafeInteger(c.microBatch)) return 'is an issue without a valid collective';
      if (typeof m.dtype !== 'string' || typeof m.at !== 'number' || !snapshot(m.snapshot)) return 'is an issue without its dtype, time or machine snapshot';
      return null;
    }
    case 'completed':
      return typeof m.at === 'number' ? null : 'is a completion without a time';
    case 'paths':
      return Array.isArray(m.paths) && m.paths.every((p) => typeof p === 'string') ? null : 'has paths that are not strings';
    case 'finished':
      return typeof m.at === 'number' && snapshot(m.snapshot) ? null : 'is a finish without its time or machine snapshot';
    default:
      return `has unknown type ${JSON.stringify(m.type)}`;
  }
}

/**
 * Replays every rank's reports through the ledger feed every engine uses: the tracker's
 * hangs at the end are the verdict; with none, every rank finishing is ok.
 */
export function mergeRankRecords(records: readonly RankRecord[]): ReportInput {
  try {
    const s = records[0]!.scenario;
    const dead = Array.from({ length: worldSize(s) }, (_, r) => r).filter((r) => !records.some((x) => x.rank === r));
    const input = replay([...records, ...dead.map((r) => deadRankRecord(r, records))].sort((a, b) => a.rank - b.rank));
    return { ...input, diagnosis: withDeadRanks(input.diagnosis, dead, input.ledger, communicators(s), 'rank record') };
  } catch (err) {
    // A machine snapshot no rank machine could have written, say: name it, do not crash.
    if (err instanceof RankRecordError) throw err;
    throw new RankRecordError(`the records do not replay: ${(err as Error).message}`);
  }
}

function replay(records: readonly RankRecord[]): ReportInput {
  const s = records[0]!.scenario;
  const n = worldSize(s);
  const wires: (SnapshotWire | null)[] = new Array(n).fill(null);
  // reduce, not Math.min(...): a long run's records hold more times than a call takes arguments
  const t0 = records.reduce((t, r) => r.messages.reduce((u, m) => ('at' in m ? Math.min(u, m.at) : u), t), Infinity);
  const spans = new CollectiveSpans(t0);
  // Each rank's reports in its own order through the feed every engine uses; the order of
  // ranks does not matter to what the tracker ends with.
  const feed = new LedgerFeed(s, { issued: (e, at) => spans.issue(e, at) });
  const tracker = feed.tracker;
  for (const r of records) {
    for (const m of r.messages) {
      if (m.type === 'issue') {
        wires[r.rank] = m.snapshot;
        feed.push({ kind: 'issue', rank: r.rank, collective: m.collective, dtype: m.dtype, at: m.at });
      } else if (m.type === 'completed') spans.complete(r.rank, m.at);
      else if (m.type === 'finished') {
        wires[r.rank] = m.snapshot;
        feed.push({ kind: 'finish', rank: r.rank, at: m.at });
      }
    }
  }
  const snapshots = rankSnapshots(s, wires);
  const stopped = records.filter((r) => r.stopped !== undefined);
  const hangs = tracker.hangs();
  let diagnosis: Diagnosis;
  // How long after the evidence existed the first rank stopped on its own (one clock on one machine; across nodes, up to their skew).
  const firstStop = Math.min(...stopped.flatMap((r) => (r.stoppedAt === undefined ? [] : [r.stoppedAt])));
  const evidence = feed.evidenceAt ?? (hangs.length > 0 ? feed.lastAt : null);
  const detectedAfterMs = evidence !== null && Number.isFinite(firstStop) && firstStop >= evidence ? firstStop - evidence : undefined;
  // A rank that stopped on its own compute limit, neither blocked nor finished: its peers only
  // wait for it, and the stall is the finding, as on every engine.
  const stalled = stopped.filter((r) => r.stopped!.startsWith(STALL) && !tracker.blockedOn(r.rank) && !tracker.isFinished(r.rank));
  if (stalled.length > 0) {
    const waiters = records.filter((r) => tracker.blockedOn(r.rank)).map((r) => r.rank);
    const what = stalled.map((r) => r.stopped!.slice(STALL.length)).join('; ');
    diagnosis = { verdict: 'stall', communicator: null, position: null, culprits: stalled.map((r) => r.rank), ranks: rankReports(snapshots, tracker), cause: `${what}${waiters.length ? `; ${rankWord(waiters)} wait for it in their collectives, which is not a hang of theirs` : ''}` };
  } else if (hangs.length > 0) diagnosis = { ...diagnoseHangs(hangs, snapshots, tracker), ...(detectedAfterMs === undefined ? {} : { detectedAfterMs }) };
  else if (records.every((r) => tracker.isFinished(r.rank))) diagnosis = okDiagnosis(snapshots, tracker);
  else {
    const why = stopped.map((r) => `rank ${r.rank}: ${r.stopped}`).join('; ');
    diagnosis = { verdict: 'timeout', communicator: null, position: null, culprits: stopped.map((r) => r.rank), ranks: rankReports(snapshots, tracker), cause: `the records end without a proof of a hang${why ? `; ${why}` : ''}` };
  }
  const last = records.reduce((t, r) => r.messages.reduce((u, m) => ('at' in m ? Math.max(u, m.at) : u), t), t0);
  return {
    scenario: s,
    diagnosis,
    ledger: tracker.entries,
    paths: records.map((r) => r.messages.flatMap((m) => (m.type === 'paths' ? m.paths : []))),
    trace: spans.close(last),
    routing: routingOfRecords(records, s),
    clock: 'real',
  };
}

/**
 * What a rank that left no record must have done: every collective its peers completed
 * needed it, so it issued those (its all-to-all splits are its peers' seen from its side),
 * in the order its peers issued them, and nothing after: there its peers wait for it.
 */
function deadRankRecord(dead: number, records: readonly RankRecord[]): RankRecord {
  const s = records[0]!.scenario;
  const mesh = s;
  const specs = communicators(mesh).filter((c) => c.members.includes(dead));
  /** Per communicator and position: each live member's issue, and whether it completed. */
  type Seen = { member: number; m: Extract<WorkerMessage, { type: 'issue' }>; completed: boolean };
  const seen = new Map<string, Seen[]>();
  for (const r of records) {
    const positions = new Map<string, number>();
    // A rank's collectives complete in order: a completion belongs to its latest issue.
    let latest: Seen | null = null;
    for (const m of r.messages) {
      if (m.type === 'completed' && latest) latest.completed = true;
      if (m.type !== 'issue') continue;
      latest = null;
      const comm = commOf(mesh, r.rank, m.collective.comm);
      const spec = specs.find((c) => c.id === comm);
      if (!spec) continue;
      const p = positions.get(comm) ?? 0;
      positions.set(comm, p + 1);
      const key = `${comm}#${p}`;
      latest = { member: spec.members.indexOf(r.rank), m, completed: false };
      seen.set(key, [...(seen.get(key) ?? []), latest]);
    }
  }
  const start = startRank(rankConfig(s, dead));
  const snapshot: SnapshotWire = { value: start.value, context: start.context };
  const issues: { at: number; m: WorkerMessage }[] = [];
  for (const spec of specs) {
    const me = spec.members.indexOf(dead);
    for (let p = 0; seen.get(`${spec.id}#${p}`)?.some((x) => x.completed); p++) {
      const peers = seen.get(`${spec.id}#${p}`)!;
      const c = peers[0]!.m.collective;
      const splits = (from: 'sendSplits' | 'recvSplits') => (c[from] ? spec.members.map((_, j) => peers.find((x) => x.member === j)?.m.collective[from]?.[me] ?? 0) : null);
      const at = Math.max(...peers.map((x) => x.m.at));
      const collective = { ...c, sendSplits: splits('recvSplits'), recvSplits: splits('sendSplits'), why: [] };
      issues.push({ at, m: { type: 'issue', rank: dead, collective, dtype: peers[0]!.m.dtype, snapshot, at } }, { at, m: { type: 'completed', rank: dead, op: c.op, next: 'unknown: it left no record', at } });
    }
  }
  issues.sort((a, b) => a.at - b.at);
  return { epActorsRankRecord: RANK_RECORD_VERSION, rank: dead, scenario: s, sendRows: new Array<number>(s.ep).fill(0), rowsPerExpert: new Array<number>(s.experts).fill(0), messages: issues.map((x) => x.m) };
}

/** Each rank's machine where its last message left it (its start state if it sent none). */
export function rankSnapshots(s: Scenario, wires: readonly (SnapshotWire | null)[]): RankSnapshot[] {
  return wires.map((w, rank) => (w ? rankMachine.resolveState({ value: w.value as never, context: w.context }) : startRank(rankConfig(s, rank))));
}

function routingOfRecords(records: readonly RankRecord[], s: Scenario): ReportRouting {
  const rowsPerExpert = new Array<number>(s.experts).fill(0);
  for (const r of records) r.rowsPerExpert.forEach((c, e) => (rowsPerExpert[e]! += c));
  return { sendRows: records.map((r) => r.sendRows), rowsPerExpert };
}

/** A rank record's file name, as `ep-actors rank --out-dir` writes it. */
export const RANK_RECORD_NAME = /^rank\d+\.record\.json$/;

/** Every rank{r}.record.json in `dir` (as `ep-actors rank --out-dir` leaves them), checked and merged. */
export async function mergeRankRecordsIn(dir: string): Promise<ReportInput> {
  let names: string[];
  try {
    names = (await readdir(dir)).filter((f) => RANK_RECORD_NAME.test(f)).sort();
  } catch (e) {
    throw new RankRecordError(`cannot read ${dir}: ${(e as Error).message}`);
  }
  if (names.length === 0) throw new RankRecordError(`${dir}: no rank{r}.record.json files (ep-actors rank --out-dir writes them)`);
  return mergeRankRecords(await readRankRecords(names.map((f) => join(dir, f))));
}

/** Rank record files, read and checked. */
export async function readRankRecords(paths: readonly string[]): Promise<RankRecord[]> {
  const values = await Promise.all(
    paths.map(async (path) => {
      try {
        return JSON.parse(await readFile(path, 'utf8')) as unknown;
      } catch (e) {
        throw new RankRecordError(`${path}: ${(e as Error).message}`);
      }
    }),
  );
  return checkRankRecords(values, paths);
}
