// `ep-actors sim`: one scenario through the worker-thread runtime (or the discrete-event
// engine), a diagnosis in words or JSON, optionally a Chrome trace, an HTML report and a live page.
import { writeFile } from 'node:fs/promises';
import { runScenarioOnProcesses } from './localRanks.js';
import { UsageError } from '../src/errors.js';
import { formatDiagnosis, type Diagnosis } from '../machines/diagnosis.js';
import { DEFAULT_COMPUTE_TIMEOUT_MS, DEFAULT_TIMEOUT_MS, reportFromRun, runActors, type RuntimeOptions } from '../actors/supervisor.js';
import { reportFromDes } from '../sim/report/fromDes.js';
import { toTraceFile } from '../sim/report/input.js';
import type { ReportInput } from '../machines/record.js';
import { renderReport } from '../sim/report/html.js';
import { checkFitsMemory, type Scenario } from '../machines/scenario.js';
import { layersOnRank } from '../machines/routing.js';
import { worldSize } from '../machines/mesh.js';
import type { IssuedCollective } from '../machines/snapshot.js';
import { helpAsked, intOption, noPositionals, outputFile, parse } from './args.js';
import { progressBar } from './progress.js';
import { chooseBackend, loadBackend, type BackendName } from '../src/backends.js';
import { parseExchange } from '../actors/exchanges.js';
import { SCENARIO_HELP, SCENARIO_OPTIONS, scenarioFromFlags } from './scenarioFlags.js';
import { startLive, untilInterrupted } from '../sim/live/server.js';

const HELP = `usage: ep-actors sim [scenario flags] [--engine actors|des|processes] [--json] [--trace FILE] [--report FILE] [--live [PORT]]

Run one training step of a scenario and say whether it completes, or where and why it
hangs. With the actors engine (default) every rank is a worker thread running the real EP
layer under its rank machine; with des the machines are stepped in one thread; with
processes every rank is its own process (\`ep-actors rank\`, placed as torchrun
places ranks), with no supervisor: each watches for itself, and their records are merged.

${SCENARIO_HELP}

output:
  --engine E             actors (worker threads, real tensors) | des (single thread, simulated time)
                         | processes (one OS process per rank, real tensors)
  --json                 print one JSON object {verdict, communicator, position, culprits, ranks, cause,
                         hangs (every hung communicator, the headline first), detectedAfterMs}
  --trace FILE           write a Chrome Trace Event JSON (open in Perfetto; \`viz report\` renders it)
  --report FILE          write a self-contained HTML report
  --inspect FILE         stream every rank's xstate inspection events as JSON Lines (- for stdout;
                         everything else then goes to stderr)
  --live [PORT]          actors: watch the ranks on a page at http://127.0.0.1:PORT/ while the run goes
                         (PORT 0 or none: a free port; the URL is printed on stderr); the page stays
                         up after the verdict until Ctrl-C
  --live-exit            with --live: close the page's server once the verdict is sent
  --backend B            expert kernels for the actors and processes engines: ts | native | cuda
                         (default native where the addon loaded, else ts with a note)
  --exchange X           actors: how ranks move all-to-all data: ports (msgpack over MessagePorts,
                         default) | shared (host shared memory) | device-copy (one GPU's memory,
                         several ranks on one GPU) | nccl (one GPU per rank)
  --timeout MS           actors, processes: a collective every member issued whose data has not
                         arrived for this long is a timeout (default 10000); ranks waiting for a
                         peer that computes are not hung
  --compute-timeout MS   actors, processes: a rank whose own work (routing, expert compute) has not returned
                         for this long is a stall, naming the rank and its work (default 600000)

Output paths are checked before the run starts; a scenario too large for this machine's
memory is refused up front. A progress bar is drawn on stderr when it is a terminal.

exit: 0 the step completes, 2 a hang or mismatch was found, 1 bad usage or an error

example:
  ep-actors sim --ep 4 --experts 8 --top-k 2 --routing starve:1 --variant no-dispatch-edge`;

