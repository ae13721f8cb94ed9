// Case files (safetensors): load and validate one, run the EP layer forward and backward
// on every rank, collect the results. Validation happens before anything runs, so every
// bad input becomes one CaseError naming the tensor or metadata key and what is wrong.
//
// Floats may be stored as f32, f64, bf16 or f16. The 16-bit ones are widened to f32 on load
// (exactly) and computed in f32, so results are f32 and compare to a reference within
// RESULT_TOLERANCE of the file's dtype.
//
// runCase takes the rank loop as a parameter: the runtime's in-process ranks (async tasks
// over one communicator group) or its worker-thread ranks, each running `runCaseRank`.
import { Tensor, toFloat64, toIndexArray, type FloatDType } from './tensor.js';
import { CaseError, describeError } from './errors.js';
import { ACTIVATIONS, type Activation, type Communicator, type ExpertBackend, type ExpertWeights, type PackedExperts } from './ep/types.js';
import { epBackward, epForward, localExpertRange, localExperts, placeLocalGrads } from './ep/layer.js';
import { convertLayout, tsBackend } from './moe/experts.js';
import { readSafetensorsFile, type SafetensorsFile } from './codec/safetensors.js';
import { randomRouting, randomTensor, seededRng } from './moe/random.js';

export interface CaseMeta {
  readonly ep: number;
  readonly numExperts: number;
  readonly topK: number;
  readonly dim: number;
  readonly hidden: number;
  readonly activation: Activation;
  readonly packed: boolean;
  readonly gradientScale: boolean;
}

export interface RankInputs<F extends FloatDType = FloatDType> {
  readonly x_TD: Tensor<F>;
  readonly weights_TK: Tensor<F>;
  readonly indices_TK: Tensor;
  readonly gradOut_TD: Tensor<F>;
}

/** The dtypes a case file's float tensors may have (all the same one). */
export const CASE_DTYPES = ['f32', 'f64', 'bf16', 'f16'] as const;
export type CaseDtype = (typeof CASE_DTYPES)[number];

/**
 * Relative error ||got - want|| / ||want|| per result tensor within which a run matches a
 * reference computed in f32 from the unrounded inputs, by the case file's dtype: 1e-5 for f32
 * (the golden cases); for bf16 and f16 eight units of input rounding (2^-8, 2^-11), as a
 * result is several roundings deep (the golden cases rounded reach 5.2 units in bf16, where a
 * rounded input flips ReLU's mask). A reference itself computed in 16 bits adds its own error.
 */
export const RESULT_TOLERANCE: Record<CaseDtype, number> = { f32: 1e-5, f64: 1e-5, bf16: 8 * 2 ** -8, f16: 8 * 2 ** -11 };

export interface CaseData<F extends FloatDType = FloatDType> {
  readonly meta: CaseMeta;
  /** The dtype computed in: the file's, or f32 for a bf16 or f16 file. */
  readonly dtype: F;
  /** The dtype of the file's float tensors. */
  readonly fileDtype: CaseDtype;
  /** Global experts [E, …], packed layout as stored in the file. */
  readonly experts: PackedExperts<F>;
  readonly ranks: readonly RankInputs<F>[];
}

export interface RankResult<F extends FloatDType = FloatDType> {
  readonly out_TD: Tensor<F>;
  readonly gradX_TD: Tensor<F>;
  readonly gradWeights_TK: Tensor<F>;
  /** This rank's expert grads in packed layout [N, …]. */
  readonly grads: PackedExperts<F>;
  readonly rowsSent: number;
  readonly rowsReceived: number;
}

export interface CaseResult<F extends FloatDType = FloatDType> {
  readonly ranks: readonly RankResult<F>[];
  /** Expert grads over all experts, packed [E, …]. */
  readonly grads: PackedExperts<F>;
}

/** Runs every rank of a case and returns their results in rank order. */
export type RankLoop = <F extends FloatDType>(data: CaseData<F>, backend: ExpertBackend) => Promise<RankResult<F>[]>;

export interface RunOptions {
  readonly backend?: ExpertBackend;
  /** How the ranks run: in-process tasks (actors/inprocess.ts), worker threads (actors/caseRanks.ts). */
  readonly runRanks: RankLoop;
}

