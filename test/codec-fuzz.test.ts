// Random, truncated and mutated inputs for both decoders: every outcome must be a success or
// the documented error type, quickly. Deterministic from SEED (override with FUZZ_SEED).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { CodecError, decodeMessage, encodeMessage } from '../src/codec/msgpack.js';
import { readSafetensors, SafetensorsError, writeSafetensors } from '../src/codec/safetensors.js';
import { DTYPES, Tensor } from '../src/tensor.js';
import { goldenDir } from './paths.js';
import { seededRng } from '../src/moe/random.js';

const SEED = Number(process.env.FUZZ_SEED ?? 0x5eed1234) >>> 0;
/** No single input may take longer than this: a sign of a hang or a huge allocation. */
const SLOW_MS = 200;

const prng = seededRng;

type Rand = () => number;
const int = (rand: Rand, n: number) => Math.floor(rand() * n);

/** Lengths a decoder must refuse to trust: huge, boundary and off-by-one values. */
const NASTY = [0, 1, 7, 8, 0x7f, 0xff, 0xffff, 0x7fffffff, 0x80000000, 0xffffffff, 2 ** 53, 2 ** 60];

function mutate(rand: Rand, base: Uint8Array, focus: number): Uint8Array {
  switch (int(rand, 6)) {
    case 0:
      return base.slice(0, int(rand, base.length + 1));
    case 1: {
      // Flip bytes, mostly within the first `focus` bytes, where the structure lives.
      const out = base.slice();
      for (let k = 1 + int(rand, 8); k > 0; k--) {
        const at = int(rand, rand() < 0.8 ? Math.min(focus, out.length) : out.length);
        out[at] = int(rand, 256);
      }
      return out;
    }
    case 2: {
      // Overwrite a few bytes with a big-endian and a little-endian nasty length.
      const out = base.slice();
      const v = BigInt(NASTY[int(rand, NASTY.length)]!);
      const at = int(rand, Math.max(1, Math.min(focus, out.length - 8)));
      if (out.length >= at + 8) new DataView(out.buffer).setBigUint64(at, v, rand() < 0.5);
      return out;
    }
    case 3: {
      const at = int(rand, base.length + 1);
      const junk = Uint8Array.from({ length: 1 + int(rand, 16) }, () => int(rand, 256));
      const out = new Uint8Array(base.length + junk.length);
      out.set(base.subarray(0, at));
      out.set(junk, at);
      out.set(base.subarray(at), at + junk.length);
      return out;
    }
    case 4:
      return Uint8Array.from({ length: int(rand, 64) }, () => int(rand, 256));
    default: {
      // Delete a range.
      const a = int(rand, base.length + 1);
      const b = a + int(rand, 32);
      const out = new Uint8Array(base.length - (Math.min(b, base.length) - a));
      out.set(base.subarray(0, a));
      out.set(base.subarray(Math.min(b, base.length)), a);
      return out;
    }
  }
}

function run(what: string, n: number, make: (rand: Rand) => Uint8Array, decode: (b: Uint8Array) => void, ok: (e: unknown) => boolean): { passed: number; failed: number } {
  const rand = prng(SEED ^ [...what].reduce((h, c) => Math.imul(h, 31) + c.charCodeAt(0), 7));
  let passed = 0;
  let failed = 0;
  for (let i = 0; i < n; i++) {
    const input = make(rand);
    const t0 = performance.now();
    try {
      decode(input);
      passed++;
    } catch (e) {
      if (!ok(e)) assert.unreachable(`${what} #${i} (FUZZ_SEED=${SEED}): ${(e as Error)?.name}: ${(e as Error)?.message ?? e}`);
      failed++;
    }
    const ms = performance.now() - t0;
    assert.ok(ms < SLOW_MS, `${what} #${i} (FUZZ_SEED=${SEED}) took ${ms.toFixed(0)} ms on ${input.length} bytes`);
  }
  return { passed, failed };
}

// ---- safetensors ----

const golden = readdirSync(goldenDir)
  .filter((f) => f.endsWith('.safetensors'))
  .map((f) => new Uint8Array(readFileSync(join(goldenDir, f))));

function smallFiles(): Uint8Array[] {
  const files = [];
  for (const dtype of DTYPES) {
    files.push(
      writeSafetensors({ a: Tensor.zeros(dtype, [2, 3]), b: Tensor.zeros(dtype, []), c: Tensor.zeros(dtype, [0]) }, { k: 'v' }),
    );
  }
  return files;
}

function headerLength(file: Uint8Array): number {
  return 8 + Number(new DataView(file.buffer, file.byteOffset).getBigUint64(0, true));
}

