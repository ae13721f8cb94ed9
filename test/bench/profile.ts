// Where a worker-rank EP step's time goes: the step of runtime.ts (native kernels, 4 worker
// ranks, one kernel thread each) with every all-to-all timed by the transport
// (EP_ACTORS_PROFILE=1, actors/transport.ts), split per rank and step into copying (encode
// or stage, then assemble the result), waiting for a peer (until the last peer sent), the
// signalling after that (delivery to this rank's thread), and everything outside the
// collectives (expert compute, routing, the protocol). Means over ranks and timed steps.
import { BroadcastChannel } from 'node:worker_threads';
import { median, type BenchRow } from './harness.js';
import { DEFAULT_EP_OPTIONS, epStepCase, epStepLabel, pinKernelThreads } from './torch.js';
import { casePayloads, caseScenario } from '../../actors/caseRanks.js';
import { runActors } from '../../actors/supervisor.js';
import { PROFILE_CHANNEL, type CollectiveProfile } from '../../actors/transport.js';
import type { ExchangeName } from '../../actors/exchanges.js';
import { loadNative } from '../../src/native/backend.js';

export interface StepProfile {
  stepMs: number;
  copying: number;
  waiting: number;
  signalling: number;
  collectives: number;
  /** Collectives per rank and step. */
  count: number;
}

/** Per rank and timed step (the first step of each rank is warm-up), means of the collectives' parts. */
export function stepProfile(records: readonly CollectiveProfile[], steps: number, stepMs: readonly number[]): StepProfile {
  const ranks = [...new Set(records.map((r) => r.rank))];
  const sum = { copying: 0, waiting: 0, signalling: 0 };
  let perStep = 0;
  for (const rank of ranks) {
    const mine = records.filter((r) => r.rank === rank).sort((a, b) => a.enter - b.enter);
    perStep = mine.length / steps;
    for (const r of mine.slice(perStep)) {
      const inFlight = r.arrived - r.sent;
      const waiting = Math.min(inFlight, Math.max(0, r.peerSent - r.sent));
      sum.copying += r.sent - r.enter + (r.done - r.arrived);
      sum.waiting += waiting;
      sum.signalling += inFlight - waiting;
    }
  }
  const n = ranks.length * (steps - 1);
  const copying = sum.copying / n;
  const waiting = sum.waiting / n;
  const signalling = sum.signalling / n;
  return { stepMs: median(stepMs.slice(1)), copying, waiting, signalling, collectives: copying + waiting + signalling, count: perStep };
}

async function profiledStep(exchange: ExchangeName, steps: number): Promise<StepProfile> {
  const records: CollectiveProfile[] = [];
  const channel = new BroadcastChannel(PROFILE_CHANNEL);
  channel.onmessage = (e: unknown) => records.push((e as { data: CollectiveProfile }).data);
  const data = epStepCase();
  pinKernelThreads();
  process.env.EP_ACTORS_PROFILE = '1'; // read by the rank workers as they start
  try {
    const run = await runActors(caseScenario(data.meta), { casePayloads: casePayloads(data), steps, record: false, timeoutMs: 300_000, backend: 'native', exchange });
    if (run.diagnosis.verdict !== 'ok') throw new Error(`EP step did not complete: ${run.diagnosis.cause}`);
    await new Promise((r) => setTimeout(r, 50)); // the last records are still on their way
    return stepProfile(records, steps, run.stepMs);
  } finally {
    delete process.env.EP_ACTORS_PROFILE;
    channel.close();
  }
}

export async function bench(): Promise<BenchRow[]> {
  if (!loadNative()) return [{ name: 'step profile', value: NaN, unit: 'ms', note: 'skipped: needs the native addon' }];
  const rows: BenchRow[] = [];
  for (const exchange of ['ports', 'shared'] as const) {
    const p = await profiledStep(exchange, 6);
    const label = epStepLabel(`native kernels, ${DEFAULT_EP_OPTIONS.ep} worker-thread ranks, ${exchange} exchange`);
    const part = (what: string, ms: number, note: string): BenchRow => ({ name: `${label}: ${what}`, value: ms, unit: 'ms', note: `${((100 * ms) / p.stepMs).toFixed(0)}% of the step; ${note}` });
    rows.push(
      { name: `${label}: step (slowest rank)`, value: p.stepMs, unit: 'ms', note: `median of 5 steps after one warm-up; ${p.count} collectives per rank and step` },
      part('compute and the rest (outside collectives)', p.stepMs - p.collectives, 'step minus the collectives: expert compute, routing, the protocol'),
      part('waiting for a peer', p.waiting, 'per rank and step: from sending until the last peer sent'),
      part('signalling', p.signalling, 'per rank and step: from the last peer sending until this rank had every chunk'),
      part('copying', p.copying, 'per rank and step: encoding or staging and sending, then assembling the result'),
    );
  }
  return rows;
}
