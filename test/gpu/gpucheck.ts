// The JavaScript half of native/gpu-check.sh. `node gpucheck.js run OUT` runs the GPU
// tests and our CUDA benchmarks into OUT/native.json; `node gpucheck.js table OUT` joins
// them with OUT/torch.json (native/gpu_bench_torch.py) into OUT/results.md and prints it.
import { readFileSync, readdirSync, writeFileSync, existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Tensor, relativeError } from '../../src/tensor.js';
import { readSafetensorsFile } from '../../src/codec/safetensors.js';
import { parseCase, resultTensors, runCase, syntheticCase } from '../../src/case.js';
import { tsBackend } from '../../src/moe/experts.js';
import { NativeError, nativeAddonPath, requireNative } from '../../src/native/backend.js';
import { CudaExpertBackend, deviceMemory } from '../../src/native/cuda.js';
import { deviceCopyMemory } from '../../actors/staging.js';
import { actorRanks } from '../../actors/caseRanks.js';
import { launchLocally } from '../../cli/localRanks.js';
import { NcclCommunicator, ncclVersion } from '../../src/native/nccl.js';
import { inProcessRanks } from '../../actors/inprocess.js';

interface Check {
  name: string;
  /** 'skip': the machine lacks what the check needs (said in detail); never counted as a pass. */
  status: 'PASS' | 'FAIL' | 'SKIP';
  detail: string;
}

/** Thrown by a check that cannot run on this machine. */
class Skip extends Error {}

// Realistic MoE shape (DeepSeek-V3-like layer) and a small one; gpu_bench_torch.py uses the same.
export const SHAPES = [
  { name: 'realistic', tokens: 4096, topK: 8, experts: 32, d: 7168, h: 2048 },
  { name: 'small', tokens: 1024, topK: 2, experts: 8, d: 256, h: 512 },
] as const;

let saveProgress: (checks: Check[]) => void = () => {};

async function check(name: string, fn: () => Promise<string> | string, out: Check[]): Promise<void> {
  try {
    out.push({ name, status: 'PASS', detail: await fn() });
  } catch (e) {
    const err = e as Error & { code?: string };
    out.push({ name, status: e instanceof Skip ? 'SKIP' : 'FAIL', detail: `${err.code ? `[${err.code}] ` : ''}${err.message}` });
  }
  const last = out[out.length - 1]!;
  console.log(`${last.status} ${name}: ${last.detail}`);
  saveProgress(out);
}

function rootDir(): string {
  return join(nativeAddonPath(), '..', '..', '..', '..');
}

