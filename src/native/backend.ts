// The native addon's TypeScript face: the loader, the NativeError class the addon throws,
// and `nativeBackend`, an ExpertBackend over the addon's C++ kernels. Arguments are checked
// here first; the addon re-checks every length before touching memory.
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Tensor, type FloatDType, type StorageOf } from '../tensor.js';
import { takeUnfilled, type ScratchPool } from '../ep/scratch.js';
import type {
  Activation,
  ExpertBackend,
  ExpertBackward,
  ExpertForward,
  ExpertWeights,
  PackedExperts,
  UnpackedExpert,
} from '../ep/types.js';

/** An error raised inside the addon: `code` is CUDA_ERROR_..., NCCL_..., BAD_ARGUMENT, ... */
export class NativeError extends Error {
  override name = 'NativeError';
  readonly code: string;
  constructor(message: string, code: string) {
    super(message);
    this.code = code;
  }
}

type Floats = Float32Array | Float64Array;

/** The job objects the addon reads (native/src/addon.cc, parseJob). */
export interface ExpertJob {
  dtype: FloatDType;
  act: Activation;
  layout: 'packed' | 'unpacked';
  d: number;
  h: number;
  counts: Int32Array;
  x: Floats;
  up: Floats[];
  gate: Floats[] | null;
  down: Floats[];
  saveUp: Floats;
  saveGate: Floats | null;
  /** sigmoid(x·gate) in f64, f32 SwiGLU only: the forward fills it (on SIMD CPUs), the backward reuses it. */
  saveSigmoid?: Float64Array | null;
  /** The activation's output [R, H]: the forward fills it, the backward reads it instead of evaluating the activation again. */
  saveHidden?: Floats | null;
  y?: Floats;
  gy?: Floats;
  gx?: Floats;
  gUp?: Floats[];
  gGate?: Floats[] | null;
  gDown?: Floats[];
  /** Use OpenBLAS for the GEMMs when it loaded (else our own kernels). */
  blas: boolean;
}

export interface GemmSpec {
  dtype?: FloatDType;
  ta: boolean;
  tb: boolean;
  m: number;
  n: number;
  k: number;
  a: Floats;
  b: Floats;
  c: Floats;
  accumulate?: boolean;
  /** 'own': our kernels; 'blas': OpenBLAS (NativeError BLAS_UNAVAILABLE if absent); 'auto'. */
  impl: 'own' | 'blas' | 'auto';
  /** At most this many threads (default: the machine's; fewer while expert jobs hold cores). */
  threads?: number;
}

export interface NativeInfo {
  /** The CBLAS library that loaded (e.g. libopenblas.so.0), or null. */
  blas: string | null;
  blasReason: string;
  /** Our GEMM's micro-kernel on this CPU: 'avx512', 'avx2-fma' or 'generic'. */
  kernel: string;
  threads: number;
  cudaBuilt: boolean;
}

