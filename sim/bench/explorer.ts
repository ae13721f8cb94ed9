// Explorer throughput: routing classes per second (symmetry-reduced), ep=4 and ep=8.
import { explore } from '../explorer.js';
import { validateScenario } from '../../machines/scenario.js';
import type { BenchRow } from './harness.js';

export async function bench(): Promise<BenchRow[]> {
  return [
    { ep: 4, experts: 8 },
    { ep: 8, experts: 16 },
  ].map((layout) => {
    const r = explore(validateScenario({ ...layout, topK: 2 }));
    return { name: `classes/s, seed, ep=${layout.ep} E=${layout.experts} top-2`, value: r.classesRun / (r.elapsedMs / 1000), unit: 'classes/s', note: `${r.verdict} over ${r.classes} classes in ${(r.elapsedMs / 1000).toFixed(2)} s` };
  });
}
