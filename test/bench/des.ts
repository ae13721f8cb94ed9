// Discrete-event engine throughput: ranks × collectives per second for one step of a large
// layout, and the target case (ep=1024, E=4096, 2 layers; at most 5 s).
import { performance } from 'node:perf_hooks';
import { simulateDes } from '../../sim/des.js';
import { validateScenario } from '../../machines/scenario.js';
import type { BenchRow } from './harness.js';

export async function bench(): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  for (const ep of [256, 1024]) {
    const s = validateScenario({ ep, experts: 4 * ep, layers: 2, tokens: 16 });
    const t0 = performance.now();
    const r = simulateDes(s);
    const seconds = (performance.now() - t0) / 1000;
    rows.push({ name: `one step ep=${ep} E=${4 * ep} 2 layers (routing included)`, value: seconds, unit: 's', note: `${r.ledger.length} ledger entries, ${r.diagnosis.verdict}` });
    rows.push({ name: `ranks x collectives, ep=${ep}`, value: r.ledger.length / seconds, unit: '/s' });
  }
  return rows;
}
