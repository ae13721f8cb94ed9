// `ep-actors sim`: one scenario through the worker-thread runtime (or the discrete-event
// engine), a diagnosis in words or JSON, optionally a Chrome trace and an HTML report.
import { writeFile } from 'node:fs/promises';
import { UsageError } from '../errors.js';
import { formatDiagnosis, type Diagnosis } from '../../machines/diagnosis.js';
import { runActors } from '../../actors/supervisor.js';
import { reportFromDes, routingOf } from '../../sim/report/fromDes.js';
import { toTraceFile, type ReportInput } from '../../sim/report/input.js';
import { renderReport } from '../../sim/report/html.js';
import type { Scenario } from '../../sim/scenario.js';
import { intOption, parse } from './args.js';
import { loadBackend, parseBackend, type BackendName } from '../backends.js';
import { SCENARIO_HELP, SCENARIO_OPTIONS, scenarioFromFlags } from './scenarioFlags.js';

const HELP = `usage: ep-actors sim [scenario flags] [--engine actors|des] [--json] [--trace FILE] [--report FILE]

Run one training step of a scenario and say whether it completes, or where and why it
hangs. With the actors engine (default) every rank is a worker thread running the real EP
layer under its rank machine; with des the machines are stepped in one thread.

${SCENARIO_HELP}

output:
  --engine E             actors (worker threads, real tensors) | des (single thread, simulated time)
  --json                 print one JSON object {verdict, communicator, position, culprits, ranks, cause, detectedAfterMs}
  --trace FILE           write a Chrome Trace Event JSON (open in Perfetto; \`viz report\` renders it)
  --report FILE          write a self-contained HTML report
  --inspect FILE         stream every rank's xstate inspection events as JSON Lines (- for stdout)
  --backend B            expert kernels for the actors engine: ts | native | cuda (default ts)
  --timeout MS           actors: verdict 'timeout' after this long without progress (default 10000)

exit: 0 the step completes, 2 a hang or mismatch was found, 1 bad usage or an error

example:
  ep-actors sim --ep 4 --experts 8 --top-k 2 --routing starve:1 --variant no-dispatch-edge`;

export async function main(argv: string[]): Promise<number> {
  const { values: v } = parse(
    argv,
    {
      ...SCENARIO_OPTIONS,
      engine: { type: 'string' },
      json: { type: 'boolean' },
      trace: { type: 'string' },
      report: { type: 'string' },
      inspect: { type: 'string' },
      backend: { type: 'string' },
      timeout: { type: 'string' },
    },
    HELP,
  );
  if (v.help) {
    console.log(HELP);
    return 0;
  }
  const scenario = await scenarioFromFlags(v);
  const engine = v.engine ?? 'actors';
  if (engine !== 'actors' && engine !== 'des') throw new UsageError(`--engine must be actors or des, got '${String(engine)}'`);
  const backend = parseBackend(v.backend);
  if (engine === 'actors') await loadBackend(backend); // fail here, in one line, if it cannot run

  const input = engine === 'des' ? reportFromDes(scenario) : await runOnActors(scenario, backend, intOption(v.timeout, 'timeout', 10_000, 1), typeof v.inspect === 'string' ? v.inspect : undefined);
  if (typeof v.trace === 'string') await writeFile(v.trace, JSON.stringify(toTraceFile(input)));
  if (typeof v.report === 'string') await writeFile(v.report, renderReport(input));
  print(input.diagnosis, !!v.json);
  if (typeof v.report === 'string' && !v.json) console.log(`report: ${v.report}`);
  return input.diagnosis.verdict === 'ok' ? 0 : 2;
}

async function runOnActors(scenario: Scenario, backend: BackendName, timeoutMs: number, inspect: string | undefined): Promise<ReportInput> {
  let onInspect: ((rank: number, event: unknown) => void) | undefined;
  const lines: string[] = [];
  if (inspect !== undefined) onInspect = (rank, event) => (inspect === '-' ? console.log(JSON.stringify({ rank, event })) : lines.push(JSON.stringify({ rank, event })));
  const r = await runActors(scenario, { backend, timeoutMs, onInspect });
  if (inspect !== undefined && inspect !== '-') await writeFile(inspect, lines.join('\n') + '\n');
  return { scenario, diagnosis: r.diagnosis, ledger: r.ledger, paths: r.paths, trace: r.trace, routing: routingOf(scenario), clock: 'real' };
}

function print(d: Diagnosis, json: boolean): void {
  if (json) {
    const { verdict, communicator, position, culprits, ranks, cause, detectedAfterMs } = d;
    console.log(JSON.stringify({ verdict, communicator, position, culprits, ranks, cause, detectedAfterMs: detectedAfterMs ?? null }));
  } else {
    console.log(formatDiagnosis(d));
  }
}