const META_KEYS = ['ep', 'num_experts', 'top_k', 'dim', 'hidden', 'activation', 'packed', 'gradient_scale'] as const;

function metaInt(meta: Record<string, string>, key: string): number {
  const v = meta[key]!;
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(Number(v)) || Number(v) < 1) throw new CaseError(`metadata ${key} must be a positive integer, got '${v}'`);
  return Number(v);
}

function metaBool(meta: Record<string, string>, key: string): boolean {
  const v = meta[key]!;
  if (v !== 'true' && v !== 'false') throw new CaseError(`metadata ${key} must be 'true' or 'false', got '${v}'`);
  return v === 'true';
}

function parseMeta(meta: Record<string, string>): CaseMeta {
  for (const key of META_KEYS) if (meta[key] === undefined) throw new CaseError(`metadata ${key} is missing`);
  const activation = meta.activation as Activation;
  if (!ACTIVATIONS.includes(activation)) throw new CaseError(`metadata activation '${meta.activation}' is unknown (expected ${ACTIVATIONS.join(', ')})`);
  const m: CaseMeta = {
    ep: metaInt(meta, 'ep'),
    numExperts: metaInt(meta, 'num_experts'),
    topK: metaInt(meta, 'top_k'),
    dim: metaInt(meta, 'dim'),
    hidden: metaInt(meta, 'hidden'),
    activation,
    packed: metaBool(meta, 'packed'),
    gradientScale: metaBool(meta, 'gradient_scale'),
  };
  try {
    localExpertRange(m.numExperts, m.ep, 0);
  } catch (err) {
    throw new CaseError(`metadata: ${describeError(err)}`);
  }
  if (m.topK > m.numExperts) throw new CaseError(`metadata top_k (${m.topK}) exceeds num_experts (${m.numExperts})`);
  return m;
}

/** Refuses a NaN or infinite element, naming the tensor and its index: it would poison every result silently. */
function requireFinite(name: string, t: Tensor): void {
  const at = (t.data as Float32Array | Float64Array).findIndex((v) => !Number.isFinite(v));
  if (at < 0) return;
  const index: number[] = [];
  for (let rest = at, d = t.shape.length - 1; d >= 0; d--) {
    index.unshift(rest % t.shape[d]!);
    rest = Math.floor(rest / t.shape[d]!);
  }
  throw new CaseError(`${name}[${index.join(', ')}] = ${t.data[at]}: inputs must be finite`);
}

