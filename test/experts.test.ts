import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ACTIVATION_FNS, convertLayout, erf, tsBackend } from '../src/moe/experts.js';
import { routerZLoss, sigmoidTopK, softmaxTopK } from '../src/moe/router.js';
import { randomTensor, seededRng } from '../src/moe/random.js';
import { Tensor, relativeError } from '../src/tensor.js';
import type { PackedExperts } from '../src/ep/types.js';

function close(got: number, want: number, rel: number, what: string): void {
  const err = Math.abs(got - want) / Math.max(Math.abs(want), 1e-300);
  assert.ok(err <= rel, `${what}: got ${got}, want ${want} (relative error ${err.toExponential(2)})`);
}

test('erf matches known values to ~1e-15 on both branches (series below 3, continued fraction above)', () => {
  const known: [number, number][] = [
    [0.5, 0.5204998778130465],
    [1, 0.8427007929497149],
    [2, 0.9953222650189527],
    [3, 0.9999779095030014],
    [2.9999, 0.9999778955735178],
    [3.0001, 0.9999779234241298],
    [5, 0.9999999999984626],
    [1e-5, 1.1283791670579e-5],
    [-0.1, -0.1124629160182849],
  ];
  for (const [x, want] of known) close(erf(x), want, 2e-15, `erf(${x})`);
  assert.is(erf(0), 0);
  assert.is(erf(40), 1);
  assert.is(erf(-40), -1);
  assert.ok(Number.isNaN(erf(NaN)));
  for (const x of [0.3, 1.7, 2.5, 4.2]) assert.is(erf(-x), -erf(x));
});

test('activations at known points, and derivatives against central differences', () => {
  close(ACTIVATION_FNS.silu.f(1), 0.7310585786300049, 1e-15, 'silu(1)');
  close(ACTIVATION_FNS.silu.f(-2), -0.2384058440442351, 1e-15, 'silu(-2)');
  close(ACTIVATION_FNS.gelu.f(1), 0.8413447460685429, 1e-15, 'gelu(1)'); // Φ(1)
  close(ACTIVATION_FNS.gelu.f(-0.5), -0.15426876936299344, 1e-14, 'gelu(-0.5)');
  close(ACTIVATION_FNS.gelu.f(3), 2.99595030590511, 1e-15, 'gelu(3)');
  assert.is(ACTIVATION_FNS.relu.f(-1), 0);
  assert.is(ACTIVATION_FNS.relu.f(2.5), 2.5);
  assert.is(ACTIVATION_FNS.relu.df(0), 0); // torch's threshold_backward: no gradient at 0
  const h = 1e-5;
  for (const name of ['silu', 'gelu', 'relu'] as const) {
    const { f, df } = ACTIVATION_FNS[name];
    for (const a of [-3.1, -0.7, 0.4, 1.3, 4.2]) close(df(a), (f(a + h) - f(a - h)) / (2 * h), 1e-8, `${name}'(${a})`);
  }
});

test('backend: packed and unpacked layouts give the same outputs and grads, f32 close to f64', async () => {
  const rng = seededRng(5);
  const [N, D, H, R] = [3, 4, 5, 7];
  const packed: PackedExperts<'f64'> = {
    layout: 'packed',
    activation: 'silu',
    up: randomTensor(rng, 'f64', [N, D, H]),
    gate: randomTensor(rng, 'f64', [N, D, H]),
    down: randomTensor(rng, 'f64', [N, H, D]),
  };
  const rows = [3, 0, 4];
  const x = randomTensor(rng, 'f64', [R, D]);
  const gy = randomTensor(rng, 'f64', [R, D]);
  const unpacked = convertLayout(packed, 'unpacked');
  assert.is(unpacked.layout, 'unpacked');
  const fp = await tsBackend.forward(packed, x, rows);
  const fu = await tsBackend.forward(unpacked, x, rows);
  assert.ok(relativeError(fp.y, fu.y) < 1e-15);
  const bp = await tsBackend.backward(packed, x, rows, fp, gy);
  const bu = await tsBackend.backward(unpacked, x, rows, fu, gy);
  const back = convertLayout(bu.grads, 'packed');
  if (back.layout !== 'packed' || bp.grads.layout !== 'packed') throw new Error('layout');
  assert.ok(relativeError(bp.gradX, bu.gradX) < 1e-15);
  assert.ok(relativeError(bp.grads.up, back.up) < 1e-15);
  assert.ok(relativeError(bp.grads.gate!, back.gate!) < 1e-15);
  assert.ok(relativeError(bp.grads.down, back.down) < 1e-15);
  // Expert 1 had no rows: its grads are exactly zero.
  assert.ok(bp.grads.up.data.subarray(D * H, 2 * D * H).every((v) => v === 0));
  // f32 computes in f64 and rounds once.
  const to32 = (t: Tensor<'f64'>) => new Tensor('f32', t.shape, new Float32Array(t.data));
  const p32: PackedExperts<'f32'> = { layout: 'packed', activation: 'silu', up: to32(packed.up), gate: to32(packed.gate!), down: to32(packed.down) };
  const f32 = await tsBackend.forward(p32, to32(x), rows);
  assert.is(f32.y.dtype, 'f32');
  assert.ok(relativeError(f32.y, fp.y) < 1e-6);
  // Round trip of the layout conversion is exact.
  const again = convertLayout(unpacked, 'packed');
  if (again.layout !== 'packed') throw new Error('layout');
  assert.equal(Array.from(again.up.data), Array.from(packed.up.data));
});

