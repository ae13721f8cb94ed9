// `ep-actors rank --case F --out-dir D`: this process is one EP rank, placed by a launcher
// (torchrun, srun); it writes its own results to D/rank{r}.safetensors.
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { helpAsked, intOption, noPositionals, parse, requiredString, type Parsed } from './args.js';
import { SCENARIO_HELP, SCENARIO_OPTIONS, scenarioFromFlags } from './scenarioFlags.js';
import { UsageError } from '../src/errors.js';
import { caseMetadata, loadCase, type CaseData } from '../src/case.js';
import { caseScenario } from '../machines/scenario.js';
import type { Scenario } from '../machines/scenario.js';
import { writeSafetensorsFileAtomic } from '../src/codec/safetensors.js';
import { loadBackend, parseBackend } from '../src/backends.js';
import { localExpertRange } from '../src/ep/layer.js';
import type { Tensor } from '../src/tensor.js';
import { launchEnv } from '../actors/rendezvous.js';
import type { RankRecord } from '../actors/rankRecord.js';
import { writeFileAtomic } from '../src/atomic.js';
import { VARIANT_NAMES, type VariantName } from '../machines/variants.js';
import { LaunchedRankError, runLaunchedRank, TerminatedRankError } from '../actors/launch.js';
import { runIdentity } from '../actors/runIdentity.js';
import { DEFAULT_COMPUTE_TIMEOUT_MS } from '../actors/supervisor.js';