/** Validate a parsed case file and pull out its inputs (other tensors, e.g. expected.*, are ignored). */
export function parseCase(file: SafetensorsFile): CaseData {
  const meta = parseMeta(file.metadata);
  const { numExperts: E, dim: D, hidden: H, topK: K, ep } = meta;
  const get = (name: string): Tensor => {
    const t = file.tensors.get(name);
    if (!t) throw new CaseError(`${name} is missing`);
    return t;
  };
  const shaped = (name: string, shape: readonly number[], dtype?: string): Tensor => {
    const t = get(name);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
      throw new CaseError(`${name} has shape [${t.shape.join(', ')}], expected [${shape.join(', ')}]`);
    }
    if (dtype && t.dtype !== dtype) throw new CaseError(`${name} is ${t.dtype}, expected ${dtype} like experts.up_w`);
    return t;
  };
  const up = get('experts.up_w');
  if (!(CASE_DTYPES as readonly string[]).includes(up.dtype)) throw new CaseError(`experts.up_w is ${up.dtype}, expected one of ${CASE_DTYPES.join(', ')}`);
  const fileDtype = up.dtype as CaseDtype;
  const dtype: FloatDType = fileDtype === 'f64' ? 'f64' : 'f32';
  /** A float input, checked and at the compute dtype (16-bit floats widen to f32 exactly). */
  const float = (name: string, shape: readonly number[]): Tensor => {
    const t = shaped(name, shape, fileDtype);
    return t.dtype === dtype ? t : Tensor.from(dtype, t.shape, toFloat64(t).data);
  };
  const upW = float('experts.up_w', [E, D, H]);
  const down = float('experts.down_w', [E, H, D]);
  const gated = meta.activation === 'silu';
  const hasGate = file.tensors.has('experts.gate_w');
  if (gated !== hasGate) throw new CaseError(gated ? 'experts.gate_w is missing (silu experts are SwiGLU)' : `experts.gate_w is present but ${meta.activation} experts have no gate`);
  const gate = hasGate ? float('experts.gate_w', [E, D, H]) : null;
  const experts = { layout: 'packed', activation: meta.activation, up: upW, gate, down } as PackedExperts<typeof dtype>;
  for (const [name, t] of [['experts.up_w', upW], ['experts.gate_w', gate], ['experts.down_w', down]] as const) if (t) requireFinite(name, t);

  const ranks: RankInputs[] = [];
  for (let r = 0; r < ep; r++) {
    const T = get(`rank${r}.x`).shape[0] ?? 0;
    const x = float(`rank${r}.x`, [T, D]);
    const weights = float(`rank${r}.weights`, [T, K]);
    const indices = shaped(`rank${r}.indices`, [T, K]);
    const gradOut = float(`rank${r}.grad_out`, [T, D]);
    let idx: Int32Array;
    try {
      idx = toIndexArray(indices, `rank${r}.indices`);
    } catch (err) {
      throw new CaseError(describeError(err));
    }
    idx.forEach((e, i) => {
      if (e < 0 || e >= E) throw new CaseError(`rank${r}.indices[${Math.floor(i / K)}, ${i % K}] = ${e} is outside [0, ${E}) (num_experts ${E})`);
      // A top-k router picks distinct experts; the layer's combine assumes it.
      const first = idx.subarray(i - (i % K), i).indexOf(e);
      if (first >= 0) throw new CaseError(`rank${r}.indices[${Math.floor(i / K)}]: rank ${r} sends token ${Math.floor(i / K)} to expert ${e} twice (columns ${first} and ${i % K}); a top-k router picks distinct experts`);
    });
    for (const [name, t] of [[`rank${r}.x`, x], [`rank${r}.weights`, weights], [`rank${r}.grad_out`, gradOut]] as const) requireFinite(name, t);
    ranks.push({ x_TD: x, weights_TK: weights, indices_TK: indices, gradOut_TD: gradOut } as RankInputs);
  }
  return { meta, dtype, fileDtype, experts, ranks } as CaseData;
}

/** A case as the tensors of its file (parseCase's inverse, in the file's dtype); write them with caseMetadata(meta). */
export function caseTensors(data: CaseData): Map<string, Tensor> {
  // Narrowing back is exact: the values were widened from this dtype.
  const stored = (t: Tensor): Tensor => (t.dtype === data.fileDtype ? t : Tensor.from(data.fileDtype, t.shape, t.data as Float32Array));
  const out = new Map<string, Tensor>([['experts.up_w', stored(data.experts.up)], ['experts.down_w', stored(data.experts.down)]]);
  if (data.experts.gate) out.set('experts.gate_w', stored(data.experts.gate));
  data.ranks.forEach((r, rank) => {
    out.set(`rank${rank}.x`, stored(r.x_TD));
    out.set(`rank${rank}.weights`, stored(r.weights_TK));
    out.set(`rank${rank}.indices`, r.indices_TK);
    out.set(`rank${rank}.grad_out`, stored(r.gradOut_TD));
  });
  return out;
}

/** Read and validate a case file; any problem (unreadable, truncated, invalid) is a CaseError. */
export async function loadCase(path: string): Promise<CaseData> {
  let file: SafetensorsFile;
  try {
    file = await readSafetensorsFile(path);
  } catch (err) {
    throw new CaseError(describeError(err)); // the codec names the file
  }
  return parseCase(file);
}

/** One rank's forward and backward over `comm` (null when ep = 1). */
export async function runCaseRank<F extends FloatDType>(data: CaseData<F>, rank: number, comm: Communicator | null, backend: ExpertBackend): Promise<RankResult<F>> {
  const { meta } = data;
  const local = localExperts(data.experts, meta.ep, rank);
  const experts: ExpertWeights<F> = meta.packed ? local : convertLayout(local, 'unpacked');
  const ctx = { comm, backend, experts, numExperts: meta.numExperts, topK: meta.topK, gradientScale: meta.gradientScale, layer: 0, microBatch: 0 };
  const input = data.ranks[rank]!;
  const { out_TD, saved } = await epForward(ctx, input.x_TD, input.weights_TK, input.indices_TK);
  const { gradX_TD, gradWeights_TK, grads } = await epBackward(ctx, saved, input.gradOut_TD);
  return {
    out_TD,
    gradX_TD,
    gradWeights_TK,
    grads: (grads.layout === 'packed' ? grads : convertLayout(grads, 'packed')) as PackedExperts<F>,
    rowsSent: saved.sortOrder_S.length,
    rowsReceived: saved.byExpert_R.length,
  };
}