test('softmax top-k: weights renormalised to 1, distinct experts in descending probability', () => {
  const rng = seededRng(9);
  const logits = randomTensor(rng, 'f64', [20, 6], 3);
  const { weights_TK, indices_TK, auxLoss, expertCounts_E } = softmaxTopK(logits, 3);
  assert.equal(weights_TK.shape, [20, 3]);
  assert.is(indices_TK.dtype, 'i64');
  for (let t = 0; t < 20; t++) {
    const w = Array.from(weights_TK.data.subarray(t * 3, t * 3 + 3));
    const idx = Array.from(indices_TK.data.subarray(t * 3, t * 3 + 3), Number);
    close(w[0]! + w[1]! + w[2]!, 1, 1e-15, `row ${t} weight sum`);
    assert.is(new Set(idx).size, 3, `row ${t} experts distinct`);
    assert.ok(w[0]! >= w[1]! && w[1]! >= w[2]!, `row ${t} descending`);
    // Every unselected expert has a logit no larger than the smallest selected one.
    const row = logits.data.subarray(t * 6, t * 6 + 6);
    const minSel = Math.min(...idx.map((e) => row[e]!));
    row.forEach((v, e) => assert.ok(idx.includes(e) || v <= minSel));
  }
  assert.is(expertCounts_E.reduce((a, b) => a + b, 0), 60);
  assert.ok(auxLoss > 0);
});

test('softmax aux loss and z-loss follow their definitions', () => {
  // Uniform probabilities: P_i = 1/E, so L_aux = E·Σ f_i/E = 1 whatever the selection.
  const uniform = softmaxTopK(Tensor.zeros('f64', [5, 4]), 2);
  close(uniform.auxLoss, 1, 1e-15, 'aux loss, uniform probs');
  close(uniform.zLoss, Math.log(4) ** 2, 1e-15, 'z-loss, zero logits');
  // Two tokens, two experts, top-1: probs p = softmax([2,0]) and softmax([0,1]).
  const a = 1 / (1 + Math.exp(-2));
  const b = 1 / (1 + Math.exp(1));
  const r = softmaxTopK(Tensor.from('f64', [2, 2], [2, 0, 0, 1]), 1);
  // f = [1/2, 1/2]; P = [(a + b)/2, (1-a + 1-b)/2]
  close(r.auxLoss, 2 * (0.5 * ((a + b) / 2) + 0.5 * ((2 - a - b) / 2)), 1e-15, 'aux loss');
  const lse = (xs: number[]) => Math.log(xs.reduce((s, v) => s + Math.exp(v), 0));
  close(routerZLoss(Tensor.from('f64', [2, 2], [2, 0, 0, 1])), (lse([2, 0]) ** 2 + lse([0, 1]) ** 2) / 2, 1e-15, 'z-loss');
  assert.throws(() => softmaxTopK(Tensor.zeros('f64', [1, 3]), 4), /top_k \(4\) must be in \[1, num_experts \(3\)\]/);
});

test('sigmoid top-k: the expert bias changes the selection but not the weights of chosen experts', () => {
  const sig = (v: number) => 1 / (1 + Math.exp(-v));
  const logits = Tensor.from('f32', [1, 3], [0, 1, 2]);
  const plain = sigmoidTopK(logits, 2);
  assert.equal(Array.from(plain.indices_TK.data, Number), [2, 1]);
  const biased = sigmoidTopK(logits, 2, [5, 0, 0]);
  assert.equal(Array.from(biased.indices_TK.data, Number), [0, 2]);
  const [w0, w1] = Array.from(biased.weights_TK.data);
  close(w0!, sig(0) / (sig(0) + sig(2)), 1e-7, 'weight of biased-in expert 0');
  close(w1!, sig(2) / (sig(0) + sig(2)), 1e-7, 'weight of expert 2');
  assert.is(biased.weights_TK.dtype, 'f32');
  // A bias that does not change the selection leaves weights untouched.
  const same = sigmoidTopK(logits, 2, [0, 0.1, 0.2]);
  assert.equal(Array.from(same.weights_TK.data), Array.from(plain.weights_TK.data));
});

test.run();
