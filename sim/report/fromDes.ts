// Report inputs from the two engines. From the discrete-event engine: its diagnosis and ledger, each rank's
// path (every microstep, so the eventless choice states show too), simulated time, and
// the routing the scenario's generator chose for the whole step.
import { getInitialMicrosteps, getMicrosteps } from 'xstate';
import { rankMachine } from '../../machines/rankMachine.js';
import { statePath } from '../../machines/protocol.js';
import { simulateDes } from '../des.js';
import { routeTokens, sendCountsOf } from '../routing.js';
import { rankConfig, worldSize, type Scenario } from '../scenario.js';
import type { ReportInput, ReportRouting } from './input.js';
import type { RuntimeResult } from '../../actors/supervisor.js';

export function reportFromDes(scenario: Scenario): ReportInput {
  const paths = Array.from({ length: worldSize(scenario) }, (_, r) => getInitialMicrosteps(rankMachine, rankConfig(scenario, r)).map(([s]) => statePath(s)));
  const { diagnosis, ledger, spans } = simulateDes(scenario, {
    trace: true,
    onStep(rank, before, event) {
      for (const [s] of getMicrosteps(rankMachine, before, event)) paths[rank]!.push(statePath(s));
    },
  });
  return {
    scenario,
    diagnosis,
    ledger: [...ledger],
    paths,
    trace: spans ?? [],
    routing: routingOf(scenario),
    clock: 'simulated',
  };
}

/** A report input from a worker-thread run: its diagnosis, ledger, paths and wall-clock trace. */
export function reportFromRun(scenario: Scenario, run: Pick<RuntimeResult, 'diagnosis' | 'ledger' | 'paths' | 'trace'>): ReportInput {
  return { scenario, diagnosis: run.diagnosis, ledger: run.ledger, paths: run.paths, trace: run.trace, routing: routingOf(scenario), clock: 'real' };
}

/** Rows per source→destination pair and per expert over every layer and micro-batch. */
export function routingOf(s: Scenario): ReportRouting {
  const rows = Array.from({ length: worldSize(s) }, (_, r) => rankRouting(s, generatedIndices(s, r)));
  const rowsPerExpert = new Array<number>(s.experts).fill(0);
  for (const r of rows) r.rowsPerExpert.forEach((c, e) => (rowsPerExpert[e]! += c));
  return { sendRows: rows.map((r) => r.sendRows), rowsPerExpert };
}

/** One rank's routing summed over `indices` lists: rows it sends each EP rank and routes to each expert. */
export function rankRouting(s: Pick<Scenario, 'ep' | 'experts'>, indices: Iterable<ArrayLike<number>>): { sendRows: number[]; rowsPerExpert: number[] } {
  const sendRows = new Array<number>(s.ep).fill(0);
  const rowsPerExpert = new Array<number>(s.experts).fill(0);
  for (const idx of indices) {
    sendCountsOf(idx, s.experts, s.ep).forEach((c, j) => (sendRows[j]! += c));
    for (let i = 0; i < idx.length; i++) rowsPerExpert[idx[i]!]!++;
  }
  return { sendRows, rowsPerExpert };
}

/** A rank's generated expert indices, every micro-batch and layer of the step. */
export function* generatedIndices(s: Scenario, rank: number): Generator<Int32Array> {
  for (let mb = 0; mb < s.microBatches; mb++) for (let layer = 0; layer < s.layers; layer++) yield routeTokens(s, rank, mb, layer);
}
