// A piscina worker of `ep-actors sweep`: one scenario through the discrete-event engine,
// answered as one plain result row (structured-clone friendly).
import { simulateDes } from './des.js';
import type { Scenario } from '../machines/scenario.js';
import type { SweepResult } from './sweep.js';

export default function runScenario({ index, scenario }: { index: number; scenario: Scenario }): SweepResult {
  const { diagnosis: d, ledger, simulatedMs } = simulateDes(scenario);
  return { index, scenario, verdict: d.verdict, communicator: d.communicator, position: d.position, culprits: [...d.culprits], cause: d.cause, collectives: ledger.length, simulatedMs };
}