export async function main(argv: string[]): Promise<number> {
  const { values: v, positionals } = parse(
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
  noPositionals(positionals, HELP);
  const engine = v.engine ?? 'actors';
  if (engine !== 'actors' && engine !== 'des' && engine !== 'processes') throw new UsageError(`--engine must be actors, des or processes, got '${String(engine)}'`);
  // Every output path is checked before anything runs: a bad one must not cost the verdict.
  const tracePath = outputFile(v, 'trace');
  const reportPath = outputFile(v, 'report');
  const inspect = v.inspect === '-' ? '-' : outputFile(v, 'inspect');
  const scenario = await scenarioFromFlags(v);
  const exchange = parseExchange(v.exchange);
  if (v.exchange !== undefined && engine !== 'actors') throw new UsageError('--exchange chooses how worker ranks exchange: it needs --engine actors');
  if (v.inspect !== undefined && engine !== 'actors') throw new UsageError('--inspect streams worker ranks\' machines: it needs --engine actors');
  if (v['live-exit'] && v.live === undefined) throw new UsageError('--live-exit needs --live');
  if (v.live !== undefined && engine !== 'actors') throw new UsageError('--live watches worker ranks: it needs --engine actors');
  const realRankFlag = (['backend', 'timeout'] as const).find((f) => v[f] !== undefined);
  if (engine === 'des' && realRankFlag) throw new UsageError(`--${realRankFlag} applies to real ranks (--engine actors or processes); --engine des simulates them`);
  if (v['compute-timeout'] !== undefined && engine === 'des') throw new UsageError('--compute-timeout watches real ranks\' compute: the des engine simulates it');
  const timeoutMs = intOption(v.timeout, 'timeout', DEFAULT_TIMEOUT_MS, 1);
  const computeTimeoutMs = intOption(v['compute-timeout'], 'compute-timeout', DEFAULT_COMPUTE_TIMEOUT_MS, 1);
  let backend: BackendName = 'ts';
  if (engine !== 'des') {
    checkFitsMemory(scenario, { tensors: true });
    const chosen = await chooseBackend(v.backend);
    await loadBackend(chosen.name); // fail here, in one line, if it cannot run
    if (chosen.fallback) console.error(`note: ${chosen.fallback}`);
    backend = chosen.name;
  }
  // With the inspection stream on stdout, everything for people goes to stderr; a reader
  // that stops early (`| head`) ends the stream, not the run.
  const say = inspect === '-' ? console.error : console.log;
  let stdoutClosed = false;
  if (inspect === '-') process.stdout.on('error', () => (stdoutClosed = true));

  const live = v.live === undefined ? null : await startLive(scenario, intOption(v.live, 'live', 0, 0, 65_535));
  if (live) console.error(`live view: ${live.url}`);
  // The server must not keep the process alive when the run throws.
  try {
    const inspectLines: string[] = [];
    const toInspect: InspectSink | undefined =
      inspect === undefined ? undefined : inspect === '-' ? (rank, event) => stdoutClosed || console.log(JSON.stringify({ rank, event })) : (rank, event) => inspectLines.push(JSON.stringify({ rank, event }));
    const input =
      engine === 'des' ? reportFromDes(scenario)
      : engine === 'processes' ? await runScenarioOnProcesses(scenario, ['--backend', backend, '--timeout', String(timeoutMs), '--compute-timeout', String(computeTimeoutMs)])
      : await runOnActors(scenario, { backend, exchange, timeoutMs, computeTimeoutMs }, [toInspect, live?.onInspect]);
    live?.verdict(input.diagnosis);
    // The verdict first: a file that then fails to write must not take it with it.
    print(input.diagnosis, !!v.json, say);
    if (inspect !== undefined && inspect !== '-') await writeFile(inspect, inspectLines.join('\n') + '\n');
    if (tracePath) await writeFile(tracePath, JSON.stringify(toTraceFile(input)));
    if (reportPath) await writeFile(reportPath, renderReport(input));
    if (reportPath && !v.json) say(`report: ${reportPath}`);
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

async function runOnActors(scenario: Scenario, how: Pick<RuntimeOptions, 'backend' | 'exchange' | 'timeoutMs' | 'computeTimeoutMs'>, sinks: (InspectSink | undefined)[]): Promise<ReportInput> {
  const to = sinks.filter((f): f is InspectSink => f !== undefined);
  const onInspect: InspectSink | undefined = to.length === 0 ? undefined : (rank, event) => to.forEach((f) => f(rank, event));
  const progress = layerCallProgress(scenario);
  try {
    return reportFromRun(scenario, await runActors(scenario, { ...how, onInspect, onIssue: progress.onIssue }));
  } finally {
    progress.clear();
  }
}

/** Progress on a terminal: the layer calls (each layer's forward and backward, per micro-batch) the ranks have entered. */
function layerCallProgress(s: Scenario): { onIssue(rank: number, c: IssuedCollective): void; clear(): void } {
  const calls = Array.from({ length: worldSize(s) }, (_, r) => 2 * layersOnRank(s, r) * s.microBatches).reduce((a, b) => a + b, 0);
  const bar = progressBar(calls, 'layer calls');
  const current = new Map<number, string>();
  let entered = 0;
  bar.update(0); // drawn while the workers start: at ep=256 that alone takes a while
  return {
    onIssue(rank, c) {
      const call = `${c.microBatch} ${c.phase} ${c.layer}`;
      if (current.get(rank) === call) return;
      current.set(rank, call);
      bar.update(++entered);
    },
    clear: () => bar.clear(),
  };
}

function print(d: Diagnosis, json: boolean, say: (line: string) => void): void {
  if (json) {
    const { verdict, communicator, position, culprits, ranks, cause, hangs, detectedAfterMs } = d;
    say(JSON.stringify({ verdict, communicator, position, culprits, ranks, cause, hangs: hangs ?? [], detectedAfterMs: detectedAfterMs ?? null }));
  } else {
    say(formatDiagnosis(d));
  }
}
