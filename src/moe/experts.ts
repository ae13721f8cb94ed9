// The TypeScript expert backend: grouped forward and hand-written backward of the three
// expert MLPs KempnerForge builds (no biases):
//   silu (SwiGLU): y = (silu(x·gate) ⊙ (x·up))·down
//   gelu (exact erf form) and relu: y = act(x·up)·down
// Both weight layouts and f32/f64 are accepted. All arithmetic runs in f64 (JS numbers)
// and f32 results are rounded once when stored (the golden f32 cases agree with torch to
// about 2e-7 relative).
import { Tensor, type FloatDType } from '../tensor.js';
import type {
  Activation,
  ExpertBackend,
  ExpertBackward,
  ExpertForward,
  ExpertWeights,
  UnpackedExpert,
} from '../ep/types.js';

type Floats = Float32Array | Float64Array;

// ---- scalar math ----

const TWO_OVER_SQRT_PI = 1.1283791670955126; // 2/√π
const INV_SQRT_PI = 0.5641895835477563; // 1/√π
const INV_SQRT_2 = 0.7071067811865476;
const INV_SQRT_2PI = 0.3989422804014327; // 1/√(2π)

/**
 * erf to about 1e-16 relative in f64. For |x| < 3 the series
 * erf(x) = 2/√π · e^{-x²} · Σ_n 2^n x^{2n+1} / (1·3·…·(2n+1)) has only positive terms (no
 * cancellation); beyond, erfc(x) comes from its continued fraction (Lentz), which
 * converges quickly there and keeps 1 - erfc accurate.
 */
export function erf(x: number): number {
  if (Number.isNaN(x)) return NaN;
  const ax = Math.abs(x);
  if (ax < 3) {
    const x2 = x * x;
    let term = x;
    let sum = x;
    for (let n = 1; n < 200; n++) {
      term *= (2 * x2) / (2 * n + 1);
      sum += term;
      if (Math.abs(term) <= 1e-17 * Math.abs(sum)) break;
    }
    return TWO_OVER_SQRT_PI * Math.exp(-x2) * sum;
  }
  const r = 1 - erfcLarge(ax);
  return x < 0 ? -r : r;
}

