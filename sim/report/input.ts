// What a report is made from, and the file that carries it. The file is a Chrome Trace
// Event JSON object (it opens in Perfetto as it is) whose `epActors` key holds the rest of
// the report input: `{ traceEvents: [...], epActors: { scenario, diagnosis, ledger, paths,
// routing } }`. Both engines write it (`sim --trace`); `viz report` reads it.
import type { Diagnosis } from '../../machines/diagnosis.js';
import type { LedgerEntry } from '../../machines/ledger.js';
import type { Scenario } from '../scenario.js';
import type { TraceEvent } from '../../machines/spans.js';

export type { TraceEvent } from '../../machines/spans.js';

export interface ReportRouting {
  /** Per source global rank, per destination EP rank: rows sent, summed over layers and micro-batches. */
  readonly sendRows: readonly (readonly number[])[];
  /** Per global expert id: rows routed to it, summed the same way. */
  readonly rowsPerExpert: readonly number[];
}

export interface ReportInput {
  readonly scenario: Scenario;
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  /** Per rank, the state paths it visited in order (`forward.route`, `forward.counts`, …). */
  readonly paths: readonly (readonly string[])[];
  readonly trace: readonly TraceEvent[];
  readonly routing: ReportRouting;
  /** What the trace's clock means: wall time of a real run or the engine's simulated time. */
  readonly clock?: 'real' | 'simulated';
}

/** A Chrome trace metadata event (lane names for Perfetto). */
interface MetadataEvent {
  readonly name: 'thread_name' | 'process_name';
  readonly ph: 'M';
  readonly pid: 0;
  readonly tid: number;
  readonly args: { readonly name: string };
}

export interface TraceFile {
  readonly traceEvents: readonly (TraceEvent | MetadataEvent)[];
  readonly displayTimeUnit: 'ms';
  readonly epActors: Omit<ReportInput, 'trace'>;
}

export function toTraceFile(input: ReportInput): TraceFile {
  const { trace, ...rest } = input;
  const ranks = input.paths.length;
  const names: MetadataEvent[] = [
    { name: 'process_name', ph: 'M', pid: 0, tid: 0, args: { name: `ep-actors (${input.clock ?? 'simulated'} time)` } },
    ...Array.from({ length: ranks }, (_, r): MetadataEvent => ({ name: 'thread_name', ph: 'M', pid: 0, tid: r, args: { name: `rank ${r}` } })),
  ];
  return { traceEvents: [...names, ...trace], displayTimeUnit: 'ms', epActors: rest };
}

/** The report input in a parsed trace file; the error says which part is missing. */
export function fromTraceFile(json: unknown, where = 'trace file'): ReportInput {
  const fail = (what: string): never => {
    throw new Error(`${where}: ${what}; expected a Chrome trace {traceEvents, epActors: {scenario, diagnosis, ledger, paths, routing}} as written by \`ep-actors sim --trace\``);
  };
  if (!json || typeof json !== 'object') fail('not a JSON object');
  const f = json as Partial<TraceFile>;
  if (!Array.isArray(f.traceEvents)) fail('no traceEvents array');
  const ep = f.epActors;
  if (!ep || typeof ep !== 'object') fail('no epActors object (a plain Chrome trace has no report data)');
  for (const key of ['scenario', 'diagnosis', 'ledger', 'paths', 'routing'] as const) if (!(key in ep!)) fail(`epActors has no ${key}`);
  if (!Array.isArray(ep!.ledger) || !Array.isArray(ep!.paths)) fail('epActors.ledger and epActors.paths must be arrays');
  const trace = f.traceEvents!.filter((e): e is TraceEvent => e.ph === 'X');
  return { ...ep!, trace };
}
