// The native addon: loads (in worker threads too), agrees with the TypeScript backend,
// throws NativeError with codes, and reports a missing GPU clearly. A missing addon fails
// these tests loudly; set EP_ACTORS_NO_NATIVE=1 to run the suite without it on purpose.
import { test } from 'uvu';
import { seededRng } from '../src/moe/random.js';
import * as assert from 'uvu/assert';
import { Worker } from 'node:worker_threads';
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { spawn, spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { ncclVersion } from '../src/native/nccl.js';
import { CudaExpertBackend } from '../src/native/cuda.js';
import { readSafetensorsFile } from '../src/codec/safetensors.js';
import { loadCase, parseCase, resultTensors, runCase } from '../src/case.js';
import { Tensor, relativeError, type FloatDType } from '../src/tensor.js';
import { ACTIVATIONS, type Activation, type ExpertWeights } from '../src/ep/types.js';
import { tsBackend, convertLayout, weightTensors } from '../src/moe/experts.js';
import { tokenPositions } from '../src/ep/rows.js';
import {
  NativeError,
  NativeExpertBackend,
  loadNative,
  nativeBackend,
  nativeUnavailableReason,
  type NativeAddon,
} from '../src/native/backend.js';
import { goldenDir, repoRoot } from './paths.js';
import { actorRanks } from '../actors/caseRanks.js';
import { inProcessRanks } from '../actors/inprocess.js';

const disabled = process.env.EP_ACTORS_NO_NATIVE === '1';
const TOL = 1e-5;

/** Registers a test that needs the addon; with EP_ACTORS_NO_NATIVE=1 it is left out. */
function nativeTest(name: string, fn: (addon: NativeAddon) => unknown): void {
  if (!disabled) test(name, async () => { await fn(loadNative()!); });
}

test('the native addon is built and loads (EP_ACTORS_NO_NATIVE=1 to run without it)', () => {
  if (disabled) {
    assert.is(loadNative(), null);
    assert.match(nativeUnavailableReason() ?? '', /EP_ACTORS_NO_NATIVE/);
    return;
  }
  const a = loadNative();
  assert.ok(a, `native addon unavailable: ${nativeUnavailableReason()}`);
  const info = a!.info();
  assert.ok(['avx512', 'avx2-fma', 'generic'].includes(info.kernel));
  assert.ok(info.threads >= 1);
});

// ---- random inputs (a small deterministic generator, so failures reproduce) ----

/** Uniform in [-0.5, 0.5). */
function rng(seed: number): () => number {
  const next = seededRng(seed);
  return () => next() - 0.5;
}

function randTensor<F extends FloatDType>(dtype: F, shape: number[], r: () => number, scale = 1): Tensor<F> {
  const n = shape.reduce((a, b) => a * b, 1);
  return Tensor.from(dtype, shape, Array.from({ length: n }, () => r() * 2 * scale));
}

function packedWeights<F extends FloatDType>(dtype: F, act: Activation, n: number, d: number, h: number, r: () => number): ExpertWeights<F> {
  return {
    layout: 'packed',
    activation: act,
    up: randTensor(dtype, [n, d, h], r, 1 / Math.sqrt(d)),
    gate: act === 'silu' ? randTensor(dtype, [n, d, h], r, 1 / Math.sqrt(d)) : null,
    down: randTensor(dtype, [n, h, d], r, 1 / Math.sqrt(h)),
  };
}

const COUNTS: number[][] = [[7, 0, 13, 1], [0, 0, 0], [0, 33], [64]];

for (const dtype of ['f32', 'f64'] as const) {
  for (const act of ACTIVATIONS) {
    for (const layout of ['packed', 'unpacked'] as const) {
      nativeTest(`agrees with tsBackend: ${dtype} ${act} ${layout}, zero-row experts included`, async () => {
        let seed = 1;
        for (const counts of COUNTS) {
          const r = rng(seed++);
          const d = 24;
          const h = 41; // odd: rows·h leaves remainders, so the SIMD activations' narrower and scalar tails run too
          const R = counts.reduce((a, b) => a + b, 0);
          const packed = packedWeights(dtype, act, counts.length, d, h, r);
          const w = layout === 'packed' ? packed : convertLayout(packed, 'unpacked');
          const x = randTensor(dtype, [R, d], r);
          const gy = randTensor(dtype, [R, d], r);
          for (const backend of [nativeBackend, new NativeExpertBackend({ blas: false, sync: true })]) {
            const want = await tsBackend.forward(w, x, counts);
            const got = await backend.forward(w, x, counts);
            const where = `${backend.name} counts [${counts}]`;
            assert.ok(relativeError(got.y, want.y) <= TOL, `${where}: y off by ${relativeError(got.y, want.y)}`);
            const wb = await tsBackend.backward(w, x, counts, want, gy);
            const gb = await backend.backward(w, x, counts, got, gy);
            assert.ok(relativeError(gb.gradX, wb.gradX) <= TOL, `${where}: gradX off by ${relativeError(gb.gradX, wb.gradX)}`);
            assert.is(gb.grads.layout, layout);
            const gw = weightTensors(wb.grads);
            const gg = weightTensors(gb.grads);
            assert.is(gg.length, gw.length);
            gg.forEach((t, i) => {
              const e = relativeError(t, gw[i]!);
              assert.ok(e <= TOL, `${where}: weight grad ${i} off by ${e}`);
            });
          }
        }
      });
    }
  }
}

for (const name of readdirSync(goldenDir).filter((f) => f.endsWith('.safetensors')).sort()) {
  nativeTest(`golden ${name} on the native backend (with and without BLAS): every tensor within 1e-5`, async () => {
    const file = await readSafetensorsFile(join(goldenDir, name));
    for (const backend of [nativeBackend, new NativeExpertBackend({ blas: false })]) {
      const got = resultTensors(await runCase(parseCase(file), { runRanks: inProcessRanks, backend }));
      for (const key of [...file.tensors.keys()].filter((k) => k.startsWith('expected.'))) {
        const have = got.get(key.slice('expected.'.length));
        assert.ok(have, `${name}: no result for ${key}`);
        const err = relativeError(have!, file.tensors.get(key)!);
        assert.ok(err <= TOL, `${name} (${backend.name}): ${key} relative error ${err.toExponential(3)}`);
      }
    }
  });
}

for (const act of ['silu', 'gelu'] as const) {
  nativeTest(`the ${act} backward from what the forward kept (its output, and the SwiGLU's sigmoid) equals the one that evaluates them again, bit for bit`, (addon) => {
    const r = rng(5);
    const [d, h] = [24, 41]; // rows·h leaves SIMD remainders, which the scalar path takes
    const counts = Int32Array.from([7, 0, 13]);
    const R = 20;
    const gated = act === 'silu';
    const f32 = (n: number, scale = 1) => Float32Array.from({ length: n }, () => r() * 2 * scale);
    const weights = (n: number) => Array.from({ length: counts.length }, () => f32(n, 1 / Math.sqrt(d)));
    const base = { dtype: 'f32' as const, act, layout: 'packed' as const, d, h, counts, x: f32(R * d), up: weights(d * h), gate: gated ? weights(d * h) : null, down: weights(h * d), blas: false };
    const saveSigmoid = gated ? new Float64Array(R * h) : null;
    const saveHidden = new Float32Array(R * h);
    const fwd = { ...base, saveUp: new Float32Array(R * h), saveGate: gated ? new Float32Array(R * h) : null, saveSigmoid, saveHidden, y: new Float32Array(R * d) };
    addon.expertForward(fwd, true);
    const gy = f32(R * d);
    const backward = (sigmoid: Float64Array | null, hidden: Float32Array | null) => {
      const grads = () => Array.from({ length: counts.length }, () => new Float32Array(d * h));
      const job = { ...base, saveUp: fwd.saveUp, saveGate: fwd.saveGate, saveSigmoid: sigmoid, saveHidden: hidden, gy, gx: new Float32Array(R * d), gUp: grads(), gGate: gated ? grads() : null, gDown: grads() };
      addon.expertBackward(job, true);
      return [job.gx, ...job.gUp, ...(job.gGate ?? []), ...job.gDown].map((a) => Array.from(a));
    };
    const kept = backward(saveSigmoid, saveHidden);
    const sigmoidOnly = backward(saveSigmoid, null);
    const again = backward(null, null);
    if (saveSigmoid) assert.ok(saveSigmoid.some((v) => v > 0), 'the forward filled the saved sigmoid');
    assert.ok(saveHidden.some((v) => v !== 0), 'the forward filled the saved output');
    kept.forEach((a, i) => {
      assert.equal(a, again[i], `output ${i}, from what the forward kept`);
      assert.equal(sigmoidOnly[i], again[i], `output ${i}, from the saved sigmoid alone`);
    });
    // The kept output is read, not evaluated again: a changed one changes the down projection's gradient.
    const changed = backward(saveSigmoid, saveHidden.map((v) => v * 2));
    assert.not.equal(changed[1 + counts.length * (gated ? 2 : 1)], again[1 + counts.length * (gated ? 2 : 1)], 'gDown of expert 0 follows the kept output');
  });
}

nativeTest('results are bitwise deterministic across runs', async () => {
  const r = rng(99);
  const w = packedWeights('f32', 'silu', 3, 64, 96, r);
  const counts = [100, 0, 57];
  const x = randTensor('f32', [157, 64], r);
  const gy = randTensor('f32', [157, 64], r);
  for (const backend of [nativeBackend, new NativeExpertBackend({ blas: false })]) {
    const a = await backend.forward(w, x, counts);
    const b = await backend.forward(w, x, counts);
    assert.equal(Array.from(a.y.data), Array.from(b.y.data));
    const ga = await backend.backward(w, x, counts, a, gy);
    const gb = await backend.backward(w, x, counts, b, gy);
    assert.equal(Array.from(ga.gradX.data), Array.from(gb.gradX.data));
  }
});

nativeTest('own GEMM kernels and OpenBLAS agree with a plain triple loop, all transposes', (addon) => {
  const r = rng(5);
  const haveBlas = addon.info().blas !== null;
  for (const [m, n, k] of [[1, 1, 1], [13, 29, 7], [97, 70, 300], [6, 16, 0]] as const) {
    for (const ta of [false, true]) {
      for (const tb of [false, true]) {
        const a = Float32Array.from({ length: m * k }, r);
        const b = Float32Array.from({ length: k * n }, r);
        const c0 = Float32Array.from({ length: m * n }, r);
        for (const accumulate of [false, true]) {
          for (const impl of haveBlas ? (['own', 'blas'] as const) : (['own'] as const)) {
            const c = c0.slice();
            addon.gemm({ ta, tb, m, n, k, a, b, c, accumulate, impl });
            for (let i = 0; i < m; i++) {
              for (let j = 0; j < n; j++) {
                let s = accumulate ? c0[i * n + j]! : 0;
                for (let p = 0; p < k; p++) s += (ta ? a[p * m + i]! : a[i * k + p]!) * (tb ? b[j * k + p]! : b[p * n + j]!);
                if (Math.abs(s - c[i * n + j]!) > 1e-4) assert.unreachable(`${impl} ${m}x${n}x${k} ta=${ta} tb=${tb}: [${i},${j}] ${c[i * n + j]} vs ${s}`);
              }
            }
          }
        }
      }
    }
  }
});

nativeTest('the layer\'s row moves match their definition; a bad index throws NativeError naming it', () => {
  const src = Float32Array.from([0, 1, 10, 11, 20, 21]);
  const dst = new Float32Array(6);
  loadNative()!.moveRows(src, 2, Int32Array.from([2, 0, 2]), dst, null, false);
  assert.equal(Array.from(dst), [20, 21, 0, 1, 20, 21]);
  try {
    loadNative()!.moveRows(src, 2, Int32Array.from([3]), new Float32Array(2), null, false);
    assert.unreachable('no throw');
  } catch (e) {
    assert.instance(e, NativeError);
    assert.is((e as NativeError).code, 'INDEX_OUT_OF_RANGE');
    assert.match((e as Error).message, /outside \[0, 3\)/);
  }
});

nativeTest('futexWait and futexWake: a sleeper another thread wakes, a changed word, a timeout, a bad index', async (addon) => {
  if (process.platform !== 'linux') return;
  const words = new Int32Array(new SharedArrayBuffer(16));
  assert.is(addon.futexWait(words, 1, 7, 1000), 'not-equal'); // the word holds 0, not 7: no sleep at all
  assert.is(addon.futexWait(words, 1, 0, 1), 'timed-out');
  assert.is(addon.futexWake(words, 1), 0); // nobody sleeps there
  assert.throws(() => addon.futexWait(words, 4, 0, 1), (e: unknown) => e instanceof NativeError && /outside \[0, 4\)/.test((e as Error).message));
  assert.throws(() => addon.futexWait(words, 0, 0, -1), (e: unknown) => e instanceof NativeError && /timeout/.test((e as Error).message));
  // Another thread changes the word, then wakes this one, which sleeps with a 10 s bound.
  const backend = pathToFileURL(join(repoRoot, 'dist/src/native/backend.js')).href;
  const worker = new Worker(
    `const { workerData } = require('node:worker_threads');
     import(${JSON.stringify(backend)}).then(({ loadNative }) => {
       const w = new Int32Array(workerData);
       while (Atomics.load(w, 2) === 0) Atomics.wait(w, 2, 0, 5); // the main thread is about to sleep
       setTimeout(() => { Atomics.store(w, 1, 1); loadNative().futexWake(w, 1); }, 20);
     });`,
    { eval: true, workerData: words.buffer },
  );
  Atomics.store(words, 2, 1);
  // 'not-equal' only if the worker changed the word before this thread went to sleep (20 ms);
  // a wake that never came would read 'timed-out'.
  assert.ok(['ok', 'not-equal'].includes(addon.futexWait(words, 1, 0, 10_000)));
  assert.is(Atomics.load(words, 1), 1);
  await worker.terminate();
});

nativeTest('shared segments: another process maps one by its path, writes to it and wakes a shared futex sleeper; anything else at a path is refused', async (addon) => {
  if (process.platform !== 'linux') return;
  const { buffer, path } = addon.shmCreate(4096);
  const words = new Int32Array(buffer);
  assert.is(buffer.byteLength, 4096);
  assert.ok(words.every((w) => w === 0), 'a new segment is zero-filled');
  // This process's second mapping is the same memory.
  const again = new Int32Array(addon.shmOpen(path, 4096));
  again[3] = 77;
  assert.is(words[3], 77);
  assert.is(addon.futexWait(words, 1, 0, 1, true), 'timed-out');
  // Another process maps it, writes, then wakes this one, which sleeps with a 10 s bound.
  const backend = pathToFileURL(join(repoRoot, 'dist/src/native/backend.js')).href;
  const child = spawn(process.execPath, ['--input-type=module', '-e',
    `const { loadNative } = await import(${JSON.stringify(backend)});
     const a = loadNative();
     const w = new Int32Array(a.shmOpen(${JSON.stringify(path)}, 4096));
     while (Atomics.load(w, 2) === 0) a.futexWait(w, 2, 0, 5, true); // the parent is about to sleep
     setTimeout(() => { Atomics.store(w, 1, w[3] + 1); a.futexWake(w, 1, true); }, 20);`], { stdio: ['ignore', 'inherit', 'inherit'] });
  const exited = new Promise<number | null>((r) => child.once('exit', r));
  try {
    Atomics.store(words, 2, 1);
    const slept = Date.now();
    while (Atomics.load(words, 1) === 0 && Date.now() - slept < 10_000) addon.futexWait(words, 1, 0, 10_000, true);
    assert.is(Atomics.load(words, 1), 78, 'the other process read this one\'s write and wrote back');
  } finally {
    assert.is(await exited, 0);
  }
  // Only a sealed segment of exactly the size asked for is mapped.
  assert.throws(() => addon.shmOpen(path, 8192), (e: unknown) => e instanceof NativeError && /holds 4096 bytes, not 8192/.test((e as Error).message));
  const dir = mkdtempSync(join(tmpdir(), 'ep-shm-'));
  try {
    const plain = join(dir, 'plain');
    writeFileSync(plain, Buffer.alloc(4096));
    assert.throws(() => addon.shmOpen(plain, 4096), (e: unknown) => e instanceof NativeError && /not a sealed shared segment/.test((e as Error).message));
    assert.throws(() => addon.shmOpen(join(dir, 'missing'), 4096), (e: unknown) => e instanceof NativeError && /cannot open shared segment .*missing/.test((e as Error).message));
  } finally {
    rmSync(dir, { recursive: true });
  }
  assert.throws(() => addon.shmCreate(3), (e: unknown) => e instanceof NativeError && /whole number of bytes/.test((e as Error).message));
});

nativeTest('the kernels read and write typed arrays that a SharedArrayBuffer backs, at an offset', (addon) => {
  const shared = new Float32Array(new SharedArrayBuffer(40 * 4), 8 * 4, 32); // rows of 4 from element 8
  shared.forEach((_, i) => (shared[i] = i));
  const dst = new Float32Array(new SharedArrayBuffer(16 * 4), 4 * 4, 12);
  addon.moveRows(shared, 4, Int32Array.from([7, 0, 3]), dst, null, false);
  assert.equal(Array.from(dst), [28, 29, 30, 31, 0, 1, 2, 3, 12, 13, 14, 15]);
});

nativeTest("the EP layer's row kernels (moveRows, combineRows, routeGrad) match its TypeScript loops bit for bit", (addon) => {
  const r = rng(7);
  for (const dtype of ['f32', 'f64'] as const) {
    const make = (n: number) => Tensor.from(dtype, [n], Array.from({ length: n }, () => r() * 3)).data as Float32Array | Float64Array;
    const D = 5;
    const rows = 9;
    const src = make(rows * D);
    const index = Int32Array.from([4, 0, 8, 8, 1, 3]);
    const scale = Float64Array.from(index, () => r() * 2);
    for (const scatter of [false, true]) {
      for (const sc of [null, scale]) {
        const dst = make(rows * D);
        const want = dst.slice();
        addon.moveRows(src, D, index, dst, sc, scatter);
        index.forEach((row, i) => {
          const [s, o] = scatter ? [i, row] : [row, i];
          for (let d = 0; d < D; d++) want[o * D + d] = (sc ? sc[i]! : 1) * src[s * D + d]!;
        });
        assert.equal(Array.from(dst), Array.from(want), `moveRows ${dtype} scatter=${scatter} scale=${sc !== null}`);
      }
    }
    // The combine against the seed's scatter_add: out[token[p]] += w[p]·src[p] in send order, in f64, rounded once.
    const token = Int32Array.from([2, 0, 3, 2, 1, 0, 3, 1]);
    const [T, K] = [4, 2];
    const positions = tokenPositions(token, T, K);
    const rowsS = src.subarray(0, token.length * D);
    const weight = Float64Array.from(token, () => r() * 2);
    for (const w of [null, weight]) {
      const dst = make(T * D);
      addon.combineRows(rowsS, D, positions, K, w, dst);
      const sum = new Float64Array(T * D);
      token.forEach((t, p) => {
        for (let d = 0; d < D; d++) sum[t * D + d] += (w ? w[p]! : 1) * rowsS[p * D + d]!;
      });
      const want = dtype === 'f32' ? Array.from(Float32Array.from(sum)) : Array.from(sum);
      assert.equal(Array.from(dst), want, `combineRows ${dtype} weight=${w !== null}`);
    }
    const unordered = positions.slice();
    [unordered[0], unordered[1]] = [unordered[1]!, unordered[0]!];
    assert.throws(() => addon.combineRows(rowsS, D, unordered, K, null, make(T * D)), (e: unknown) => e instanceof NativeError && e.code === 'INDEX_OUT_OF_RANGE' && /not after/.test(e.message));
    const S = index.length;
    const ret = make(S * D);
    const entry = Int32Array.from([5, 2, 0, 1, 4, 3]);
    const gr = make(S * D).fill(0);
    const gw = new Float64Array(S);
    addon.routeGrad(src, D, ret, index, entry, scale, gr, gw);
    const wantGr = gr.slice().fill(0);
    const wantGw = new Float64Array(S);
    for (let p = 0; p < S; p++) {
      let dot = 0;
      for (let d = 0; d < D; d++) {
        const gv = src[index[p]! * D + d]!;
        wantGr[p * D + d] = scale[p]! * gv;
        dot += gv * ret[p * D + d]!;
      }
      wantGw[entry[p]!] = dot;
    }
    assert.equal(Array.from(gr), Array.from(wantGr), `routeGrad ${dtype} rows`);
    assert.equal(Array.from(gw), Array.from(wantGw), `routeGrad ${dtype} dots`);
  }
  try {
    addon.moveRows(new Float32Array(4), 2, Int32Array.from([2]), new Float32Array(2), null, false);
    assert.unreachable('no throw');
  } catch (e) {
    assert.instance(e, NativeError);
    assert.is((e as NativeError).code, 'INDEX_OUT_OF_RANGE');
  }
});

nativeTest('GEMM results do not depend on the thread count (own kernels; OpenBLAS in fixed blocks of C)', (addon) => {
  const r = rng(11);
  const info = addon.info();
  for (const impl of info.blas ? (['own', 'blas'] as const) : (['own'] as const)) {
    for (const [m, n, k, ta, tb] of [[1100, 70, 100, false, true], [64, 1100, 100, true, false]] as const) {
      const a = Float32Array.from({ length: m * k }, r);
      const b = Float32Array.from({ length: k * n }, r);
      const one = new Float32Array(m * n);
      const many = new Float32Array(m * n);
      addon.gemm({ ta, tb, m, n, k, a, b, c: one, impl, threads: 1 });
      addon.gemm({ ta, tb, m, n, k, a, b, c: many, impl, threads: 4 });
      assert.equal(Array.from(many), Array.from(one), `${impl} ${m}x${n}x${k}`);
    }
  }
});

nativeTest('argument errors come back as NativeError with a code, from async work too', async (addon) => {
  const w = packedWeights('f32', 'relu', 2, 4, 8, rng(3));
  assert.equal((await nativeBackend.forward(w, Tensor.zeros('f32', [0, 4]), [0, 0])).y.shape, [0, 4]);
  try {
    await nativeBackend.forward(w, Tensor.zeros('f32', [3, 4]), [1, 1]);
    assert.unreachable('no throw');
  } catch (e) {
    assert.instance(e, NativeError);
    assert.is((e as NativeError).code, 'BAD_ARGUMENT');
  }
  try {
    addon.gemm({ ta: false, tb: false, m: 2, n: 2, k: 2, a: new Float32Array(3), b: new Float32Array(4), c: new Float32Array(4), impl: 'own' });
    assert.unreachable('no throw');
  } catch (e) {
    assert.instance(e, NativeError);
    assert.match((e as Error).message, /job\.a holds 3 elements, expected 4/);
  }
});

nativeTest('the CUDA backend reports its state clearly (no CUDA device here, or not built)', async (addon) => {
  const info = addon.info();
  try {
    const c = addon.cudaInfo();
    assert.ok(info.cudaBuilt);
    assert.ok(c.devices >= 1, 'cudaInfo returned without a device');
  } catch (e) {
    assert.instance(e, NativeError);
    const err = e as NativeError;
    if (info.cudaBuilt) {
      assert.is(err.code, 'CUDA_NO_DEVICE');
      assert.match(err.message, /no CUDA device/);
    } else {
      assert.is(err.code, 'CUDA_NOT_BUILT');
    }
    // The CUDA expert backend fails the same clear way instead of computing anything.
    const w = packedWeights('f32', 'relu', 1, 4, 8, rng(1));
    try {
      await new CudaExpertBackend('f32').forward(w, Tensor.zeros('f32', [2, 4]), [2]);
      assert.unreachable('no throw');
    } catch (e2) {
      assert.instance(e2, NativeError);
      assert.is((e2 as NativeError).code, err.code);
    }
  }
});

nativeTest('a missing NCCL library is a NativeError naming the path tried (EP_ACTORS_NCCL or libnccl.so.2)', () => {
  const url = pathToFileURL(join(repoRoot, 'dist', 'src', 'native', 'nccl.js')).href;
  const probe = `import(${JSON.stringify(url)}).then((m) => { try { console.log(JSON.stringify(m.ncclVersion())); } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })); } });`;
  const r = spawnSync(process.execPath, ['-e', probe], { env: { ...process.env, EP_ACTORS_NCCL: '/nonexistent/libnccl.so.2' }, encoding: 'utf8' });
  const got = JSON.parse(r.stdout.trim()) as { code?: string; message?: string };
  assert.is(got.code, 'NCCL_LIBRARY_NOT_FOUND');
  assert.match(got.message ?? '', "could not load NCCL from '/nonexistent/libnccl.so.2'");
  try {
    const v = ncclVersion(); // this machine may have NCCL installed; then it reports a version
    assert.ok(v.code > 0);
  } catch (e) {
    assert.instance(e, NativeError);
    assert.is((e as NativeError).code, 'NCCL_LIBRARY_NOT_FOUND');
    assert.match((e as Error).message, /libnccl\.so\.2/);
  }
});


nativeTest('loads and computes in two worker threads at once, and unloads when they end', async () => {
  const url = pathToFileURL(join(repoRoot, 'dist', 'src', 'native', 'backend.js')).href;
  const src = `
    const { parentPort, workerData } = require('node:worker_threads');
    import(${JSON.stringify(url)}).then(async (m) => {
      const a = m.loadNative();
      if (!a) throw new Error(m.nativeUnavailableReason());
      const n = 64, x = new Float32Array(n * n).fill(workerData), c = new Float32Array(n * n);
      a.gemm({ ta: false, tb: false, m: n, n, k: n, a: x, b: x, c, impl: 'own' });
      let err;
      try { a.moveRows(x, n, Int32Array.of(n), new Float32Array(n), null, false); } catch (e) { err = e; }
      parentPort.postMessage({ c0: c[0], isNative: err instanceof m.NativeError, code: err && err.code });
    });`;
  const run = (v: number) =>
    new Promise<{ c0: number; isNative: boolean; code: string }>((resolve, reject) => {
      const w = new Worker(src, { eval: true, workerData: v });
      w.once('message', (msg) => {
        void w.terminate().then(() => resolve(msg));
      });
      w.once('error', reject);
    });
  const [a, b] = await Promise.all([run(1), run(2)]);
  assert.is(a.c0, 64);
  assert.is(b.c0, 256);
  assert.ok(a.isNative && b.isNative, 'each worker got its own NativeError class');
  assert.is(a.code, 'INDEX_OUT_OF_RANGE');
});

// Three steps: each takes the buffers the step before gave back, experts without rows included.
for (const [name, steps] of [['ep4_silu_packed', 1], ['ep4_gelu_unpacked_starve1', 3]] as const) {
  nativeTest(`golden ${name} on worker-thread ranks with the native backend (the addon loads in every worker), ${steps} step(s)`, async () => {
    const path = join(goldenDir, `${name}.safetensors`);
    const [data, file] = await Promise.all([loadCase(path), readSafetensorsFile(path)]);
    const got = resultTensors(await runCase(data, { runRanks: actorRanks({ backend: 'native', steps }) }));
    for (const [name, t] of got) {
      const err = relativeError(t, file.tensors.get(`expected.${name}`)!);
      assert.ok(err <= TOL, `${name}: relative error ${err}`);
    }
  });
}

nativeTest('the GPU check\'s launched-rank harness computes a golden case when pointed at TCP and the native kernels', async () => {
  const { launchedGolden } = await import('./gpu/gpucheck.js');
  assert.match(await launchedGolden('ep2_relu_top1_skew', 2, ['--exchange', 'tcp', '--backend', 'native']), /^worst relative error \d/);
});

test.run();
