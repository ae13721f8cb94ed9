// `ep-actors diagnose PATH…`: post-mortem evidence of a run — PyTorch Flight Recorder dumps
// or ep-actors rank records — through the collective tracker and diagnosis a simulation
// uses, to the same verdict, explanation and HTML report. `viz report --ranks` renders
// through here too.
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { helpAsked, parse } from './args.js';
import { UsageError } from '../src/errors.js';
import { formatDiagnosis, type Diagnosis, type HangSummary, type RankReport, type VerdictKind } from '../machines/diagnosis.js';
import type { LedgerEntry } from '../machines/ledger.js';
import { mergeRankRecords, RANK_RECORD_NAME, RankRecordError, readRankRecords } from '../actors/rankRecord.js';
import { analyzeDumps } from '../sim/postmortem/analyze.js';
import { DUMP_NAME, EvidenceError, readDump } from '../sim/postmortem/flightRecorder.js';
import { renderReport } from '../sim/report/html.js';
import { toTraceFile } from '../sim/report/input.js';
import type { ReportInput } from '../machines/record.js';

const HELP = `usage: ep-actors diagnose PATH... [--json] [--html OUT.html] [--trace OUT.json]

Reads what a finished or hung run left behind, one file per rank, and explains it with the
collective tracker and diagnosis a simulation uses:

  PyTorch Flight Recorder dumps   nccl_trace_rank_<r> (any <prefix><rank>): pickle as torch
                                  writes it (protocol 2) or Python re-pickles it (4, 5), or
                                  JSON (_dump_nccl_trace_json). To get them from a job:
                                    TORCH_NCCL_TRACE_BUFFER_SIZE=2000   record (TORCH_FR_BUFFER_SIZE
                                                                        in newer torch)
                                    TORCH_NCCL_DUMP_ON_TIMEOUT=1        dump when the watchdog fires
                                    TORCH_NCCL_DEBUG_INFO_TEMP_FILE=/shared/fr/nccl_trace_rank_
                                                                        where (TORCH_FR_DUMP_TEMP_FILE)
                                  then: ep-actors diagnose /shared/fr
  ep-actors rank records          rank<r>.record.json, written by \`ep-actors rank --out-dir\`

PATH is a folder (every dump or record in it) or files. Process groups are told apart by
name and member set; ranks are aligned on what every ring buffer still holds; each group's
n-th collectives are checked as NCCL pairs them (op, sizes by the per-op rules, dtypes,
state, all-to-all totals, send/recv pairs); a collective that some ranks never issued, a
wait-for cycle across groups (a collective scheduled behind a started one waits for it) and
a rank with no dump (it died) are found too. Groups with the EP layer's all-to-all shapes
are read as the rank machine's ops (fwd.counts, fwd.dispatch, fwd.expert_ids, fwd.combine,
bwd.combine, bwd.dispatch) and layers, so the cause names the op and layer a rank skipped
and the hazard behind it.

output: the verdict (ok, mismatch, missing, cycle, crash, timeout: no proof of a hang), the
group and position, the culprit ranks, the cause, and where every rank stopped.
  --json      one JSON object: {verdict, communicator, position, seq, op, layer, culprits,
              ranks, cause, hangs}; seq is the dump's collective_seq_id (null for rank
              records), position the 0-based position in the group's ledger from where the
              ranks align, hangs every hung group as \`sim --json\` lists them (the verdict's
              first: {verdict, communicator, position, culprits, detail})
  --html F    the self-contained HTML report a simulation writes (ledger per group,
              timeline, wait-for graph)
  --trace F   the merged Chrome trace (opens in Perfetto)

exit codes: 0 every rank's collectives matched, 2 a hang, mismatch or dead rank found,
1 bad usage or unreadable evidence (one line naming the file and what is wrong)`;

/** The verdict as --json prints it. */
export interface VerdictJson {
  readonly verdict: VerdictKind;
  readonly communicator: string | null;
  readonly position: number | null;
  readonly seq: number | null;
  readonly op: string | null;
  readonly layer: number | null;
  readonly culprits: readonly number[];
  readonly ranks: readonly RankReport[];
  readonly cause: string;
  /** Every hung group in the tracker's canonical order, the verdict's first (as `sim --json` lists them); [] when none. */
  readonly hangs: readonly HangSummary[];
}

/** What the evidence says: the verdict on the whole ledger, and the report input (for dumps, a window of it past 20,000 calls). */
export interface Evidence {
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  readonly report: ReportInput;
  readonly seq: number | null;
}

/** Dumps this large are refused before reading (a 2,000-entry dump is about a megabyte). */
const MAX_FILE = 512 * 1024 * 1024;