export async function runCase<F extends FloatDType>(data: CaseData<F>, options: RunOptions): Promise<CaseResult<F>> {
  const results = await options.runRanks(data, options.backend ?? tsBackend);
  const zerosLike = (t: Tensor<F>): Tensor<F> => Tensor.zeros(t.dtype, t.shape);
  const e = data.experts;
  const grads: PackedExperts<F> = { layout: 'packed', activation: e.activation, up: zerosLike(e.up), gate: e.gate && zerosLike(e.gate), down: zerosLike(e.down) };
  results.forEach((r, rank) => placeLocalGrads(grads, r.grads, data.meta.ep, rank));
  return { ranks: results, grads };
}

/** Result tensors under the case-file names (rank{r}.out, …, grad.up_w, …). */
export function resultTensors(result: CaseResult): Map<string, Tensor> {
  const out = new Map<string, Tensor>();
  result.ranks.forEach((r, rank) => {
    out.set(`rank${rank}.out`, r.out_TD);
    out.set(`rank${rank}.grad_x`, r.gradX_TD);
    out.set(`rank${rank}.grad_weights`, r.gradWeights_TK);
  });
  out.set('grad.up_w', result.grads.up);
  out.set('grad.down_w', result.grads.down);
  if (result.grads.gate) out.set('grad.gate_w', result.grads.gate);
  return out;
}

/** The case's metadata as written into result files. */
export function caseMetadata(meta: CaseMeta): Record<string, string> {
  return {
    ep: String(meta.ep),
    num_experts: String(meta.numExperts),
    top_k: String(meta.topK),
    dim: String(meta.dim),
    hidden: String(meta.hidden),
    activation: meta.activation,
    packed: String(meta.packed),
    gradient_scale: String(meta.gradientScale),
  };
}

export interface SyntheticSpec<F extends FloatDType = FloatDType> extends CaseMeta {
  readonly dtype: F;
  /** Tokens held by each rank (length ep; 0 allowed). */
  readonly tokensPerRank: readonly number[];
  /** Ranks whose experts no token is routed to (they receive nothing). */
  readonly starvedRanks?: readonly number[];
}

/** A random, valid case from a seed (weights scaled so activations stay in their interesting range). */
export function syntheticCase<F extends FloatDType>(spec: SyntheticSpec<F>, seed: number): CaseData<F> {
  const rng = seededRng(seed);
  const { ep, numExperts: E, dim: D, hidden: H, topK: K, dtype } = spec;
  const { count: N } = localExpertRange(E, ep, 0);
  if (spec.tokensPerRank.length !== ep) throw new Error(`tokensPerRank has ${spec.tokensPerRank.length} entries for ep ${ep}`);
  const starved = new Set(spec.starvedRanks ?? []);
  const allowed = Array.from({ length: E }, (_, e) => e).filter((e) => !starved.has(Math.floor(e / N)));
  const experts: PackedExperts<F> = {
    layout: 'packed',
    activation: spec.activation,
    up: randomTensor(rng, dtype, [E, D, H], 1 / Math.sqrt(D)),
    gate: spec.activation === 'silu' ? randomTensor(rng, dtype, [E, D, H], 1 / Math.sqrt(D)) : null,
    down: randomTensor(rng, dtype, [E, H, D], 1 / Math.sqrt(H)),
  };
  const ranks = spec.tokensPerRank.map((T) => ({
    x_TD: randomTensor(rng, dtype, [T, D]),
    ...randomRouting(rng, dtype, T, E, K, allowed),
    gradOut_TD: randomTensor(rng, dtype, [T, D]),
  }));
  const meta: CaseMeta = { ep, numExperts: E, topK: K, dim: D, hidden: H, activation: spec.activation, packed: spec.packed, gradientScale: spec.gradientScale };
  return { meta, dtype, fileDtype: dtype, experts, ranks };
}
