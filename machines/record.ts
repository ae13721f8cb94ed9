// The record every engine leaves of a run, and every report, trace file and post-mortem
// reader works from: the scenario, the verdict and its diagnosis, the ledger, each rank's
// state path, its collectives as timeline lanes, and the routing the step used.
import type { Diagnosis } from './diagnosis.js';
import type { LedgerEntry } from './ledger.js';
import type { CommunicatorSpec } from './mesh.js';
import type { ReportRouting } from './routing.js';
import type { Scenario } from './scenario.js';
import type { TraceEvent } from './spans.js';

export interface ReportInput {
  readonly scenario: Scenario;
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  /** Per rank, the state paths it visited in order (`forward.route`, `forward.counts`, …). */
  readonly paths: readonly (readonly string[])[];
  readonly trace: readonly TraceEvent[];
  readonly routing: ReportRouting;
  /** What the trace's clock means: wall time of a real run or the engine's simulated time. */
  readonly clock?: 'real' | 'simulated';
  /** Post-mortem evidence (Flight Recorder dumps): its process groups, when they are not the scenario's mesh. */
  readonly communicators?: readonly CommunicatorSpec[];
  /** What the report was read from, said instead of the scenario line (the scenario then only sizes the page). */
  readonly evidence?: string;
}
