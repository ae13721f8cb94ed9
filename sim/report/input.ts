// What a report is made from, and the file that carries it. The file is a Chrome Trace
// Event JSON object (it opens in Perfetto as it is) whose `epActors` key holds the rest of
// the report input: `{ traceEvents: [...], epActors: { scenario, diagnosis, ledger, paths,
// routing } }`. Both engines write it (`sim --trace`); `viz report` reads it.
import type { ReportInput } from '../../machines/record.js';
import type { TraceEvent } from '../../machines/spans.js';

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
