// `ep-actors sim`: one scenario through the worker-thread runtime (or the discrete-event
// engine), a diagnosis in words or JSON, optionally a Chrome trace, an HTML report and a live page.
import { writeFile } from 'node:fs/promises';
import { runScenarioOnProcesses } from '../../actors/launch.js';
import { UsageError } from '../errors.js';
import { formatDiagnosis, type Diagnosis } from '../../machines/diagnosis.js';
import { DEFAULT_COMPUTE_TIMEOUT_MS, DEFAULT_TIMEOUT_MS, runActors, type RuntimeOptions } from '../../actors/supervisor.js';
import { reportFromDes, reportFromRun } from '../../sim/report/fromDes.js';
import { toTraceFile, type ReportInput } from '../../sim/report/input.js';
import { renderReport } from '../../sim/report/html.js';
import type { Scenario } from '../../sim/scenario.js';
import { helpAsked, intOption, parse } from './args.js';
import { loadBackend, parseBackend, parseExchange } from '../backends.js';
import { SCENARIO_HELP, SCENARIO_OPTIONS, scenarioFromFlags } from './scenarioFlags.js';
import { startLive, untilInterrupted } from '../../sim/live/server.js';

const HELP = `usage: ep-actors sim [scenario flags] [--engine actors|des|processes] [--json] [--trace FILE] [--report FILE] [--live [PORT]]

Run one training step of a scenario and say whether it completes, or where and why it
hangs. With the actors engine (default) every rank is a worker thread running the real EP
layer under its rank machine; with des the machines are stepped in one thread; with
processes every rank is its own process (\`ep-actors rank\` over TCP, placed as torchrun
places ranks), with no supervisor: each watches for itself, and their records are merged.

${SCENARIO_HELP}

output:
  --engine E             actors (worker threads, real tensors) | des (single thread, simulated time)
                         | processes (one OS process per rank over TCP, real tensors)
  --json                 print one JSON object {verdict, communicator, position, culprits, ranks, cause,
                         hangs (every hung communicator, the headline first), detectedAfterMs}
  --trace FILE           write a Chrome Trace Event JSON (open in Perfetto; \`viz report\` renders it)
  --report FILE          write a self-contained HTML report
  --inspect FILE         stream every rank's xstate inspection events as JSON Lines (- for stdout)
  --live [PORT]          actors: watch the ranks on a page at http://127.0.0.1:PORT/ while the run goes
                         (PORT 0 or none: a free port; the URL is printed on stderr); the page stays
                         up after the verdict until Ctrl-C
  --live-exit            with --live: close the page's server once the verdict is sent
  --backend B            expert kernels for the actors and processes engines: ts | native | cuda (default ts)
  --exchange X           actors: how ranks move all-to-all data: ports (msgpack over MessagePorts,
                         default) | shared (host shared memory) | device-copy (one GPU's memory,
                         several ranks on one GPU) | nccl (one GPU per rank)
  --timeout MS           actors, processes: a collective every member issued whose data has not
                         arrived for this long is a timeout (default 10000); ranks waiting for a
                         peer that computes are not hung
  --compute-timeout MS   actors: a rank whose own work (routing, expert compute) has not returned
                         for this long is a stall, naming the rank and its work (default 600000)

exit: 0 the step completes, 2 a hang or mismatch was found, 1 bad usage or an error

example:
  ep-actors sim --ep 4 --experts 8 --top-k 2 --routing starve:1 --variant no-dispatch-edge`;

