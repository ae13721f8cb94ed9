// What a launched rank keeps of its run (`ep-actors rank` writes it next to its results),
// and the merge of every rank's record into the report a simulation gives: the ranks'
// collectives replayed through the same CollectiveTracker the supervisor keeps, so a
// production run gets the same ledger, verdict, diagnosis and HTML report.
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { rankMachine } from '../machines/rankMachine.js';
import { LedgerFeed } from '../machines/feed.js';
import { CollectiveSpans } from '../machines/spans.js';
import { diagnoseHangs, okDiagnosis, rankReports, type Diagnosis } from '../machines/diagnosis.js';
import { startRank, type RankSnapshot } from '../machines/protocol.js';
import { rankConfig, validateScenario, type Scenario } from '../machines/scenario.js';
import { worldSize } from '../machines/mesh.js';
import type { ReportInput } from '../machines/record.js';
import type { ReportRouting } from '../machines/routing.js';
import type { SnapshotWire, WorkerMessage } from './messages.js';

export const RANK_RECORD_VERSION = 1;

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
  const ranks = records.map((r) => r.rank).sort((a, b) => a - b);
  if (ranks.length !== n || ranks.some((r, i) => r !== i)) throw new RankRecordError(`the records are of ranks ${ranks.join(', ')}; the scenario has ranks 0..${n - 1}, one record each`);
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
      if (!c || typeof c !== 'object' || (c.comm !== 'ep' && c.comm !== 'dp') || typeof c.op !== 'string' || !Number.isSafeInteger(c.layer) || !Number.isSafeInteger(c.microBatch)) return 'is an issue without a valid collective';
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
    return replay(records);
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
  const feed = new LedgerFeed({ ep: s.ep, dp: s.dp }, { issued: (e, at) => spans.issue(e, at) });
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
  if (hangs.length > 0) diagnosis = { ...diagnoseHangs(hangs, snapshots, tracker), ...(detectedAfterMs === undefined ? {} : { detectedAfterMs }) };
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

/** Each rank's machine where its last message left it (its start state if it sent none). */
export function rankSnapshots(s: Scenario, wires: readonly (SnapshotWire | null)[]): RankSnapshot[] {
  return wires.map((w, rank) => (w ? rankMachine.resolveState({ value: w.value as never, context: w.context }) : startRank(rankConfig(s, rank))));
}

function routingOfRecords(records: readonly RankRecord[], s: Scenario): ReportRouting {
  const rowsPerExpert = new Array<number>(s.experts).fill(0);
  for (const r of records) r.rowsPerExpert.forEach((c, e) => (rowsPerExpert[e]! += c));
  return { sendRows: records.map((r) => r.sendRows), rowsPerExpert };
}

/** Every rank{r}.record.json in `dir` (as `ep-actors rank --out-dir` leaves them), checked and merged. */
export async function mergeRankRecordsIn(dir: string): Promise<ReportInput> {
  let names: string[];
  try {
    names = (await readdir(dir)).filter((f) => /^rank\d+\.record\.json$/.test(f)).sort();
  } catch (e) {
    throw new RankRecordError(`cannot read ${dir}: ${(e as Error).message}`);
  }
  if (names.length === 0) throw new RankRecordError(`${dir}: no rank{r}.record.json files (ep-actors rank --out-dir writes them)`);
  const paths = names.map((f) => join(dir, f));
  const values = await Promise.all(
    paths.map(async (path) => {
      try {
        return JSON.parse(await readFile(path, 'utf8')) as unknown;
      } catch (e) {
        throw new RankRecordError(`${path}: ${(e as Error).message}`);
      }
    }),
  );
  return mergeRankRecords(checkRankRecords(values, paths));
}