export interface NativeAddon {
  setErrorClass(ctor: typeof NativeError): void;
  info(): NativeInfo;
  /** Caps every CPU kernel of this process (worker threads included) at n threads; 0 restores EP_ACTORS_THREADS or the cores. */
  setThreads(n: number): void;
  expertForward(job: ExpertJob, sync: true): undefined;
  expertForward(job: ExpertJob, sync?: false): Promise<void>;
  expertBackward(job: ExpertJob, sync: true): undefined;
  expertBackward(job: ExpertJob, sync?: false): Promise<void>;
  gemm(spec: GemmSpec): void;
  // The EP layer's row bookkeeping (src/ep/layer.ts), same arithmetic as its TypeScript loops.
  /** gather: dst[i] = scale[i]·src[index[i]]; scatter: dst[index[i]] = scale[i]·src[i] (scale 1 when null). */
  moveRows(src: Floats, rowSize: number, index: Int32Array, dst: Floats, scale: Float64Array | null, scatter: boolean): void;
  /** dst[t] = Σ_k weight[p]·src[p] over p = positions[t·K + k] (ascending per t; weight 1 when null), in f64 from 0, rounded once. */
  combineRows(src: Floats, rowSize: number, positions: Int32Array, K: number, weight: Float64Array | null, dst: Floats): void;
  /** gr[p] = w[p]·g[token[p]]; gw[entry[p]] = <g[token[p]], ret[p]> (f64). */
  routeGrad(g: Floats, D: number, ret: Floats, token: Int32Array, entry: Int32Array, w: Float64Array, gr: Floats, gw: Float64Array): void;
  /**
   * Atomics.wait on words[index] as one futex call (Linux); woken only by futexWake. Private
   * unless `shared` (the words are in a segment of shmCreate that other processes map).
   */
  futexWait(words: Int32Array, index: number, expected: number, timeoutMs: number, shared?: boolean): 'ok' | 'not-equal' | 'timed-out';
  /** Wakes one futexWait sleeper on words[index] (shared: as futexWait was told); how many woke. */
  futexWake(words: Int32Array, index: number, shared?: boolean): number;
  /** Gives this thread's core to another runnable thread, if there is one (sched_yield). */
  yieldThread(): void;
  /**
   * A zero-filled segment of `bytes` that processes of this user on this host can map by
   * `path` (shmOpen), and that goes away once none maps it (Linux).
   */
  shmCreate(bytes: number): { buffer: ArrayBuffer; path: string };
  /** Maps the segment shmCreate made at `path`; throws unless it is one, of exactly `bytes`. */
  shmOpen(path: string, bytes: number): ArrayBuffer;
  // CUDA (native/src/cuda_backend.cc); each throws NativeError CUDA_NOT_BUILT in a CPU-only build.
  cudaInfo(): { devices: number; names: string[]; runtimeVersion: number; driverVersion: number };
  /** The device this thread's kernels and copies use (its own stream is created on it). */
  cudaSetDevice(device: number): void;
  cudaExpertForward(job: ExpertJob, precision: 'f32' | 'bf16'): void;
  cudaExpertBackward(job: ExpertJob, precision: 'f32' | 'bf16'): void;
  cudaAlloc(bytes: number): bigint;
  cudaFree(p: bigint): void;
  cudaUpload(p: bigint, data: ArrayBufferView): void;
  cudaDownload(p: bigint, data: ArrayBufferView): void;
  cudaCopy(dst: bigint, src: bigint, bytes: number): void;
  /** Device permutation of (token, k) entries by expert: the dispatch side (the GPU check compares it with its CPU definition). */
  cudaPermute(keys: Int32Array, experts: number, x: Float32Array, topK: number): { order: Int32Array; pos: Int32Array; counts: Int32Array; rows: Float32Array };
  /** Weighted scatter-add of permuted rows back to tokens: the combine side. */
  cudaScatterAdd(rows: Float32Array, pos: Int32Array, weights: Float32Array, topK: number): Float32Array;
  cudaBench(kind: 'gemm' | 'permute', spec: Record<string, unknown>): Record<string, number>;
  // NCCL, loaded with dlopen (native/src/nccl.cc); blocking calls run on their own native threads.
  ncclVersion(): { code: number; path: string };
  ncclGetUniqueId(): Uint8Array;
  ncclCommInit(id: Uint8Array, size: number, rank: number, device: number): Promise<number>;
  ncclExchangeCounts(h: number, counts: BigInt64Array, position: number, op: string, timeoutMs: number): Promise<BigInt64Array>;
  ncclAllToAll(h: number, send: bigint, sendBytes: number[], recv: bigint, recvBytes: number[], timeoutMs: number): Promise<void>;
  ncclAbort(h: number): void;
  ncclDestroy(h: number): void;
}

function findRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'ep-actors') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error('ep-actors: cannot find the package root above ' + fileURLToPath(import.meta.url));
    dir = up;
  }
}

/** Where the built addon lives (EP_ACTORS_NATIVE_PATH overrides). */
export function nativeAddonPath(): string {
  return process.env.EP_ACTORS_NATIVE_PATH ?? join(findRoot(), 'native', 'build', 'Release', 'ep_actors_native.node');
}

