// The HTML report at ep=64 (starve:1 under no-dispatch-edge, the hang users mail around):
// its size, and the time to make it from the discrete-event engine (engine run with path
// recording, then rendering), measured separately.
import type { BenchRow } from './harness.js';
import { time } from './harness.js';
import { validateScenario } from '../../machines/scenario.js';
import { reportFromDes } from '../../sim/report/fromDes.js';
import { renderReport } from '../../sim/report/html.js';

export async function bench(): Promise<BenchRow[]> {
  const scenario = validateScenario({ ep: 64, experts: 128, routing: 'starve:1', variant: 'no-dispatch-edge' });
  const what = 'ep=64 E=128 starve:1 no-dispatch-edge';
  const input = reportFromDes(scenario);
  const html = renderReport(input);
  const engine = await time(() => reportFromDes(scenario), 3, 1);
  const render = await time(() => renderReport(input), 5, 1);
  return [
    { name: `report size (${what})`, value: Buffer.byteLength(html) / 1024, unit: 'KiB', note: `${input.ledger.length} ledger entries, ${input.trace.length} trace events` },
    { name: `report input from the engine (${what})`, value: engine.medianMs, unit: 'ms', note: 'the engine with every microstep recorded' },
    { name: `report render (${what})`, value: render.medianMs, unit: 'ms' },
  ];
}
