// Sweep throughput: scenarios per second over 1 and 2 piscina workers; the ratio is the
// speed-up of the second worker (bounded by the cores).
import { performance } from 'node:perf_hooks';
import { expandSweep, runSweep } from '../../sim/sweep.js';
import type { BenchRow } from './harness.js';

export async function bench(): Promise<BenchRow[]> {
  const scenarios = expandSweep({
    base: { ep: 16, experts: 32, layers: 2 },
    samples: { count: 96, seed: 7, fields: { variant: ['seed', 'no-dispatch-edge', 'skip-empty-sends'], routing: ['uniform', 'starve:3', 'empty:5', 'zipf:1.2'], seed: [1, 2, 3, 4] } },
  }).map((scenario, index) => ({ index, scenario }));
  const rate = async (workers: number) => {
    const t0 = performance.now();
    await runSweep(scenarios, { workers });
    return scenarios.length / ((performance.now() - t0) / 1000);
  };
  const one = await rate(1);
  const two = await rate(2);
  return [
    { name: 'scenarios/s, 1 worker (ep=16, 2 layers)', value: one, unit: 'scen/s' },
    { name: 'scenarios/s, 2 workers', value: two, unit: 'scen/s', baseline: { name: '1 worker', value: one, unit: 'scen/s' }, ratio: two / one },
  ];
}