export async function main(argv: string[]): Promise<number> {
  const { values: v } = parse(
    withLivePort(argv),
    {
      ...SCENARIO_OPTIONS,
      engine: { type: 'string' },
      json: { type: 'boolean' },
      trace: { type: 'string' },
      report: { type: 'string' },
      inspect: { type: 'string' },
      live: { type: 'string' },
      'live-exit': { type: 'boolean' },
      backend: { type: 'string' },
      exchange: { type: 'string' },
      timeout: { type: 'string' },
      'compute-timeout': { type: 'string' },
    },
    HELP,
  );
  if (helpAsked(v, HELP)) return 0;
  const scenario = await scenarioFromFlags(v);
  const engine = v.engine ?? 'actors';
  if (engine !== 'actors' && engine !== 'des' && engine !== 'processes') throw new UsageError(`--engine must be actors, des or processes, got '${String(engine)}'`);
  const backend = parseBackend(v.backend);
  if (engine !== 'des') await loadBackend(backend); // fail here, in one line, if it cannot run
  const exchange = parseExchange(v.exchange);
  if (v.exchange !== undefined && engine !== 'actors') throw new UsageError('--exchange chooses how worker ranks exchange: it needs --engine actors');
  if (v.inspect !== undefined && engine !== 'actors') throw new UsageError('--inspect streams worker ranks\' machines: it needs --engine actors');
  if (v['live-exit'] && v.live === undefined) throw new UsageError('--live-exit needs --live');
  if (v.live !== undefined && engine !== 'actors') throw new UsageError('--live watches worker ranks: it needs --engine actors');

  const live = v.live === undefined ? null : await startLive(scenario, intOption(v.live, 'live', 0, 0, 65_535));
  if (live) console.error(`live view: ${live.url}`);
  // The server must not keep the process alive when the run throws.
  try {
    const timeoutMs = intOption(v.timeout, 'timeout', DEFAULT_TIMEOUT_MS, 1);
    const computeTimeoutMs = intOption(v['compute-timeout'], 'compute-timeout', DEFAULT_COMPUTE_TIMEOUT_MS, 1);
    const input =
      engine === 'des' ? reportFromDes(scenario)
      : engine === 'processes' ? await runScenarioOnProcesses(scenario, ['--backend', backend, '--timeout', String(timeoutMs)])
      : await runOnActors(scenario, { backend, exchange, timeoutMs, computeTimeoutMs }, typeof v.inspect === 'string' ? v.inspect : undefined, live?.onInspect);
    live?.verdict(input.diagnosis);
    if (typeof v.trace === 'string') await writeFile(v.trace, JSON.stringify(toTraceFile(input)));
    if (typeof v.report === 'string') await writeFile(v.report, renderReport(input));
    print(input.diagnosis, !!v.json);
    if (typeof v.report === 'string' && !v.json) console.log(`report: ${v.report}`);
    if (live && !v['live-exit']) {
      console.error(`live view stays up at ${live.url} — Ctrl-C to exit`);
      await untilInterrupted();
    }
    return input.diagnosis.verdict === 'ok' ? 0 : 2;
  } finally {
    await live?.close();
  }
}

/** `--live` takes an optional port: without one (end of argv or another flag next) it means a free port. */
function withLivePort(argv: string[]): string[] {
  return argv.map((a, i) => (a === '--live' && (i + 1 === argv.length || argv[i + 1]!.startsWith('-')) ? '--live=0' : a));
}

type InspectSink = (rank: number, event: unknown) => void;

async function runOnActors(scenario: Scenario, how: Pick<RuntimeOptions, 'backend' | 'exchange' | 'timeoutMs' | 'computeTimeoutMs'>, inspect: string | undefined, live: InspectSink | undefined): Promise<ReportInput> {
  const lines: string[] = [];
  const jsonLines: InspectSink | undefined =
    inspect === undefined ? undefined : (rank, event) => (inspect === '-' ? console.log(JSON.stringify({ rank, event })) : lines.push(JSON.stringify({ rank, event })));
  const onInspect: InspectSink | undefined =
    jsonLines && live
      ? (rank, event) => {
          jsonLines(rank, event);
          live(rank, event);
        }
      : (jsonLines ?? live);
  const r = await runActors(scenario, { ...how, onInspect });
  if (inspect !== undefined && inspect !== '-') await writeFile(inspect, lines.join('\n') + '\n');
  return reportFromRun(scenario, r);
}

function print(d: Diagnosis, json: boolean): void {
  if (json) {
    const { verdict, communicator, position, culprits, ranks, cause, hangs, detectedAfterMs } = d;
    console.log(JSON.stringify({ verdict, communicator, position, culprits, ranks, cause, hangs: hangs ?? [], detectedAfterMs: detectedAfterMs ?? null }));
  } else {
    console.log(formatDiagnosis(d));
  }
}