test('fuzz readSafetensors: success or SafetensorsError, never slow', () => {
  const small = smallFiles();
  const stats = run(
    'safetensors',
    3000,
    (rand) => {
      const base = rand() < 0.1 ? golden[int(rand, golden.length)]! : small[int(rand, small.length)]!;
      return mutate(rand, base, headerLength(base));
    },
    (b) => readSafetensors(b, 'fuzz.safetensors'),
    (e) => e instanceof SafetensorsError && e.message.startsWith('fuzz.safetensors: '),
  );
  // Both outcomes must actually occur, or the mutations are not exercising the reader.
  assert.ok(stats.passed > 50 && stats.failed > 1000, JSON.stringify(stats));
});

test('fuzz readSafetensors: mutated JSON headers', () => {
  // Replace numbers and strings in a valid header with hostile ones, keeping valid JSON.
  const base = writeSafetensors({ x: Tensor.zeros('f32', [2, 2]), y: Tensor.zeros('i64', [3]) }, { m: 'v' });
  const text = new TextDecoder().decode(base.subarray(8, headerLength(base)));
  const data = base.subarray(headerLength(base));
  const values = ['-1', '1e300', '2.5', '9007199254740993', '"F32"', '"BF16"', '"X"', 'null', '[]', '{}', '[0,0]', '[16,0]', '[0,16]', '[2,2]', '[]'];
  const stats = run(
    'safetensors-json',
    1500,
    (rand) => {
      const json = text.replace(/-?\d+|"[A-Z0-9]+"|\[[^\][]*\]/g, (m) => (rand() < 0.15 ? values[int(rand, values.length)]! : m));
      const head = new TextEncoder().encode(json);
      const out = new Uint8Array(8 + head.length + data.length);
      new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
      out.set(head, 8);
      out.set(data, 8 + head.length);
      return out;
    },
    (b) => {
      const { tensors } = readSafetensors(b, 'fuzz.safetensors');
      for (const t of tensors.values()) assert.is(t.data.length, t.shape.reduce((a, d) => a * d, 1));
    },
    (e) => e instanceof SafetensorsError,
  );
  // Some hostile headers still describe a readable file; most must be refused.
  assert.ok(stats.passed > 20 && stats.failed > 500, JSON.stringify(stats));
});

// ---- msgpack ----

function messages(): Uint8Array[] {
  const msgs = DTYPES.map((dtype, i) =>
    encodeMessage({ op: 'all_to_all', position: i, chunks: [Tensor.zeros(dtype, [3, 2]), Tensor.zeros(dtype, []), Tensor.zeros(dtype, [0, 5])] }),
  );
  msgs.push(encodeMessage([1, -1, 2 ** 40, 0.5, 'text', null, true, { a: { b: [new Uint8Array(3)] } }, new Date(7)]));
  return msgs;
}

test('fuzz decodeMessage: success or CodecError, never slow', () => {
  const base = messages();
  const stats = run(
    'msgpack',
    4000,
    (rand) => {
      const m = base[int(rand, base.length)]!;
      const mutated = mutate(rand, m, m.length);
      // Sometimes place the input at an odd offset so the copying path is exercised too.
      if (rand() < 0.5) return mutated;
      const big = new Uint8Array(mutated.length + 3);
      big.set(mutated, 3);
      return big.subarray(3);
    },
    (b) => void decodeMessage(b),
    (e) => e instanceof CodecError,
  );
  assert.ok(stats.passed > 50 && stats.failed > 1000, JSON.stringify(stats));
});

test('fuzz decodeMessage: length headers claiming up to 2^32-1 items', () => {
  // Each msgpack length form (str/bin/array/map/ext, 8/16/32-bit) with nasty lengths and a short body.
  const heads = [0xd9, 0xda, 0xdb, 0xc4, 0xc5, 0xc6, 0xdc, 0xdd, 0xde, 0xdf, 0xc7, 0xc8, 0xc9];
  const widths: Record<number, number> = { 0xd9: 1, 0xc4: 1, 0xc7: 1, 0xda: 2, 0xc5: 2, 0xdc: 2, 0xde: 2, 0xc8: 2 };
  const stats = run(
    'msgpack-lengths',
    2000,
    (rand) => {
      const head = heads[int(rand, heads.length)]!;
      const width = widths[head] ?? 4;
      const len = NASTY[int(rand, NASTY.length)]! % 2 ** (8 * width);
      const body = Uint8Array.from({ length: int(rand, 40) }, () => int(rand, 256));
      const out = new Uint8Array(1 + width + body.length);
      out[0] = head;
      for (let k = 0; k < width; k++) out[1 + k] = Math.floor(len / 2 ** (8 * (width - 1 - k))) & 0xff;
      out.set(body, 1 + width);
      return out;
    },
    (b) => void decodeMessage(b),
    (e) => e instanceof CodecError,
  );
  // Short lengths over a long enough body decode; the claims past the body must all be refused.
  assert.ok(stats.passed > 20 && stats.failed > 1000, JSON.stringify(stats));
});

test.run();
