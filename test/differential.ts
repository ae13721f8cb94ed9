// The differential check: one scenario through the discrete-event engine, worker-thread
// ranks and launched processes must give the same verdict, communicator, position,
// culprits and list of hung communicators; an ok run, the same ledger. Used by
// test/differential.test.ts (fixed seeds) and `npm run fuzz` (as many as you like).
import type { Diagnosis } from '../machines/diagnosis.js';
import type { LedgerEntry } from '../machines/ledger.js';
import { WRAP_POLICIES } from '../machines/rankMachine.js';
import { VARIANT_NAMES } from '../machines/variants.js';
import { runActors } from '../actors/supervisor.js';
import { runScenarioOnProcesses } from '../cli/localRanks.js';
import { simulateDes } from '../sim/des.js';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { seededRng, type Rng } from '../src/moe/random.js';
import { UsageError } from '../src/errors.js';
import { canonicalLedger } from './ledger.js';

export type EngineName = 'des' | 'actors' | 'processes';

/** A random scenario over everything that changes control flow: every variant, FSDP and its wrap policies, pipeline stages (dense ones too), zero-token ranks, layers, micro-batches. */
export function randomScenario(rng: Rng): Scenario {
  // A draw the layout cannot hold (a starved group left with fewer experts than top_k) is drawn again.
  for (;;) {
    try {
      return drawScenario(rng);
    } catch (err) {
      if (!(err instanceof UsageError)) throw err;
    }
  }
}

function drawScenario(rng: Rng): Scenario {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rng() * xs.length)]!;
  const variant = pick(VARIANT_NAMES);
  // stage-metric needs pipeline stages; the other variants get them now and then. A pipeline keeps the world at 8 ranks or fewer.
  const pp = variant === 'stage-metric' ? pick([2, 3]) : pick([1, 1, 1, 2]);
  const ep = pp > 1 ? pick([1, 2, 2]) : pick([1, 2, 2, 3, 4, 4]);
  // wrong-group needs a data-parallel communicator to issue on.
  const dp = variant === 'wrong-group' ? 2 : pp > 2 ? 1 : pick([1, 2]);
  const experts = ep * pick([1, 2, 3]);
  const fsdp = dp > 1 ? pick([null, ...WRAP_POLICIES, 'experts' as const]) : null;
  let layers = pick([1, 1, 2, 3]);
  // MoE layers per stage, dense stages included (or the same on every stage); some stage holds one.
  const moeLayers = pp > 1 && rng() < 0.75 ? Array.from({ length: pp }, () => Math.floor(rng() * (layers + 1))) : undefined;
  if (moeLayers) {
    if (Math.max(...moeLayers) === 0) moeLayers[Math.floor(rng() * pp)] = layers;
    layers = Math.max(...moeLayers);
  }
  const zeroRank = Math.floor(rng() * ep * dp * pp);
  // uneven-batches shards its batches as micro-batches: it needs two or more.
  const microBatches = variant === 'uneven-batches' ? pick([2, 3]) : pick([1, 1, 2]);
  return validateScenario({
    ep,
    dp,
    ...(pp > 1 ? { pp } : {}),
    ...(moeLayers ? { moeLayers } : {}),
    fsdp,
    experts,
    topK: 1 + Math.floor(rng() * Math.min(experts, 3)),
    tokens: pick([0, 1, 3, 8]),
    dim: 4,
    hidden: 8,
    layers,
    microBatches,
    routing: pick(['uniform', 'zipf:1.5', `starve:${zeroRank}`, `empty:${zeroRank}`, `hot:${Math.floor(rng() * experts)}`]),
    variant,
    packed: rng() < 0.5,
    ...(variant === 'early-exit' ? { earlyExitRank: Math.floor(rng() * ep), earlyExitAfterLayers: 1 + Math.floor(rng() * layers * 2) } : {}),
    ...(variant === 'local-capacity' ? { capacityFactor: pick([1, 1.25, 2]) } : {}),
    ...(variant === 'wrong-group' ? { wrongGroupRank: Math.floor(rng() * ep) } : {}),
    ...(variant === 'uneven-batches' ? { evalBatches: ep * dp * (microBatches - 1) + 1 + Math.floor(rng() * ep * dp) } : {}),
    seed: Math.floor(rng() * 1e9),
  });
}

export const randomScenarios = (seed: number, count: number): Scenario[] => {
  const rng = seededRng(seed);
  return Array.from({ length: count }, () => randomScenario(rng));
};

/** What every engine must agree on: the headline and every hung communicator. */
export function verdictOf(d: Diagnosis) {
  return {
    verdict: d.verdict,
    communicator: d.communicator,
    position: d.position,
    culprits: [...d.culprits],
    hangs: (d.hangs ?? []).map((h) => ({ verdict: h.verdict, communicator: h.communicator, position: h.position, culprits: [...h.culprits] })),
  };
}

async function runOn(engine: EngineName, s: Scenario): Promise<{ diagnosis: Diagnosis; ledger: readonly LedgerEntry[] }> {
  if (engine === 'des') return simulateDes(s);
  // A stall (kernel-hang) is found by the compute limit: short, yet far above what these small layers compute.
  if (engine === 'actors') return runActors(s, { timeoutMs: 30_000, computeTimeoutMs: 10_000 });
  return runScenarioOnProcesses(s, ['--timeout', '30000', '--compute-timeout', '10000']);
}

/** null when `engine` agrees with the discrete-event engine on `s`; else what differs, with the scenario to replay. */
export async function disagreement(s: Scenario, engine: Exclude<EngineName, 'des'>): Promise<string | null> {
  const want = simulateDes(s);
  const got = await runOn(engine, s);
  const a = JSON.stringify(verdictOf(want.diagnosis));
  const b = JSON.stringify(verdictOf(got.diagnosis));
  let differs = a !== b ? `des gives ${a}\n${engine} gives ${b}\n(${engine}: ${got.diagnosis.cause})` : null;
  if (!differs && want.diagnosis.verdict === 'ok' && JSON.stringify(canonicalLedger(want.ledger)) !== JSON.stringify(canonicalLedger(got.ledger))) {
    differs = `both ok, but the ledgers differ (${want.ledger.length} entries on des, ${got.ledger.length} on ${engine})`;
  }
  return differs && `${differs}\nreplay: save this as s.json and run \`ep-actors sim --scenario s.json --engine ${engine}\` (and --engine des)\n${JSON.stringify(s)}`;
}