/** erfc(x) for x >= 3: e^{-x²}/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))). */
function erfcLarge(x: number): number {
  if (x > 27) return 0; // e^{-x²} underflows
  const tiny = 1e-300;
  let f = x;
  let c = x;
  let d = 0;
  for (let n = 1; n < 500; n++) {
    const a = n / 2;
    d = x + a * d;
    d = d === 0 ? tiny : d;
    c = x + a / c;
    c = c === 0 ? tiny : c;
    d = 1 / d;
    const delta = c * d;
    f *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  return (INV_SQRT_PI * Math.exp(-x * x)) / f;
}

function sigmoid(a: number): number {
  return 1 / (1 + Math.exp(-a));
}

interface ActivationFn {
  f(a: number): number;
  /** d f / d a */
  df(a: number): number;
}

/** Pointwise activations and their derivatives (relu' at 0 is 0, as torch's threshold_backward). */
export const ACTIVATION_FNS: Record<Activation, ActivationFn> = {
  silu: {
    f: (a) => a * sigmoid(a),
    df: (a) => {
      const s = sigmoid(a);
      return s * (1 + a * (1 - s));
    },
  },
  gelu: {
    f: (a) => 0.5 * a * (1 + erf(a * INV_SQRT_2)),
    df: (a) => 0.5 * (1 + erf(a * INV_SQRT_2)) + a * INV_SQRT_2PI * Math.exp(-0.5 * a * a),
  },
  relu: {
    f: (a) => (a > 0 ? a : 0),
    df: (a) => (a > 0 ? 1 : 0),
  },
};

// ---- the one GEMM kernel (f64, row-major) ----

/**
 * c[M,N] += a[M,K] · b[K,N]. Blocks of 4 rows × 4 columns of c live in 16 locals while k
 * runs, so each step does 16 multiply-adds for 8 loads (the JIT keeps them in registers);
 * edges fall back to one row or column at a time.
 */
function mmAdd(a: Float64Array, aOff: number, b: Float64Array, bOff: number, c: Float64Array, cOff: number, M: number, K: number, N: number): void {
  const N4 = N - (N % 4);
  let i = 0;
  for (; i + 4 <= M; i += 4) {
    const a0 = aOff + i * K;
    const a1 = a0 + K;
    const a2 = a1 + K;
    const a3 = a2 + K;
    for (let j = 0; j < N4; j += 4) {
      let c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
      let c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
      for (let k = 0, bk = bOff + j; k < K; k++, bk += N) {
        const b0 = b[bk]!, b1 = b[bk + 1]!, b2 = b[bk + 2]!, b3 = b[bk + 3]!;
        const v0 = a[a0 + k]!, v1 = a[a1 + k]!, v2 = a[a2 + k]!, v3 = a[a3 + k]!;
        c00 += v0 * b0; c01 += v0 * b1; c02 += v0 * b2; c03 += v0 * b3;
        c10 += v1 * b0; c11 += v1 * b1; c12 += v1 * b2; c13 += v1 * b3;
        c20 += v2 * b0; c21 += v2 * b1; c22 += v2 * b2; c23 += v2 * b3;
        c30 += v3 * b0; c31 += v3 * b1; c32 += v3 * b2; c33 += v3 * b3;
      }
      const r0 = cOff + i * N + j;
      const r1 = r0 + N;
      const r2 = r1 + N;
      const r3 = r2 + N;
      c[r0] += c00; c[r0 + 1] += c01; c[r0 + 2] += c02; c[r0 + 3] += c03;
      c[r1] += c10; c[r1 + 1] += c11; c[r1 + 2] += c12; c[r1 + 3] += c13;
      c[r2] += c20; c[r2 + 1] += c21; c[r2 + 2] += c22; c[r2 + 3] += c23;
      c[r3] += c30; c[r3 + 1] += c31; c[r3 + 2] += c32; c[r3 + 3] += c33;
    }
    for (let r = i; r < i + 4; r++) mmAddColumns(a, aOff + r * K, b, bOff, c, cOff + r * N, K, N, N4);
  }
  for (; i < M; i++) mmAddColumns(a, aOff + i * K, b, bOff, c, cOff + i * N, K, N, 0);
}

/** One row of c, columns [from, N): c[j] += Σ_k a[k] · b[k, j]. */
function mmAddColumns(a: Float64Array, aRow: number, b: Float64Array, bOff: number, c: Float64Array, cRow: number, K: number, N: number, from: number): void {
  for (let k = 0; k < K; k++) {
    const av = a[aRow + k]!;
    const bRow = bOff + k * N;
    for (let j = from; j < N; j++) c[cRow + j] += av * b[bRow + j]!;
  }
}

/** The [cols, rows] transpose of the [rows, cols] block of `src` at `off`. */
function transposed(src: Float64Array, off: number, rows: number, cols: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = src[off + r * cols + c]!;
  return out;
}

// ---- layouts ----

/** Weights as packed (in, out) arrays over N local experts, whichever layout they came in. */
interface PackedMats {
  readonly N: number;
  readonly D: number;
  readonly H: number;
  readonly up: Float64Array; // [N,D,H]
  readonly gate: Float64Array | null; // [N,D,H]
  readonly down: Float64Array; // [N,H,D]
}

/** Per-expert (out, in) matrices [rows, cols] stacked as (in, out) blocks [N, cols, rows]. */
function stackTransposed(mats: readonly Tensor[], rows: number, cols: number): Float64Array {
  const out = new Float64Array(mats.length * rows * cols);
  mats.forEach((m, i) => out.set(transposed(asF64(m.data as Floats), 0, rows, cols), i * rows * cols));
  return out;
}

/** The values as f64: f64 storage as is, f32 converted (kernels then see a single array type). */
function asF64(a: Floats): Float64Array {
  return a instanceof Float64Array ? a : Float64Array.from(a);
}

function checkShape(t: Tensor, want: readonly number[], what: string): void {
  if (t.shape.length !== want.length || t.shape.some((d, i) => d !== want[i])) {
    throw new Error(`${what} has shape [${t.shape.join(', ')}], expected [${want.join(', ')}]`);
  }
}

function packedMats(w: ExpertWeights): PackedMats {
  const gated = w.activation === 'silu';
  if (w.layout === 'packed') {
    const [N, D, H] = w.up.shape as [number, number, number];
    checkShape(w.down, [N, H, D], 'down weights');
    if (gated !== (w.gate !== null)) throw new Error(`${w.activation} experts ${gated ? 'need' : 'have no'} gate weights`);
    if (w.gate) checkShape(w.gate, [N, D, H], 'gate weights');
    return { N, D, H, up: asF64(w.up.data), gate: w.gate && asF64(w.gate.data), down: asF64(w.down.data) };
  }
  const N = w.experts.length;
  if (N === 0) return { N, D: 0, H: 0, up: new Float64Array(0), gate: gated ? new Float64Array(0) : null, down: new Float64Array(0) };
  const [H, D] = w.experts[0]!.up.shape as [number, number];
  w.experts.forEach((e, i) => {
    checkShape(e.up, [H, D], `expert ${i} up`);
    checkShape(e.down, [D, H], `expert ${i} down`);
    if (gated !== (e.gate !== null)) throw new Error(`${w.activation} expert ${i} ${gated ? 'needs' : 'has no'} gate weights`);
    if (e.gate) checkShape(e.gate, [H, D], `expert ${i} gate`);
  });
  return {
    N,
    D,
    H,
    up: stackTransposed(w.experts.map((e) => e.up), H, D),
    gate: gated ? stackTransposed(w.experts.map((e) => e.gate!), H, D) : null,
    down: stackTransposed(w.experts.map((e) => e.down), D, H),
  };
}

/** An f64 array as a tensor of the given float dtype (rounded once for f32). */
export function floatTensor<F extends FloatDType>(dtype: F, shape: readonly number[], values: Float64Array): Tensor<F> {
  return new Tensor(dtype, shape, (dtype === 'f64' ? values : new Float32Array(values)) as Tensor<F>['data']);
}

/** Packed (in, out) f64 arrays over N experts as weights in the given layout. */
function inLayout<F extends FloatDType>(layout: ExpertWeights['layout'], activation: Activation, dtype: F, dims: { N: number; D: number; H: number }, up: Float64Array, gate: Float64Array | null, down: Float64Array): ExpertWeights<F> {
  const { N, D, H } = dims;
  if (layout === 'packed') {
    return {
      layout: 'packed',
      activation,
      up: floatTensor(dtype, [N, D, H], up),
      gate: gate && floatTensor(dtype, [N, D, H], gate),
      down: floatTensor(dtype, [N, H, D], down),
    };
  }
  const size = D * H;
  const experts: UnpackedExpert<F>[] = [];
  for (let i = 0; i < N; i++) {
    experts.push({
      up: floatTensor(dtype, [H, D], transposed(up, i * size, D, H)),
      gate: gate && floatTensor(dtype, [H, D], transposed(gate, i * size, D, H)),
      down: floatTensor(dtype, [D, H], transposed(down, i * size, H, D)),
    });
  }
  return { layout: 'unpacked', activation, experts };
}

function weightsDType<F extends FloatDType>(w: ExpertWeights<F>): F {
  return w.layout === 'packed' ? w.up.dtype : (w.experts[0]?.up.dtype ?? ('f32' as F));
}

/** Every tensor of a weight set (or of its gradients), in either layout. */
export function weightTensors<F extends FloatDType>(w: ExpertWeights<F>): Tensor<F>[] {
  const parts = w.layout === 'packed' ? [w] : w.experts;
  return parts.flatMap((e) => (e.gate ? [e.up, e.gate, e.down] : [e.up, e.down]));
}

/** The same experts in the other layout (copies): packed [N, …] (in, out) <-> per-expert (out, in) Linears. */
export function convertLayout<F extends FloatDType>(w: ExpertWeights<F>, layout: ExpertWeights['layout']): ExpertWeights<F> {
  const m = packedMats(w);
  const copy = (a: Float64Array): Float64Array => a.slice();
  return inLayout(layout, w.activation, weightsDType(w), m, copy(m.up), m.gate && copy(m.gate), copy(m.down));
}

// ---- the backend ----

interface Saved {
  readonly aUp: Float64Array; // [R,H] x·up
  readonly aGate: Float64Array | null; // [R,H] x·gate (silu only)
  readonly hidden: Float64Array; // [R,H] activation output fed to down
}

function checkGroups(x: Tensor, m: PackedMats, rowsPerExpert: readonly number[]): number {
  if (rowsPerExpert.length !== m.N) throw new Error(`rowsPerExpert has ${rowsPerExpert.length} entries for ${m.N} local experts`);
  const R = rowsPerExpert.reduce((a, b) => a + b, 0);
  if (R !== (x.shape[0] ?? 0) || x.rowSize !== m.D) throw new Error(`expert input [${x.shape.join(', ')}] does not hold ${R} rows of dim ${m.D}`);
  return R;
}

function forward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[]): ExpertForward<F> {
  const m = packedMats(w);
  const R = checkGroups(x, m, rowsPerExpert);
  const { D, H } = m;
  const xs = asF64(x.data);
  const act = ACTIVATION_FNS[w.activation];
  const aUp = new Float64Array(R * H);
  const aGate = m.gate ? new Float64Array(R * H) : null;
  const hidden = new Float64Array(R * H);
  const y = new Float64Array(R * D);
  let row = 0;
  rowsPerExpert.forEach((c, i) => {
    mmAdd(xs, row * D, m.up, i * D * H, aUp, row * H, c, D, H);
    if (aGate) mmAdd(xs, row * D, m.gate!, i * D * H, aGate, row * H, c, D, H);
    for (let p = row * H; p < (row + c) * H; p++) hidden[p] = aGate ? act.f(aGate[p]!) * aUp[p]! : act.f(aUp[p]!);
    mmAdd(hidden, row * H, m.down, i * H * D, y, row * D, c, H, D);
    row += c;
  });
  const saved: Saved = { aUp, aGate, hidden };
  return { y: floatTensor(x.dtype, [R, D], y), saved };
}

