// Codec throughput on a 4 MiB f32 tensor: msgpack encode against a plain typed-array copy
// measured in the same run (the encode target is at least half the copy's speed), msgpack
// decode (a zero-copy view when aligned), and safetensors write and read.
import { decodeMessage, encodeMessage } from '../../src/codec/msgpack.js';
import { readSafetensors, writeSafetensors } from '../../src/codec/safetensors.js';
import { Tensor } from '../../src/tensor.js';
import { time, type BenchRow } from './harness.js';

const SHAPE = [1024, 1024];
const BYTES = 4 * SHAPE[0]! * SHAPE[1]!;
const RUNS = 21;

function gbPerS(ms: number): number {
  return BYTES / (ms * 1e6);
}

export async function bench(): Promise<BenchRow[]> {
  const t = Tensor.zeros('f32', SHAPE);
  for (let i = 0; i < t.data.length; i++) t.data[i] = Math.sin(i);
  const message = { comm: 'ep', position: 0, op: 'all_to_all', x: t };

  // Alternate the two in rounds and keep each one's best median: whichever runs first
  // otherwise pays for warming up the allocator and looks slower.
  let copyMs = Infinity;
  let encodeMs = Infinity;
  for (let round = 0; round < 3; round++) {
    copyMs = Math.min(copyMs, (await time(() => new Float32Array(t.data), RUNS, 3)).medianMs);
    encodeMs = Math.min(encodeMs, (await time(() => encodeMessage(message), RUNS, 3)).medianMs);
  }
  const encoded = encodeMessage(message);
  const decode = await time(() => decodeMessage(encoded), RUNS, 3);
  const isView = (decodeMessage(encoded) as { x: Tensor }).x.data.buffer === encoded.buffer;
  const file = writeSafetensors({ x: t }, { source: 'bench' });
  const write = await time(() => writeSafetensors({ x: t }, { source: 'bench' }), RUNS, 3);
  const read = await time(() => readSafetensors(file), RUNS, 3);

  const copyRow = { name: 'new Float32Array(src) copy (4 MiB)', value: gbPerS(copyMs), unit: 'GB/s' };
  return [
    {
      name: 'msgpack encode, 4 MiB f32 tensor',
      value: gbPerS(encodeMs),
      unit: 'GB/s',
      baseline: copyRow,
      ratio: copyMs / encodeMs,
      note: 'ratio = encode speed / copy speed; target >= 0.5',
    },
    {
      name: 'msgpack decode, 4 MiB f32 tensor',
      value: gbPerS(decode.medianMs),
      unit: 'GB/s',
      note: isView ? 'zero-copy view into the message' : 'copied (message misaligned)',
    },
    { name: 'safetensors write, 4 MiB f32 tensor', value: gbPerS(write.medianMs), unit: 'GB/s' },
    { name: 'safetensors read, 4 MiB f32 tensor', value: gbPerS(read.medianMs), unit: 'GB/s', note: 'copies into a fresh aligned array' },
  ];
}