async function runChecks(): Promise<Check[]> {
  const a = requireNative();
  const out: Check[] = [];
  await check('CUDA device', () => JSON.stringify(a.cudaInfo()), out);
  await check('NCCL library', () => JSON.stringify(ncclVersion()), out);

  const golden = join(rootDir(), 'test', 'fixtures', 'golden');
  /** Runs a golden case as `how` says and returns its worst relative error, failing above 1e-5. */
  const goldenWithin = async (name: string, how: Parameters<typeof runCase>[1]): Promise<string> => {
    const file = await readSafetensorsFile(join(golden, `${name}.safetensors`));
    const got = resultTensors(await runCase(parseCase(file), how));
    let worst = 0;
    for (const key of [...file.tensors.keys()].filter((k) => k.startsWith('expected.'))) {
      const err = relativeError(got.get(key.slice(9))!, file.tensors.get(key)!);
      worst = Math.max(worst, err);
      if (!(err <= 1e-5)) throw new Error(`${key}: relative error ${err.toExponential(3)}`);
    }
    return `worst relative error ${worst.toExponential(2)}`;
  };
  for (const f of readdirSync(golden).filter((n) => n.endsWith('.safetensors')).sort()) {
    const name = f.slice(0, -'.safetensors'.length);
    await check(`golden ${name} on CUDA fp32 within 1e-5`, () => goldenWithin(name, { runRanks: inProcessRanks, backend: new CudaExpertBackend('f32') }), out);
  }

  for (const activation of ['silu', 'gelu', 'relu'] as const) {
    await check(`bf16 vs fp32 reference, ${activation}, fresh random inputs with a zero-token rank`, async () => {
      const data = syntheticCase({ ep: 4, numExperts: 8, topK: 2, dim: 256, hidden: 512, activation, packed: true, gradientScale: false, dtype: 'f32', tokensPerRank: [300, 0, 257, 64], starvedRanks: [2] }, Date.now() % 100000);
      const want = resultTensors(await runCase(data, { runRanks: inProcessRanks, backend: tsBackend }));
      const got = resultTensors(await runCase(data, { runRanks: inProcessRanks, backend: new CudaExpertBackend('bf16') }));
      let worst = 0;
      for (const [k, t] of want) {
        if (t.data.length === 0) continue;
        const err = relativeError(got.get(k)!, t);
        worst = Math.max(worst, err);
        if (!(err <= 3e-2)) throw new Error(`${k}: relative error ${err.toExponential(3)} > 3e-2`);
      }
      return `worst relative error ${worst.toExponential(2)} (bf16 tolerance 3e-2)`;
    }, out);
  }

  await check('dispatch sort + gather and weighted combine on device match the CPU definitions', () => {
    const T = 777, K = 4, E = 16, D = 96;
    const keys = Int32Array.from({ length: T * K }, (_, i) => (i * 7919 + (i >> 3)) % E);
    const x = Float32Array.from({ length: T * D }, (_, i) => Math.sin(i));
    const r = a.cudaPermute(keys, E, x, K);
    const want = Array.from(keys.keys()).sort((p, q) => keys[p]! - keys[q]! || p - q);
    want.forEach((s, p) => {
      if (r.order[p] !== s || r.pos[s] !== p) throw new Error(`sorted position ${p}: entry ${r.order[p]}, expected ${s}`);
      for (let c = 0; c < D; c++) if (r.rows[p * D + c] !== x[Math.floor(s / K) * D + c]) throw new Error(`row ${p} differs`);
    });
    const w = Float32Array.from({ length: T * K }, (_, i) => (i % 5) / 5);
    const y = a.cudaScatterAdd(r.rows, r.pos, w, K);
    for (let t = 0; t < T; t++)
      for (let c = 0; c < D; c++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += w[t * K + k]! * x[t * D + c]!;
        if (Math.abs(s - y[t * D + c]!) > 1e-4) throw new Error(`combine [${t},${c}] ${y[t * D + c]} vs ${s}`);
      }
    return `${T * K} entries, ${E} experts, counts ${Array.from(r.counts).join(',')}`;
  }, out);

  await check('device-copy memory: staged rows gathered device to device, zero-byte pieces included', () => {
    const m = deviceCopyMemory(deviceMemory());
    const bytes = Uint8Array.from({ length: 4096 }, (_, i) => (i * 31) & 255);
    const local = Uint8Array.of(7, 8, 9);
    const staged = m.stage(bytes);
    const empty = m.stage(new Uint8Array(0));
    try {
      const got = new Uint8Array(1000 + 3 + 24);
      m.gather(got, [{ handle: staged, offset: 100, bytes: 1000 }, { handle: empty, offset: 0, bytes: 0 }, { local }, { handle: staged, offset: 4072, bytes: 24 }]);
      const want = [...bytes.subarray(100, 1100), ...local, ...bytes.subarray(4072)];
      const bad = want.findIndex((v, i) => v !== got[i]);
      if (bad >= 0) throw new Error(`byte ${bad} is ${got[bad]}, expected ${want[bad]}`);
    } finally {
      m.unstage(staged);
      m.unstage(empty);
    }
    return '1027 bytes from 3 pieces';
  }, out);

  for (const name of ['ep4_silu_packed', 'ep4_gelu_unpacked_starve1', 'ep8_silu_top4']) {
    await check(`golden ${name}: ranks as worker threads sharing one GPU (device-copy exchange, CUDA kernels) within 1e-5`, () =>
      goldenWithin(name, { runRanks: actorRanks({ backend: 'cuda', exchange: 'device-copy', timeoutMs: 120_000 }) }), out);
  }

  await check('NCCL with one rank: fingerprinted counts exchange and all-to-all', async () => {
    const comm = await NcclCommunicator.init({ id: a.ncclGetUniqueId(), rank: 0, size: 1, device: 0, timeoutMs: 60_000 });
    try {
      const counts = await comm.allToAll({ op: 'fwd.counts', layer: 0, microBatch: 0 }, Tensor.from('i64', [1], [5]), [1], [1]);
      const x = Tensor.from('f32', [5, 3], Array.from({ length: 15 }, (_, i) => i));
      const y = await comm.allToAll({ op: 'fwd.dispatch', layer: 0, microBatch: 0 }, x, [5], [5]);
      if (Number((counts.data as BigInt64Array)[0]) !== 5 || relativeError(y, x) !== 0) throw new Error('wrong data back');
      return 'ok';
    } finally {
      comm.destroy();
    }
  }, out);

  await check('golden ep1_silu: a worker rank exchanging over NCCL (one GPU), CUDA kernels, within 1e-5', () =>
    goldenWithin('ep1_silu', { runRanks: actorRanks({ backend: 'cuda', exchange: 'nccl', timeoutMs: 120_000 }) }), out);

  const devices = (a.cudaInfo() as { devices: number }).devices;
  await check('golden ep1_silu: a launched rank (ep-actors rank: rendezvous, NCCL id, CUDA kernels) within 1e-5', () => launchedGolden('ep1_silu', 1), out);
  await check('golden ep2_relu_top1_skew: 2 launched ranks over NCCL, one GPU each', () => {
    if (devices < 2) throw new Skip(`needs 2 GPUs, this machine has ${devices}`);
    return launchedGolden('ep2_relu_top1_skew', 2);
  }, out);
  await check(`golden ep4_silu_packed: 4 worker ranks exchanging over NCCL, one GPU each`, () => {
    if (devices < 4) throw new Skip(`needs 4 GPUs, this machine has ${devices}`);
    return goldenWithin('ep4_silu_packed', { runRanks: actorRanks({ backend: 'cuda', exchange: 'nccl', timeoutMs: 120_000 }) });
  }, out);

  return out;
}

