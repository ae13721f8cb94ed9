// The native CPU backend: GEMM GFLOP/s of our own kernels against OpenBLAS on the expert
// shapes, and the EP step (forward + backward, in-process group, ranks concurrent on
// libuv's pool) with and without BLAS, against the TypeScript kernels and the seed's
// algorithm on PyTorch + gloo measured in the same run.
import { time, type BenchRow } from './harness.js';
import { DEFAULT_EP_OPTIONS, epStepLabel, pinKernelThreads, torchEpStep, epStepCase } from './torch.js';
import { runCase } from '../../src/case.js';
import { tsBackend } from '../../src/moe/experts.js';
import { NativeExpertBackend, loadNative, nativeUnavailableReason, type GemmSpec } from '../../src/native/backend.js';
import type { ExpertBackend } from '../../src/ep/types.js';
import { inProcessRanks } from '../../actors/inprocess.js';

function rand(n: number): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.random() - 0.5;
  return a;
}

async function gemmRows(): Promise<BenchRow[]> {
  const addon = loadNative()!;
  const info = addon.info();
  const o = DEFAULT_EP_OPTIONS;
  const rows = o.tokens * o.topK; // rows an expert-owning rank sees per step, all its experts
  const shapes: { label: string; ta: boolean; tb: boolean; m: number; n: number; k: number }[] = [
    { label: 'x·up (fwd)', ta: false, tb: false, m: rows, n: o.hidden, k: o.dim },
    { label: 'h·down (fwd)', ta: false, tb: false, m: rows, n: o.dim, k: o.hidden },
    { label: 'gy·downᵀ (bwd)', ta: false, tb: true, m: rows, n: o.hidden, k: o.dim },
    { label: 'xᵀ·dA (weight grad)', ta: true, tb: false, m: o.dim, n: o.hidden, k: rows },
    { label: 'square', ta: false, tb: false, m: 1024, n: 1024, k: 1024 },
  ];
  const out: BenchRow[] = [];
  for (const s of shapes) {
    const spec = (impl: GemmSpec['impl']): GemmSpec => ({ ...s, a: rand(s.m * s.k), b: rand(s.k * s.n), c: new Float32Array(s.m * s.n), impl });
    const gflops = (ms: number) => (2 * s.m * s.n * s.k) / (ms * 1e6);
    const own = spec('own');
    const tOwn = await time(() => addon.gemm(own), 9, 2);
    const name = `GEMM ${s.label} ${s.m}x${s.n}x${s.k}${s.ta ? ' Aᵀ' : ''}${s.tb ? ' Bᵀ' : ''} (own ${info.kernel}, ${info.threads} threads)`;
    const row: BenchRow = { name, value: gflops(tOwn.medianMs), unit: 'GFLOP/s' };
    if (info.blas) {
      const blas = spec('blas');
      const tBlas = await time(() => addon.gemm(blas), 9, 2);
      const b = gflops(tBlas.medianMs);
      out.push({ ...row, baseline: { name: `${info.blas}, ${info.threads} thread${info.threads === 1 ? '' : 's'}`, value: b, unit: 'GFLOP/s' }, ratio: row.value / b, note: 'ratio = own / OpenBLAS throughput (>1: ours is faster); OpenBLAS runs one thread per call, split over the same threads as ours' });
    } else {
      out.push({ ...row, note: `no BLAS to compare: ${info.blasReason}` });
    }
  }
  return out;
}

async function epRows(): Promise<BenchRow[]> {
  const data = epStepCase();
  const info = loadNative()!.info();
  const backends: { backend: ExpertBackend; label: string; runs: number }[] = [
    ...(info.blas ? [{ backend: new NativeExpertBackend({ blas: true }), label: `native + ${info.blas}`, runs: 7 }] : []),
    { backend: new NativeExpertBackend({ blas: false }), label: `native, own ${info.kernel} GEMM (no BLAS)`, runs: 7 },
  ];
  const torch = await torchEpStep();
  const ts = await time(() => runCase(data, { runRanks: inProcessRanks, backend: tsBackend }), 1, 0); // about a minute a run
  const out: BenchRow[] = [];
  for (const b of backends) {
    const t = await time(() => runCase(data, { runRanks: inProcessRanks, backend: b.backend }), b.runs, 2);
    const name = epStepLabel(`${b.label}, in-process group, f32`);
    const note = `min ${t.minMs.toFixed(1)} ms; ${(ts.medianMs / t.medianMs).toFixed(1)}x faster than ts kernels (${ts.medianMs.toFixed(0)} ms)`;
    if ('skipped' in torch) out.push({ name, value: t.medianMs, unit: 'ms', note: `${note}; torch baseline skipped: ${torch.skipped}` });
    else
      out.push({
        name,
        value: t.medianMs,
        unit: 'ms',
        baseline: { name: epStepLabel('torch+gloo f32, 1 process/rank'), value: torch.medianMs, unit: 'ms' },
        ratio: torch.medianMs / t.medianMs,
        note: `${note}; ratio = torch / native (>1: we are faster)`,
      });
  }
  return out;
}

export async function bench(): Promise<BenchRow[]> {
  if (!loadNative()) return [{ name: 'native backend', value: NaN, unit: '', note: `skipped: ${nativeUnavailableReason()}` }];
  pinKernelThreads(); // one kernel thread per rank (and per GEMM), as torch has per process
  return [...(await gemmRows()), ...(await epRows())];
}
