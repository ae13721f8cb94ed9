// The run record of the discrete-event engine: its diagnosis and ledger, each rank's path
// (every microstep, so the eventless choice states show too), its collectives in simulated
// time, and the routing the scenario's generator chose for the whole step.
import { getInitialMicrosteps } from 'xstate';
import { rankMachine } from '../../machines/rankMachine.js';
import { rankMicrosteps, statePath } from '../../machines/snapshot.js';
import { simulateDes } from '../des.js';
import { routingOf } from '../../machines/routing.js';
import { rankConfig, type Scenario } from '../../machines/scenario.js';
import { worldSize } from '../../machines/mesh.js';
import type { ReportInput } from '../../machines/record.js';

export function reportFromDes(scenario: Scenario): ReportInput {
  const paths = Array.from({ length: worldSize(scenario) }, (_, r) => getInitialMicrosteps(rankMachine, rankConfig(scenario, r)).map(([s]) => statePath(s)));
  const { diagnosis, ledger, spans } = simulateDes(scenario, {
    trace: true,
    onStep(rank, before, event) {
      for (const s of rankMicrosteps(before, event)) paths[rank]!.push(statePath(s));
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