let loaded: { addon: NativeAddon | null; reason: string | null } | undefined;

/** The addon for this thread (loaded once per thread), or null; nativeUnavailableReason() says why. */
export function loadNative(): NativeAddon | null {
  if (loaded) return loaded.addon;
  if (process.env.EP_ACTORS_NO_NATIVE === '1') {
    loaded = { addon: null, reason: 'disabled by EP_ACTORS_NO_NATIVE=1' };
    return null;
  }
  const path = nativeAddonPath();
  if (!existsSync(path)) {
    loaded = { addon: null, reason: `the native addon is not built (${path} is missing; run \`node native/build.mjs\`)` };
    return null;
  }
  try {
    const addon = createRequire(import.meta.url)(path) as NativeAddon;
    addon.setErrorClass(NativeError);
    loaded = { addon, reason: null };
  } catch (e) {
    loaded = { addon: null, reason: `the native addon at ${path} failed to load: ${e instanceof Error ? e.message : String(e)}` };
  }
  return loaded.addon;
}

/** Why loadNative() returned null; null when the addon is loaded. */
export function nativeUnavailableReason(): string | null {
  loadNative();
  return loaded!.reason;
}

/** The addon, or a NativeError NATIVE_UNAVAILABLE naming the reason. */
export function requireNative(): NativeAddon {
  const a = loadNative();
  if (!a) throw new NativeError(`native backend unavailable: ${loaded!.reason}`, 'NATIVE_UNAVAILABLE');
  return a;
}

// ---- the expert backend ----

const SAVED = Symbol('native expert forward');

interface NativeSaved {
  readonly [SAVED]: true;
  readonly up: Floats;
  readonly gate: Floats | null;
  readonly sigmoid: Float64Array | null;
  readonly hidden: Floats | null;
  readonly counts: Int32Array;
}

/** The saved activations of a job before its direction sets them. */
const NO_ROWS = new Float32Array(0);

/** An output buffer the kernels write in full (every row belongs to one expert). */
function alloc(dtype: FloatDType, n: number, scratch: ScratchPool | undefined): Floats {
  return takeUnfilled(scratch, dtype, [n]).data as Floats;
}

function describe(w: ExpertWeights): { n: number; d: number; h: number } {
  if (w.layout === 'packed') {
    const [n, d, h] = w.up.shape as [number, number, number];
    return { n, d, h };
  }
  const first = w.experts[0];
  if (!first) return { n: 0, d: 0, h: 0 };
  const [h, d] = first.up.shape as [number, number];
  return { n: w.experts.length, d, h };
}

function checkShape(t: Tensor, shape: readonly number[], what: string, dtype: FloatDType): void {
  if (t.dtype !== dtype) throw new NativeError(`${what} is ${t.dtype}, expected ${dtype}`, 'BAD_ARGUMENT');
  if (t.shape.length !== shape.length || t.shape.some((s, i) => s !== shape[i]))
    throw new NativeError(`${what} has shape [${t.shape.join(', ')}], expected [${shape.join(', ')}]`, 'BAD_ARGUMENT');
}