const HELP = `usage: ep-actors rank (--case FILE [--variant V] | [scenario flags]) --out-dir DIR
                       [--exchange tcp|nccl] [--backend ts|native|cuda] [--steps N] [--timeout MS]
                       [--run-id ID] [--secret-file FILE] [--json]

Run this process as one rank of a case (or of a generated scenario, as \`sim\` runs it),
the way launchers place ranks: RANK,
WORLD_SIZE and LOCAL_RANK as torchrun sets them (else SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID as srun does), and MASTER_ADDR:MASTER_PORT where rank 0 holds the rendezvous
(default 127.0.0.1:29500; MASTER_PORT+1 under torchrun, whose agent holds MASTER_PORT;
EP_ACTORS_PORT overrides). WORLD_SIZE must equal the case's ep (the scenario's dp × ep). Every rank runs its rank
machine over the real EP layer, as on worker threads; with no supervisor, every rank tells
every peer the collectives it issues and follows the whole run's ledger. A rank waiting in
a collective stops with exit 2 once the run is quiescent (every rank blocked in a collective
that cannot complete, finished, or stalled, so every hung communicator is reached), the
moment a peer it waits on goes away or stops on an error, or when its data never arrives
(--timeout). A rank that stops tells its peers why and exits; so does a rank sent SIGTERM
or SIGINT (exit 1).

Ranks on one host (same boot id) also share memory: each maps a segment of every peer's
(offered over their connection; sealed, gone once no rank maps it) and writes its messages
there, waking a sleeping peer with a futex: the chunks and the checks are the same, two
trips through the kernel fewer. Ranks on other hosts, or where the segments cannot be
mapped, keep to TCP; EP_ACTORS_SHM_DISABLE=1 keeps every pair to TCP.

Every connection between ranks (the rendezvous and the data connections) opens with a
hello carrying the run id, the sender's rank and the world size; a connection from another
run (a job that picked the same port), or from anything that is not a rank, is refused with
one line on both sides naming both identities, closed, and listed in the rank's record; the
run goes on. The run id is --run-id, else TORCHELASTIC_RUN_ID (torchrun's --rdzv-id), else
SLURM_JOB_ID.SLURM_STEP_ID (srun), else one rank 0 makes up and hands out in the rendezvous
(then two such jobs on one port cannot be told apart at the rendezvous). A run id tells
jobs apart; it is not a password: anyone who can reach the ports and knows or guesses it
gets in, and nothing is encrypted. With a secret shared by every rank (EP_ACTORS_SECRET,
or --secret-file), each hello also carries an HMAC-SHA256 over the run id, both ranks, the
world size and a fresh nonce from the listener, and the listener answers with its own: only
holders of the secret get in, and a recorded hello cannot be replayed. The bytes that follow
are still neither encrypted nor signed: on a network where others can read or alter
traffic, run the ranks over one you trust.

  --case FILE     the case (see \`ep-actors run --help\`); every rank reads it and takes its slice;
                  without it the scenario flags below say what the ranks run
  --out-dir DIR   with --case, rank r writes DIR/rank{r}.safetensors: rank{r}.out, rank{r}.grad_x,
                  rank{r}.grad_weights and rank{r}.grad.up_w|down_w|gate_w for its local experts
                  (metadata first_expert), atomically; and DIR/rank{r}.record.json, what its
                  rank machine did, also when it stops: \`ep-actors viz report --ranks DIR\`
                  merges the records into the ledger, diagnosis and HTML report
  --exchange X    tcp (default): msgpack chunks over a TCP connection per pair of ranks
                  (through shared memory between ranks on one host, see above);
                  nccl: the EP layer's all-to-alls over NCCL, GPU = LOCAL_RANK mod (GPUs)
  --backend B     expert kernels: ts | native | cuda (default ts)
  --variant V     the protocol (default seed); a hazard variant reproduces its bug on real processes
  --steps N       training steps back to back (default 1); the file holds the last step's
                  results and the summary each step's time
  --timeout MS    the collective limit (default 600000): a collective every member issued whose
                  data has not arrived this long, or a wait this long past the compute limit with
                  no word from any rank, stops the rank with exit 2 (timeout);
                  the rendezvous and the connections between ranks give up after it too (exit 1)
  --compute-timeout MS
                  a compute of this rank (routing, expert forward or backward) that has not
                  returned for this long stops it with exit 2 (stall), and its peers hear why
                  (default 600000)
  --run-id ID     this job's run id (letters, digits, . _ : @ + -; see above)
  --secret-file F a file holding the secret every rank shares (instead of EP_ACTORS_SECRET)
  --json          print one JSON object instead of the summary
  -h, --help      this text

${SCENARIO_HELP}

example (4 ranks on this machine):
  torchrun --nproc_per_node 4 --no_python npx ep-actors rank --case C.safetensors --out-dir out/
  srun -n 4 env MASTER_ADDR=$(hostname) npx ep-actors rank --case C.safetensors --out-dir out/

exit codes: 0 ok, 2 the ranks diverged, a peer stopped, crashed or stalled, 1 bad usage or
an error (a rendezvous that did not complete in time, a refused rendezvous, a termination)`;

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse(
    argv,
    { ...SCENARIO_OPTIONS, case: { type: 'string' }, 'out-dir': { type: 'string' }, exchange: { type: 'string' }, backend: { type: 'string' }, timeout: { type: 'string' }, 'compute-timeout': { type: 'string' }, steps: { type: 'string' }, json: { type: 'boolean' }, 'run-id': { type: 'string' }, 'secret-file': { type: 'string' } },
    HELP,
  );
  if (helpAsked(values, HELP)) return 0;
  noPositionals(positionals, HELP);
  const outDir = resolve(requiredString(values, 'out-dir', HELP));
  const exchange = values.exchange ?? 'tcp';
  if (exchange !== 'tcp' && exchange !== 'nccl') throw new UsageError(`--exchange must be tcp or nccl, got '${String(exchange)}'`);
  const backend = parseBackend(values.backend);
  await loadBackend(backend); // fails in one line when it cannot run here
  const timeoutMs = intOption(values.timeout, 'timeout', 600_000, 1);
  const computeTimeoutMs = intOption(values['compute-timeout'], 'compute-timeout', DEFAULT_COMPUTE_TIMEOUT_MS, 1);
  const steps = intOption(values.steps, 'steps', 1, 1);
  const env = launchEnv();
  const identity = runIdentity({ runId: values['run-id'] as string | undefined, secretFile: values['secret-file'] as string | undefined });
  const { scenario, data } = await workOf(values);

  mkdirSync(outDir, { recursive: true });
  // The record is written whether the rank finishes or stops: `viz report --ranks` merges them.
  const recordPath = join(outDir, `rank${env.rank}.record.json`);
  let record: RankRecord | undefined;
  const writeRecord = () => (record ? writeFileAtomic(recordPath, JSON.stringify(record)) : Promise.resolve());
  const say = (line: string) => console.error(`ep-actors rank ${env.rank}: ${line}`);
  const stop = new AbortController();
  const onSignal = (signal: NodeJS.Signals) => stop.abort(signal);
  process.once('SIGTERM', onSignal).once('SIGINT', onSignal);
  let launched;
  try {
    launched = await runLaunchedRank({
      scenario, data, env, identity, exchange, backend, timeoutMs, computeTimeoutMs, steps, signal: stop.signal,
      keep: (r) => (record = r),
      refused: (r) => say(r.line),
      connected: (runId) => say(`connected to its ${env.worldSize - 1} peer${env.worldSize === 2 ? '' : 's'} in run '${runId}'`),
    });
  } catch (err) {
    if (!(err instanceof LaunchedRankError) && !(err instanceof TerminatedRankError)) throw err;
    await writeRecord();
    say(`${err.message} (record: ${record ? recordPath : 'none: the run had not started'})`);
    // The rank has said goodbye; what its layer still computes, or an NCCL call blocked on
    // its comm thread, must not keep it: exiting runs the addon's teardown, which aborts the
    // communicator and joins that thread.
    process.exit(err instanceof TerminatedRankError ? 1 : 2);
  } finally {
    process.off('SIGTERM', onSignal).off('SIGINT', onSignal);
  }
  await writeRecord();
  const { result: r, stepMs } = launched;
  const summary: Record<string, unknown> = { rank: env.rank, worldSize: env.worldSize, exchange, backend, record: recordPath, stepMs };
  let wrote = '';
  if (data && r) {
    const { start } = localExpertRange(data.meta.numExperts, data.meta.ep, env.rank);
    const p = `rank${env.rank}`;
    const tensors = new Map<string, Tensor>([[`${p}.out`, r.out_TD], [`${p}.grad_x`, r.gradX_TD], [`${p}.grad_weights`, r.gradWeights_TK], [`${p}.grad.up_w`, r.grads.up], [`${p}.grad.down_w`, r.grads.down]]);
    if (r.grads.gate) tensors.set(`${p}.grad.gate_w`, r.grads.gate);
    const out = join(outDir, `${p}.safetensors`);
    await writeSafetensorsFileAtomic(out, tensors, { ...caseMetadata(data.meta), rank: String(env.rank), first_expert: String(start) });
    Object.assign(summary, { out, rowsSent: r.rowsSent, rowsReceived: r.rowsReceived, tensors: [...tensors.keys()] });
    wrote = `sent ${r.rowsSent} rows, received ${r.rowsReceived}; `;
  }
  if (values.json) console.log(JSON.stringify(summary));
  else console.log(`rank ${env.rank} of ${env.worldSize}: ${wrote}${steps} step${steps === 1 ? '' : 's'} (${stepMs.map((ms) => ms.toFixed(1)).join(', ')} ms); wrote ${summary.out ?? recordPath}`);
  return 0;
}

/** A case (its layout, with --variant) or a scenario from the scenario flags. */
async function workOf(values: Parsed['values']): Promise<{ scenario: Scenario; data?: CaseData }> {
  if (typeof values.case !== 'string') return { scenario: await scenarioFromFlags(values) };
  const layoutFlags = Object.keys(SCENARIO_OPTIONS).filter((k) => k !== 'variant' && values[k] !== undefined);
  if (layoutFlags.length) throw new UsageError(`--case takes the layout and routing from the file; --${layoutFlags[0]} does not apply (only --variant does)`);
  const variant = values.variant ?? 'seed';
  if (!(VARIANT_NAMES as readonly unknown[]).includes(variant)) throw new UsageError(`--variant must be one of ${VARIANT_NAMES.join(', ')}, got '${String(variant)}'`);
  const data = await loadCase(resolve(values.case));
  return { scenario: caseScenario(data.meta, variant as VariantName), data };
}
