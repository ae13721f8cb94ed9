// EP layer step (forward + backward) with the TypeScript expert kernels over the in-process
// group: ep=4, 1024 tokens per rank, D=256, H=512, E=8, top-2, SwiGLU, f32. All four ranks
// share one thread, so a step costs the sum of the ranks' work; the PyTorch baseline runs
// one process per rank and reports the slowest rank.
import { time, type BenchRow } from './harness.js';
import { DEFAULT_EP_OPTIONS, epStepLabel, torchEpStep, epStepCase } from './torch.js';
import { runCase } from '../../src/case.js';
import { inProcessRanks } from '../../actors/inprocess.js';

export async function bench(): Promise<BenchRow[]> {
  const o = DEFAULT_EP_OPTIONS;
  const data = epStepCase();
  // CPU time per step alongside wall time: on a shared machine wall time mostly measures the neighbours.
  const cpu0 = process.cpuUsage();
  const t = await time(() => runCase(data, { runRanks: inProcessRanks }), 3, 1);
  const cpu = process.cpuUsage(cpu0);
  const cpuMsPerStep = (cpu.user + cpu.system) / 1e3 / (t.runs + 1);
  // Expert GEMMs: 3 in forward, 6 in backward, each 2·rows·D·H flops; rows = T·K per rank.
  const gflop = (9 * 2 * o.ep * o.tokens * o.topK * o.dim * o.hidden) / 1e9;
  const baseline = await torchEpStep();
  const row: BenchRow = {
    name: epStepLabel('ts kernels, in-process group, f32, all ranks in one thread'),
    value: t.medianMs,
    unit: 'ms',
    note: `min ${t.minMs.toFixed(1)} ms over ${t.runs} runs; ${cpuMsPerStep.toFixed(0)} ms CPU per step; ${(gflop / (t.medianMs / 1e3)).toFixed(2)} GFLOP/s on expert GEMMs (wall)`,
  };
  if ('skipped' in baseline) return [{ ...row, note: `${row.note}; torch baseline skipped: ${baseline.skipped}` }];
  return [
    {
      ...row,
      baseline: { name: epStepLabel('torch+gloo f32, 1 process/rank'), value: baseline.medianMs, unit: 'ms' },
      ratio: baseline.medianMs / t.medianMs,
      note: `${row.note}; ratio = torch / ours (>1: we are faster)`,
    },
  ];
}