/** Per-expert views of a weight set (no copies), checked against D, H and the activation. */
function weightViews(w: ExpertWeights, dtype: FloatDType, d: number, h: number): { up: Floats[]; gate: Floats[] | null; down: Floats[] } {
  const gated = w.activation === 'silu';
  if (w.layout === 'packed') {
    const n = w.up.shape[0] ?? 0;
    checkShape(w.up, [n, d, h], 'up', dtype);
    checkShape(w.down, [n, h, d], 'down', dtype);
    if (gated !== (w.gate !== null)) throw new NativeError(`gate weights must be present exactly for silu (activation ${w.activation})`, 'BAD_ARGUMENT');
    if (w.gate) checkShape(w.gate, [n, d, h], 'gate', dtype);
    const views = (t: Tensor) => Array.from({ length: n }, (_, i) => (t.data as Floats).subarray(i * d * h, (i + 1) * d * h));
    return { up: views(w.up), gate: w.gate ? views(w.gate) : null, down: views(w.down) };
  }
  const up: Floats[] = [];
  const gate: Floats[] = [];
  const down: Floats[] = [];
  w.experts.forEach((e: UnpackedExpert, i) => {
    checkShape(e.up, [h, d], `experts[${i}].up`, dtype);
    checkShape(e.down, [d, h], `experts[${i}].down`, dtype);
    if (gated !== (e.gate !== null)) throw new NativeError(`experts[${i}].gate must be present exactly for silu`, 'BAD_ARGUMENT');
    if (e.gate) {
      checkShape(e.gate, [h, d], `experts[${i}].gate`, dtype);
      gate.push(e.gate.data as Floats);
    }
    up.push(e.up.data as Floats);
    down.push(e.down.data as Floats);
  });
  return { up, gate: gated ? gate : null, down };
}

export interface NativeBackendOptions {
  /** Use OpenBLAS's sgemm/dgemm when it loaded (default true); false measures our own kernels. */
  blas?: boolean;
  /** Run on the calling thread instead of libuv's pool (default false). */
  sync?: boolean;
  /** Run the prepared jobs elsewhere (the CUDA backend reuses these checks and buffers). */
  runForward?: (job: ExpertJob) => void;
  runBackward?: (job: ExpertJob) => void;
}

export class NativeExpertBackend implements ExpertBackend {
  readonly name: string;
  readonly #blas: boolean;
  readonly #sync: boolean;
  readonly #runForward: ((job: ExpertJob) => void) | undefined;
  readonly #runBackward: ((job: ExpertJob) => void) | undefined;

  constructor(opts: NativeBackendOptions = {}) {
    this.#blas = opts.blas ?? true;
    this.#sync = opts.sync ?? false;
    this.#runForward = opts.runForward;
    this.#runBackward = opts.runBackward;
    this.name = this.#blas ? 'native' : 'native-noblas';
  }

