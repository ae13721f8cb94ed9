// fp64 central finite differences of the loss L = Σ_r sum(out_r ⊙ G_r), where G_r is the
// case's grad_out, against the layer's backward: grad_x, grad_weights and the expert grads.
import { test } from 'uvu';
import { inProcessRanks } from '../actors/inprocess.js';
import * as assert from 'uvu/assert';
import { runCase, syntheticCase, type CaseData, type SyntheticSpec } from '../src/case.js';
import { Tensor, relativeError } from '../src/tensor.js';

const EPS = 1e-6;
const TOL = 1e-7;

async function loss(data: CaseData<'f64'>): Promise<number> {
  const res = await runCase(data, { runRanks: inProcessRanks });
  let l = 0;
  res.ranks.forEach((r, rank) => {
    const g = data.ranks[rank]!.gradOut_TD.data;
    r.out_TD.data.forEach((v, i) => (l += v * g[i]!));
  });
  return l;
}

/** Central differences of `loss` w.r.t. every element of `t` (perturbed in place). */
async function numericGrad(data: CaseData<'f64'>, t: Tensor<'f64'>): Promise<Tensor<'f64'>> {
  const g = Tensor.zeros('f64', t.shape);
  for (let i = 0; i < t.data.length; i++) {
    const v = t.data[i]!;
    t.data[i] = v + EPS;
    const up = await loss(data);
    t.data[i] = v - EPS;
    const down = await loss(data);
    t.data[i] = v;
    g.data[i] = (up - down) / (2 * EPS);
  }
  return g;
}

function check(got: Tensor, want: Tensor, what: string): void {
  const err = relativeError(got, want);
  assert.ok(err < TOL, `${what}: relative error ${err.toExponential(2)} against finite differences`);
}

const base = { dim: 3, hidden: 4, dtype: 'f64' as const };
const cases: [string, SyntheticSpec<'f64'>][] = [
  ['silu packed, ep=2, rank 1 holds no tokens', { ...base, ep: 2, numExperts: 4, topK: 2, activation: 'silu', packed: true, gradientScale: false, tokensPerRank: [5, 0] }],
  ['silu unpacked, ep=2, gradient scale', { ...base, ep: 2, numExperts: 4, topK: 2, activation: 'silu', packed: false, gradientScale: true, tokensPerRank: [4, 3] }],
  ['gelu packed, ep=4, gradient scale, rank 1 receives nothing', { ...base, ep: 4, numExperts: 8, topK: 2, activation: 'gelu', packed: true, gradientScale: true, tokensPerRank: [3, 2, 0, 3], starvedRanks: [1] }],
  ['gelu unpacked, ep=1', { ...base, ep: 1, numExperts: 3, topK: 2, activation: 'gelu', packed: false, gradientScale: false, tokensPerRank: [4] }],
  ['relu packed, ep=2, top-1', { ...base, ep: 2, numExperts: 2, topK: 1, activation: 'relu', packed: true, gradientScale: false, tokensPerRank: [4, 5] }],
  ['relu unpacked, ep=2, gradient scale, rank 0 receives nothing and rank 1 holds no tokens', { ...base, ep: 2, numExperts: 4, topK: 2, activation: 'relu', packed: false, gradientScale: true, tokensPerRank: [5, 0], starvedRanks: [0] }],
];

cases.forEach(([name, spec], i) => {
  test(`gradcheck: ${name}`, async () => {
    const data = syntheticCase(spec, 1000 + i);
    const res = await runCase(data, { runRanks: inProcessRanks });
    for (const [rank, input] of data.ranks.entries()) {
      check(res.ranks[rank]!.gradX_TD, await numericGrad(data, input.x_TD), `rank${rank}.grad_x`);
      check(res.ranks[rank]!.gradWeights_TK, await numericGrad(data, input.weights_TK), `rank${rank}.grad_weights`);
    }
    const e = data.experts;
    check(res.grads.up, await numericGrad(data, e.up), 'grad.up_w');
    check(res.grads.down, await numericGrad(data, e.down), 'grad.down_w');
    if (e.gate) check(res.grads.gate!, await numericGrad(data, e.gate), 'grad.gate_w');
    if (spec.starvedRanks) for (const r of spec.starvedRanks) assert.is(res.ranks[r]!.rowsReceived, 0, `rank ${r} should receive nothing`);
  });
});

test.run();