function backward<F extends FloatDType>(w: ExpertWeights<F>, x: Tensor<F>, rowsPerExpert: readonly number[], fwd: ExpertForward<F>, gradY: Tensor<F>): ExpertBackward<F> {
  const m = packedMats(w);
  const R = checkGroups(x, m, rowsPerExpert);
  checkShape(gradY, [R, m.D], 'gradY');
  const { N, D, H } = m;
  const xs = asF64(x.data);
  const gy = asF64(gradY.data);
  const { aUp, aGate, hidden } = fwd.saved as Saved;
  const act = ACTIVATION_FNS[w.activation];
  const gUpW = new Float64Array(N * D * H);
  const gGateW = aGate ? new Float64Array(N * D * H) : null;
  const gDownW = new Float64Array(N * H * D);
  const gHidden = new Float64Array(R * H);
  const gUp = new Float64Array(R * H);
  const gGate = aGate ? new Float64Array(R * H) : null;
  const gX = new Float64Array(R * D);
  let row = 0;
  rowsPerExpert.forEach((c, i) => {
    if (c === 0) return;
    const wOff = i * D * H;
    // Every product is c += a·b; the transposes it needs are formed per expert (small).
    mmAdd(gy, row * D, transposed(m.down, wOff, H, D), 0, gHidden, row * H, c, D, H);
    mmAdd(transposed(hidden, row * H, c, H), 0, gy, row * D, gDownW, wOff, H, c, D);
    for (let p = row * H; p < (row + c) * H; p++) {
      if (aGate) {
        gUp[p] = gHidden[p]! * act.f(aGate[p]!);
        gGate![p] = gHidden[p]! * aUp[p]! * act.df(aGate[p]!);
      } else {
        gUp[p] = gHidden[p]! * act.df(aUp[p]!);
      }
    }
    const xT = transposed(xs, row * D, c, D);
    mmAdd(gUp, row * H, transposed(m.up, wOff, D, H), 0, gX, row * D, c, H, D);
    mmAdd(xT, 0, gUp, row * H, gUpW, wOff, D, c, H);
    if (gGate) {
      mmAdd(gGate, row * H, transposed(m.gate!, wOff, D, H), 0, gX, row * D, c, H, D);
      mmAdd(xT, 0, gGate, row * H, gGateW!, wOff, D, c, H);
    }
    row += c;
  });
  return { gradX: floatTensor(x.dtype, [R, D], gX), grads: inLayout(w.layout, w.activation, x.dtype, m, gUpW, gGateW, gDownW) };
}

/** Expert math in TypeScript: the reference backend, and the one used where no addon is built. */
export const tsBackend: ExpertBackend = { name: 'ts', forward, backward };