  /** The job both directions share; the caller sets the saved activations (forward: new, backward: the forward's). */
  #job<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[]): { job: ExpertJob; R: number; d: number; h: number } {
    const { n, d: dW, h } = describe(w);
    if (x.dtype !== 'f32' && x.dtype !== 'f64') throw new NativeError(`native backend takes f32 or f64, got ${x.dtype}`, 'BAD_ARGUMENT');
    if (x.shape.length !== 2) throw new NativeError(`x must be [R, D], got [${x.shape.join(', ')}]`, 'BAD_ARGUMENT');
    const [R, d] = x.shape as [number, number];
    if (n > 0 && d !== dW) throw new NativeError(`x has D = ${d} but the experts take ${dW}`, 'BAD_ARGUMENT');
    if (rowsPerExpert.length !== n) throw new NativeError(`${rowsPerExpert.length} row counts for ${n} local experts`, 'BAD_ARGUMENT');
    let sum = 0;
    for (const c of rowsPerExpert) {
      if (!Number.isSafeInteger(c) || c < 0) throw new NativeError(`bad row count ${c}`, 'BAD_ARGUMENT');
      sum += c;
    }
    if (sum !== R) throw new NativeError(`row counts sum to ${sum} but x has ${R} rows`, 'BAD_ARGUMENT');
    const v = weightViews(w, x.dtype, d, h);
    const job: ExpertJob = {
      dtype: x.dtype,
      act: w.activation,
      layout: w.layout,
      d,
      h,
      counts: Int32Array.from(rowsPerExpert),
      x: x.data as Floats,
      up: v.up,
      gate: v.gate,
      down: v.down,
      saveUp: NO_ROWS,
      saveGate: null,
      blas: this.#blas,
    };
    return { job, R, d, h };
  }

  async forward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[], scratch?: ScratchPool): Promise<ExpertForward<F>> {
    const addon = requireNative();
    const { job, R, d, h } = this.#job(w, x, rowsPerExpert);
    job.saveUp = alloc(x.dtype, R * h, scratch);
    if (w.activation === 'silu') job.saveGate = alloc(x.dtype, R * h, scratch);
    // Memory for exp: the backward would evaluate it again (the CUDA jobs keep their own).
    if (w.activation === 'silu' && x.dtype === 'f32' && !this.#runForward) job.saveSigmoid = alloc('f64', R * h, scratch) as Float64Array;
    // Memory for a pass over the activations: the backward would build h again (not on CUDA).
    if (!this.#runForward) job.saveHidden = alloc(x.dtype, R * h, scratch);
    job.y = alloc(x.dtype, R * d, scratch);
    if (this.#runForward) this.#runForward(job);
    else if (this.#sync) addon.expertForward(job, true);
    else await addon.expertForward(job);
    const saved: NativeSaved = { [SAVED]: true, up: job.saveUp, gate: job.saveGate, sigmoid: job.saveSigmoid ?? null, hidden: job.saveHidden ?? null, counts: job.counts };
    return { y: new Tensor(x.dtype, [R, d], job.y as StorageOf[F]), saved };
  }

  async backward<F extends FloatDType>(
    w: ExpertWeights<F>,
    x: Tensor<F>,
    rowsPerExpert: readonly number[],
    fwd: ExpertForward<F>,
    gradY: Tensor<F>,
    scratch?: ScratchPool,
  ): Promise<ExpertBackward<F>> {
    const addon = requireNative();
    const saved = fwd.saved as NativeSaved | undefined;
    if (!saved || saved[SAVED] !== true) throw new NativeError('backward needs the ExpertForward of the native backend', 'BAD_ARGUMENT');
    const { job, R, d, h } = this.#job(w, x, rowsPerExpert);
    checkShape(gradY, [R, d], 'gradY', x.dtype);
    if (saved.up.length !== R * h) throw new NativeError('the saved forward does not match these inputs', 'BAD_ARGUMENT');
    job.saveUp = saved.up;
    job.saveGate = saved.gate;
    job.saveSigmoid = saved.sigmoid;
    job.saveHidden = saved.hidden;
    job.gy = gradY.data as Floats;
    job.gx = alloc(x.dtype, R * d, scratch);
    const grads = gradBuffers(w, x.dtype, d, h, scratch);
    const v = weightViews(grads, x.dtype, d, h);
    job.gUp = v.up;
    job.gGate = v.gate;
    job.gDown = v.down;
    if (this.#runBackward) this.#runBackward(job);
    else if (this.#sync) addon.expertBackward(job, true);
    else await addon.expertBackward(job);
    scratch?.give(saved.up, saved.gate, saved.sigmoid, saved.hidden); // the forward is consumed
    return { gradX: new Tensor(x.dtype, [R, d], job.gx as StorageOf[F]), grads };
  }
}

/** Gradient tensors shaped as the weights; the backward writes every element (zeros for an expert without rows). */
function gradBuffers<F extends FloatDType>(w: ExpertWeights<F>, dtype: FloatDType, d: number, h: number, scratch: ScratchPool | undefined): ExpertWeights<F> {
  const z = (shape: number[]) => takeUnfilled(scratch, dtype, shape) as Tensor<F>;
  if (w.layout === 'packed') {
    const n = w.up.shape[0] ?? 0;
    const p: PackedExperts<F> = { layout: 'packed', activation: w.activation, up: z([n, d, h]), gate: w.gate ? z([n, d, h]) : null, down: z([n, h, d]) };
    return p;
  }
  return {
    layout: 'unpacked',
    activation: w.activation,
    experts: w.experts.map((e) => ({ up: z([h, d]), gate: e.gate ? z([h, d]) : null, down: z([d, h]) })),
  };
}

/** The native CPU backend (OpenBLAS GEMMs when present, else our own kernels). */
export const nativeBackend: ExpertBackend = new NativeExpertBackend();
/** The same, running each job on the calling thread instead of libuv's pool. */
export const nativeBackendOnCaller: ExpertBackend = new NativeExpertBackend({ sync: true });