/**
 * Runs a golden case as `n` processes of `ep-actors rank` (by default over NCCL with CUDA
 * kernels) and compares each rank's outputs; returns the worst relative error.
 */
export async function launchedGolden(name: string, n: number, how: readonly string[] = ['--exchange', 'nccl', '--backend', 'cuda']): Promise<string> {
  const root = rootDir();
  const golden = join(root, 'test', 'fixtures', 'golden', `${name}.safetensors`);
  const want = await readSafetensorsFile(golden);
  const dir = mkdtempSync(join(tmpdir(), 'gpucheck-rank-'));
  try {
    const runs = await launchLocally(n, ['--case', golden, '--out-dir', dir, ...how, '--timeout', '60000'], { timeoutMs: 120_000 });
    runs.forEach((r, rank) => {
      if (r.code !== 0) throw new Error(`rank ${rank} exited ${r.code}: ${r.stderr.trim()}`);
    });
    let worst = 0;
    for (let rank = 0; rank < n; rank++) {
      const file = await readSafetensorsFile(join(dir, `rank${rank}.safetensors`));
      for (const [key, t] of file.tensors) {
        if (key.includes('.grad.')) continue; // expert grads are per rank's experts; the outputs and input grads say enough
        const err = relativeError(t, want.tensors.get(`expected.${key}`)!);
        worst = Math.max(worst, err);
        if (!(err <= 1e-5)) throw new Error(`${key}: relative error ${err.toExponential(3)}`);
      }
    }
    return `worst relative error ${worst.toExponential(2)}`;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Last: a CUDA error may leave the context unusable for whatever runs after it. */
async function runErrorCheck(out: Check[]): Promise<void> {
  const a = requireNative();
  await check('a CUDA error surfaces as a JavaScript NativeError with the CUDA message', () => {
    try {
      a.cudaCopy(8n, 16n, 1 << 20);
    } catch (e) {
      if (e instanceof NativeError && e.code.startsWith('CUDA_ERROR_')) return `${e.code}: ${e.message}`;
      throw e;
    }
    throw new Error('copying from a bogus device pointer did not fail');
  }, out);
}

function runBenches(): Record<string, Record<string, number>> {
  const a = requireNative();
  const res: Record<string, Record<string, number>> = {};
  for (const s of SHAPES) {
    const rows = (s.tokens * s.topK) / s.experts;
    for (const precision of ['bf16', 'f32'] as const) {
      const r = a.cudaBench('gemm', { precision, experts: s.experts, rowsPerExpert: rows, d: s.d, h: s.h, iters: 10 });
      res[`gemm.${precision}.${s.name}`] = r;
      console.log(`bench gemm ${precision} ${s.name}: ${JSON.stringify(r)}`);
    }
    const p = a.cudaBench('permute', { tokens: s.tokens, topK: s.topK, experts: s.experts, d: s.d, iters: 20 });
    res[`permute.${s.name}`] = p;
    console.log(`bench permute ${s.name}: ${JSON.stringify(p)}`);
  }
  return res;
}

function table(outDir: string): string {
  const ours = JSON.parse(readFileSync(join(outDir, 'native.json'), 'utf8')) as { checks: Check[]; bench: Record<string, Record<string, number>> };
  const torchPath = join(outDir, 'torch.json');
  const torch = existsSync(torchPath) ? (JSON.parse(readFileSync(torchPath, 'utf8')) as Record<string, Record<string, number>>) : {};
  const lines = ['| check | result |', '| --- | --- |', ...ours.checks.map((c) => `| ${c.name} | ${c.status}: ${c.detail.replace(/\|/g, '/')} |`), ''];
  lines.push('| benchmark | ours (ms) | PyTorch (ms) | ratio torch/ours (aim) |', '| --- | --- | --- | --- |');
  const row = (label: string, o: number | undefined, t: number | undefined, aim: string) =>
    lines.push(`| ${label} | ${o?.toFixed(3) ?? '-'} | ${t?.toFixed(3) ?? '-'} | ${o && t ? (t / o).toFixed(2) : '-'} (>= ${aim}) |`);
  for (const s of SHAPES) {
    for (const p of ['bf16', 'f32']) {
      const o = ours.bench[`gemm.${p}.${s.name}`];
      const t = torch[`gemm.${p}.${s.name}`];
      row(`grouped GEMM fwd ${p} ${s.name}`, o?.forwardMs, t?.forwardMs, '0.9');
      row(`grouped GEMM bwd ${p} ${s.name}`, o?.backwardMs, t?.backwardMs, '0.9');
    }
    const o = ours.bench[`permute.${s.name}`];
    const t = torch[`permute.${s.name}`];
    row(`dispatch permutation ${s.name}`, o?.dispatchMs, t?.dispatchMs, '1.5');
    row(`combine ${s.name}`, o?.combineMs, t?.combineMs, '1.5');
  }
  const text = lines.join('\n');
  writeFileSync(join(outDir, 'results.md'), `${text}\n`);
  return text;
}

async function main(): Promise<number> {
  const [mode, outDir = './gpu-results'] = process.argv.slice(2);
  if (mode === 'table') {
    console.log(table(outDir));
    return 0;
  }
  let bench: Record<string, Record<string, number>> = {};
  // Written after every check, so a run cut short by its time limit still leaves a table.
  saveProgress = (checks) => writeFileSync(join(outDir, 'native.json'), JSON.stringify({ checks, bench }, null, 2));
  const checks = await runChecks();
  try {
    bench = runBenches();
  } catch (e) {
    checks.push({ name: 'benchmarks', status: 'FAIL', detail: (e as Error).message });
  }
  await runErrorCheck(checks);
  saveProgress(checks);
  return checks.some((c) => c.status === 'FAIL') ? 1 : 0;
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split('/').pop()!)) {
  main().then((code) => process.exit(code), (e: unknown) => {
    console.error(e);
    process.exit(1);
  });
}
