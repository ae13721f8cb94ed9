// Seeded randomness for synthetic cases, property tests and benchmarks: the same seed gives
// the same tensors and routing on every machine.
import { Tensor, type FloatDType } from '../tensor.js';
import { floatTensor } from './experts.js';

export type Rng = () => number;

/** mulberry32: a small, fast 32-bit PRNG; uniform in [0, 1). */
export function seededRng(seed: number): Rng {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** One 32-bit seed from several integers (a scenario's seed, a rank, a layer, …): each draw its own stream. */
export function mixSeed(...xs: number[]): number {
  return xs.reduce((h, x) => Math.imul(h ^ (x + 0x9e3779b9), 0x85ebca6b) >>> 0, 0x12345678);
}

/** Uniform integer in [0, n). */
export function randInt(rng: Rng, n: number): number {
  return Math.floor(rng() * n);
}

/** Values uniform in [-scale, scale). */
export function randomTensor<F extends FloatDType>(rng: Rng, dtype: F, shape: readonly number[], scale = 1): Tensor<F> {
  const n = shape.reduce((a, b) => a * b, 1);
  return floatTensor(dtype, shape, Float64Array.from({ length: n }, () => (2 * rng() - 1) * scale));
}

/**
 * Routing for T tokens: each token picks K distinct experts uniformly from `allowed`
 * (default all E), with positive weights that sum to 1.
 */
export function randomRouting<F extends FloatDType>(rng: Rng, dtype: F, T: number, E: number, K: number, allowed?: readonly number[]): { weights_TK: Tensor<F>; indices_TK: Tensor<'i64'> } {
  const pool = allowed ?? Array.from({ length: E }, (_, e) => e);
  if (K > pool.length) throw new Error(`cannot pick ${K} distinct experts from ${pool.length}`);
  const weights = new Float64Array(T * K);
  const indices = new BigInt64Array(T * K);
  for (let t = 0; t < T; t++) {
    const choices = [...pool];
    let sum = 0;
    for (let k = 0; k < K; k++) {
      const [e] = choices.splice(randInt(rng, choices.length), 1);
      indices[t * K + k] = BigInt(e!);
      sum += weights[t * K + k] = 0.1 + rng();
    }
    for (let k = 0; k < K; k++) weights[t * K + k]! /= sum;
  }
  return { weights_TK: floatTensor(dtype, [T, K], weights), indices_TK: new Tensor('i64', [T, K], indices) };
}