/** The evidence in PATHs: rank records or Flight Recorder dumps (one kind at a time), read into a report. */
export async function readEvidence(paths: readonly string[]): Promise<Evidence> {
  const files: string[] = [];
  for (const p of paths) {
    const path = resolve(p);
    let isDir: boolean;
    try {
      isDir = (await stat(path)).isDirectory();
    } catch (e) {
      throw new UsageError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file or folder' : (e as Error).message}`);
    }
    if (!isDir) {
      files.push(path);
      continue;
    }
    const names = (await readdir(path, { withFileTypes: true })).filter((f) => f.isFile()).map((f) => f.name);
    // A folder of rank records (`rank --out-dir`) holds other outputs too: there only the records count.
    const recordsHere = names.filter((f) => RANK_RECORD_NAME.test(f));
    const inDir = (recordsHere.length ? recordsHere : names.filter((f) => DUMP_NAME.test(f))).map((f) => join(path, f));
    if (inDir.length === 0) throw new UsageError(`${path}: no Flight Recorder dumps (<prefix><rank>, e.g. nccl_trace_rank_0) or rank records (rank<r>.record.json) in it`);
    files.push(...inDir.sort());
  }
  const records = files.filter((f) => RANK_RECORD_NAME.test(basename(f)));
  const dumps = files.filter((f) => !RANK_RECORD_NAME.test(basename(f)));
  if (records.length && dumps.length) throw new UsageError(`the evidence mixes rank records (${basename(records[0]!)}) and Flight Recorder dumps (${basename(dumps[0]!)}); diagnose one run's evidence of one kind`);
  try {
    if (records.length) {
      const report = mergeRankRecords(await readRankRecords(records));
      return { diagnosis: report.diagnosis, ledger: report.ledger, report, seq: null };
    }
    const prefixes = new Set(dumps.map((f) => join(dirname(f), DUMP_NAME.exec(basename(f))?.[1] ?? basename(f))));
    if (prefixes.size > 1) throw new UsageError(`the dumps have different prefixes (${[...prefixes].slice(0, 3).join(', ')}): name one job's files`);
    const read = await Promise.all(
      dumps.map(async (f) => {
        const m = DUMP_NAME.exec(basename(f));
        if (!m) throw new UsageError(`${f}: cannot tell its rank from its name (expected <prefix><rank>, e.g. nccl_trace_rank_3)`);
        const size = (await stat(f)).size;
        if (size > MAX_FILE) throw new UsageError(`${f}: ${size} bytes is more than a Flight Recorder dump holds (limit ${MAX_FILE})`);
        return readDump(await readFile(f), f, Number(m[2]));
      }),
    );
    return analyzeDumps(read);
  } catch (e) {
    if (e instanceof EvidenceError || e instanceof RankRecordError) throw new UsageError(e.message);
    throw e;
  }
}

/** The op and layer the verdict is about: what the members that are not culprits issued at its position. */
export function verdictJson({ diagnosis: d, ledger, seq }: Evidence): VerdictJson {
  const at = ledger.filter((e) => e.communicator === d.communicator && e.position === d.position);
  const e = at.find((x) => !d.culprits.includes(x.rank)) ?? at[0];
  return { verdict: d.verdict, communicator: d.communicator, position: d.position, seq, op: e?.op ?? null, layer: e?.layer ?? null, culprits: d.culprits, ranks: d.ranks, cause: d.cause, hangs: d.hangs ?? [] };
}

export interface RenderOptions {
  readonly json?: boolean;
  readonly html?: string;
  readonly trace?: string;
}

/** Reads the evidence, writes the report and trace asked for, prints the verdict; returns the exit code. */
export async function diagnoseEvidence(paths: readonly string[], opts: RenderOptions): Promise<number> {
  const evidence = await readEvidence(paths);
  const { report, seq } = evidence;
  if (opts.trace) await writeFile(resolve(opts.trace), JSON.stringify(toTraceFile(report)));
  if (opts.html) await writeFile(resolve(opts.html), renderReport(report));
  const v = verdictJson(evidence);
  if (opts.json) console.log(JSON.stringify(v));
  else {
    const where = seq !== null ? `\nseq:     ${seq} (the dumps' collective_seq_id of that position)` : '';
    console.log(`${formatDiagnosis(evidence.diagnosis)}${where}${opts.html ? `\nreport: ${resolve(opts.html)}` : ''}`);
  }
  return evidence.diagnosis.verdict === 'ok' ? 0 : 2;
}

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse(argv, { json: { type: 'boolean' }, html: { type: 'string' }, trace: { type: 'string' } }, HELP);
  if (helpAsked(values, HELP)) return 0;
  if (positionals.length === 0) throw new UsageError(`diagnose needs a folder or files of evidence\n\n${HELP}`);
  return diagnoseEvidence(positionals, { json: values.json === true, html: values.html as string | undefined, trace: values.trace as string | undefined });
}
