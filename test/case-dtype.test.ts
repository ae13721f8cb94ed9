// Case files in bf16 and f16: read, widened to f32 and computed there, results compared to
// the golden f32 results within the 16-bit tolerance; bad 16-bit inputs refused like f32 ones.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { inProcessRanks } from '../actors/inprocess.js';
import { readSafetensors, readSafetensorsFile, writeSafetensors, type SafetensorsFile } from '../src/codec/safetensors.js';
import { RESULT_TOLERANCE, caseTensors, parseCase, resultTensors, runCase } from '../src/case.js';
import { CaseError } from '../src/errors.js';
import { Tensor, relativeError } from '../src/tensor.js';
import { goldenDir } from './paths.js';
import { runCli } from './cli.js';

const goldens = readdirSync(goldenDir).filter((f) => f.endsWith('.safetensors')).sort();

/** The golden case's inputs rounded to `dtype` (round to nearest even), through the codec: a file as PyTorch would write it. */
function rounded(file: SafetensorsFile, dtype: 'bf16' | 'f16', edit?: (t: Map<string, Tensor>) => void): SafetensorsFile {
  const tensors = new Map<string, Tensor>();
  for (const [name, t] of file.tensors) {
    if (name.startsWith('expected.')) continue;
    tensors.set(name, t.dtype === 'f32' ? Tensor.from(dtype, t.shape, t.data as Float32Array) : t);
  }
  edit?.(tensors);
  return readSafetensors(writeSafetensors(tensors, file.metadata), `${dtype}.safetensors`);
}

for (const dtype of ['bf16', 'f16'] as const) {
  test(`${dtype}: every golden case, rounded to ${dtype}, matches the f32 results within ${RESULT_TOLERANCE[dtype].toPrecision(2)}`, async () => {
    let worst = 0;
    for (const name of goldens) {
      const golden = await readSafetensorsFile(join(goldenDir, name));
      const data = parseCase(rounded(golden, dtype));
      assert.is(data.fileDtype, dtype);
      assert.is(data.dtype, 'f32');
      const got = resultTensors(await runCase(data, { runRanks: inProcessRanks }));
      for (const [key, t] of got) {
        assert.is(t.dtype, 'f32', key);
        const err = relativeError(t, golden.tensors.get(`expected.${key}`)!);
        assert.ok(err <= RESULT_TOLERANCE[dtype], `${name}: ${key} relative error ${err.toExponential(3)}`);
        worst = Math.max(worst, err);
      }
    }
    // The inputs were really rounded: the f32 tolerance does not hold.
    assert.ok(worst > RESULT_TOLERANCE.f32, `worst ${worst}`);
  });
}

const packed = await readSafetensorsFile(join(goldenDir, 'ep4_silu_packed.safetensors'));

function refused(file: () => SafetensorsFile, message: RegExp): void {
  try {
    parseCase(file());
  } catch (e) {
    assert.instance(e, CaseError);
    assert.match((e as Error).message, message);
    return;
  }
  assert.unreachable(`accepted; expected ${message}`);
}

test('16-bit NaN and infinity are refused naming the tensor and the element', () => {
  // bf16 0x7fc0 is a quiet NaN, f16 0x7c00 is +infinity, 0xfc00 is -infinity.
  refused(() => rounded(packed, 'bf16', (t) => ((t.get('rank1.x')!.data as Uint16Array)[21] = 0x7fc0)), /^rank1\.x\[1, 5\] = NaN: inputs must be finite$/);
  refused(() => rounded(packed, 'f16', (t) => ((t.get('experts.down_w')!.data as Uint16Array)[32 * 16 + 3] = 0x7c00)), /^experts\.down_w\[1, 0, 3\] = Infinity: inputs must be finite$/);
  refused(() => rounded(packed, 'f16', (t) => ((t.get('rank0.grad_out')!.data as Uint16Array)[0] = 0xfc00)), /^rank0\.grad_out\[0, 0\] = -Infinity/);
});

test('one dtype per file: a tensor in another is refused by name; integer floats are refused', () => {
  refused(() => rounded(packed, 'bf16', (t) => t.set('rank2.weights', packed.tensors.get('rank2.weights')!)), /^rank2\.weights is f32, expected bf16 like experts\.up_w$/);
  refused(() => rounded(packed, 'bf16', (t) => t.set('experts.down_w', Tensor.from('f16', [8, 32, 16], new Float32Array(8 * 32 * 16)))), /^experts\.down_w is f16, expected bf16 like experts\.up_w$/);
  refused(() => rounded(packed, 'bf16', (t) => t.set('experts.up_w', Tensor.zeros('i32', [8, 16, 32]))), /^experts\.up_w is i32, expected one of f32, f64, bf16, f16$/);
});

test('caseTensors gives back the 16-bit file bit for bit (the launcher writes rank cases with it)', () => {
  for (const dtype of ['bf16', 'f16'] as const) {
    const file = rounded(packed, dtype);
    const back = caseTensors(parseCase(file));
    assert.equal([...back.keys()].sort(), [...file.tensors.keys()].sort());
    for (const [name, t] of back) {
      assert.is(t.dtype, file.tensors.get(name)!.dtype, name);
      assert.equal(Array.from(t.data as Uint16Array), Array.from(file.tensors.get(name)!.data as Uint16Array), name);
    }
  }
});

test('run: a bf16 case on worker-thread ranks writes f32 results within the bf16 tolerance and says so', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-bf16-'));
  try {
    const input = join(dir, 'bf16.safetensors');
    const file = rounded(packed, 'bf16');
    writeFileSync(input, writeSafetensors(file.tensors, file.metadata));
    const out = join(dir, 'out.safetensors');
    const r = await runCli(['run', '--case', input, '--out', out]);
    assert.is(r.code, 0, r.stderr);
    assert.match(r.stdout, /\(packed, bf16 computed in f32\)/);
    const got = readSafetensors(readFileSync(out), out);
    for (const [key, t] of got.tensors) {
      assert.is(t.dtype, 'f32', key);
      assert.ok(relativeError(t, packed.tensors.get(`expected.${key}`)!) <= RESULT_TOLERANCE.bf16, key);
    }
    assert.is(got.tensors.size, [...packed.tensors.keys()].filter((k) => k.startsWith('expected.')).length);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
