// Messages between rank actors: msgpack (through @msgpack/msgpack) with one extension type
// per tensor dtype. A tensor's raw little-endian bytes sit inside its extension payload at an
// offset aligned to the element size, so decoding can hand back a typed-array view into the
// message instead of a copy.
//
// Extension payload (always ext 32, so the 6-byte ext header length is known up front):
//   u8 ndim | ndim x u32 LE dims | u8 pad | pad zero bytes | data
// `pad` is chosen from the payload's final position in the message so that data begins at
// a multiple of the element size.
//
// Encoding runs the library's encoder over the envelope only: each tensor contributes its
// small header, its data is left out, and the ext length is patched afterwards. The final
// message is then assembled into one exact-size buffer, so tensor bytes are copied once.
import { Decoder, Encoder, ExtData, ExtensionCodec, type ExtensionCodecType } from '@msgpack/msgpack';
import { DTYPES, ELEMENT_SIZE, STORAGE_CTOR, Tensor, type DType, type Storage } from '../tensor.js';

export class CodecError extends Error {
  override name = 'CodecError';
}

/** One msgpack extension type id per dtype (application range 0..127). */
export const TENSOR_EXT_TYPES: Record<DType, number> = { f32: 0x10, f64: 0x11, i32: 0x12, i64: 0x13, bf16: 0x14, f16: 0x15 };

const DTYPE_OF_EXT = new Map<number, DType>(DTYPES.map((d) => [TENSOR_EXT_TYPES[d], d]));
/** The library's built-in timestamp extension (Date), which we keep. */
const TIMESTAMP_EXT = -1;
const MAX_NDIM = 32;
const MAX_DIM = 0xffffffff;


// Payload bytes are defined as little-endian; typed arrays use the host order.
if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) throw new Error('ep-actors msgpack codec needs a little-endian host');

interface Pending {
  /** Where the tensor's data goes in the envelope: right after its header. */
  envelopeEnd: number;
  /** Position of the ext 32 length field in the envelope. */
  lengthAt: number;
  headerLength: number;
  bytes: Uint8Array;
}

function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function bytesOf(data: Storage): Uint8Array {
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

class TensorCodec implements ExtensionCodecType<undefined> {
  /** Tensors met during the current encode, in message order. */
  pending: Pending[] = [];
  /** Sum of the data bytes of `pending`: how far the final message runs ahead of the envelope. */
  shift = 0;

  tryToEncode(object: unknown, context: undefined): ExtData | null {
    if (!(object instanceof Tensor)) return ExtensionCodec.defaultCodec.tryToEncode(object, context);
    const t: Tensor = object;
    const ndim = t.shape.length;
    if (ndim > MAX_NDIM) throw new CodecError(`tensor has ${ndim} dimensions, more than the ${MAX_NDIM} a message carries`);
    for (const d of t.shape) {
      if (d > MAX_DIM) throw new CodecError(`tensor dimension ${d} in shape [${t.shape.join(', ')}] exceeds 2^32-1`);
    }
    const elementSize = ELEMENT_SIZE[t.dtype];
    return new ExtData(TENSOR_EXT_TYPES[t.dtype], (dataPos: number) => {
      const fixed = 1 + 4 * ndim + 1;
      const pad = (elementSize - ((dataPos + this.shift + fixed) % elementSize)) % elementSize;
      // Written byte by byte: a DataView over this small array would give it its own backing store.
      const header = new Uint8Array(fixed + pad);
      header[0] = ndim;
      for (let i = 0; i < ndim; i++) writeU32(header, 1 + 4 * i, t.shape[i]!, true);
      header[fixed - 1] = pad;
      this.pending.push({ envelopeEnd: dataPos + header.length, lengthAt: dataPos - 5, headerLength: header.length, bytes: bytesOf(t.data) });
      this.shift += t.byteLength;
      return header;
    });
  }

  /** Set while decoding a message whose bytes are reused afterwards: tensors are copied out of it. */
  copy = false;

  decode(data: Uint8Array, extType: number, context: undefined): unknown {
    const dtype = DTYPE_OF_EXT.get(extType);
    if (dtype !== undefined) return decodeTensor(data, dtype, this.copy);
    if (extType === TIMESTAMP_EXT) return ExtensionCodec.defaultCodec.decode(data, extType, context);
    throw new CodecError(`unknown msgpack extension type ${extType}`);
  }
}

/** The product of the dims, exact while it is a safe integer (any larger value is not). */
function elementCount(shape: readonly number[]): number {
  if (shape.includes(0)) return 0;
  let n = 1;
  for (const d of shape) {
    n *= d;
    if (n > Number.MAX_SAFE_INTEGER) break;
  }
  return n;
}

function badTensor(data: Uint8Array, dtype: DType, what: string): never {
  throw new CodecError(`${dtype} tensor extension (${data.length} bytes): ${what}`);
}

/** Writes `v` as a u32 at `at`, little- or big-endian. */
function writeU32(bytes: Uint8Array, at: number, v: number, little: boolean): void {
  for (let i = 0; i < 4; i++) bytes[at + (little ? i : 3 - i)] = (v >>> (8 * i)) & 0xff;
}

function readU32LE(bytes: Uint8Array, at: number): number {
  return (bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | (bytes[at + 3]! << 24)) >>> 0;
}

function decodeTensor(data: Uint8Array, dtype: DType, copy: boolean): Tensor {
  if (data.length < 2) badTensor(data, dtype, 'too short for a tensor header');
  const ndim = data[0]!;
  if (ndim > MAX_NDIM) badTensor(data, dtype, `${ndim} dimensions, more than ${MAX_NDIM}`);
  const fixed = 1 + 4 * ndim + 1;
  if (data.length < fixed) badTensor(data, dtype, `too short for the header of a ${ndim}-d tensor`);
  const shape: number[] = [];
  for (let i = 0; i < ndim; i++) shape.push(readU32LE(data, 1 + 4 * i));
  const elementSize = ELEMENT_SIZE[dtype];
  const pad = data[fixed - 1]!;
  if (pad >= elementSize) badTensor(data, dtype, `padding ${pad} is not below the element size ${elementSize}`);
  const start = fixed + pad;
  if (data.length < start) badTensor(data, dtype, `too short for its ${pad} padding bytes`);
  for (let i = fixed; i < start; i++) if (data[i] !== 0) badTensor(data, dtype, 'padding bytes are not zero');
  const byteLength = data.length - start;
  const n = elementCount(shape);
  if (n * elementSize !== byteLength) {
    const needs = Number.isSafeInteger(n) ? `${n * elementSize} bytes` : 'more than 2^53 elements';
    badTensor(data, dtype, `shape [${shape.join(', ')}] needs ${needs} of data but it holds ${byteLength} bytes`);
  }
  const ctor = STORAGE_CTOR[dtype];
  const offset = data.byteOffset + start;
  let storage: Storage;
  if (offset % elementSize === 0) {
    // Zero-copy: the tensor aliases the message, which must outlive it unchanged (or a copy, which need not).
    storage = new ctor(data.buffer as ArrayBuffer, offset, n);
    if (copy) storage = storage.slice();
  } else {
    storage = new ctor(n);
    new Uint8Array(storage.buffer).set(data.subarray(start));
  }
  return new Tensor(dtype, shape, storage);
}

const codec = new TensorCodec();
const encoder = new Encoder({ extensionCodec: codec });

/**
 * Encode any msgpack value; Tensor instances anywhere inside become tensor extensions. The
 * message owns its ArrayBuffer (so it can be transferred); pass `reuse`, a buffer from an
 * earlier message that came back, to write into it when it is large enough: fresh
 * multi-MiB buffers cost page faults on every exchange.
 */
export function encodeMessage(value: unknown, reuse?: ArrayBuffer): Uint8Array {
  codec.pending = [];
  codec.shift = 0;
  let envelope: Uint8Array;
  try {
    envelope = encoder.encodeSharedRef(value);
  } catch (e) {
    if (e instanceof CodecError) throw e;
    throw new CodecError(`cannot encode message: ${messageOf(e)}`, { cause: e });
  }
  const pending = codec.pending;
  codec.pending = [];
  const total = envelope.length + codec.shift;
  // Uninitialized memory saves zeroing a buffer that the copies below fill completely.
  // allocUnsafeSlow is never pooled, so the message owns its ArrayBuffer and can be transferred.
  const out = reuse && reuse.byteLength >= total ? new Uint8Array(reuse, 0, total) : new Uint8Array(Buffer.allocUnsafeSlow(total).buffer, 0, total);
  let from = 0;
  let to = 0;
  for (const p of pending) {
    const extLength = p.headerLength + p.bytes.length;
    if (extLength > 0xffffffff) throw new CodecError(`tensor of ${p.bytes.length} bytes exceeds the 4 GiB msgpack extension limit`);
    writeU32(envelope, p.lengthAt, extLength, false); // msgpack lengths are big-endian
    out.set(envelope.subarray(from, p.envelopeEnd), to);
    to += p.envelopeEnd - from;
    from = p.envelopeEnd;
    out.set(p.bytes, to);
    to += p.bytes.length;
  }
  out.set(envelope.subarray(from), to);
  return out;
}

// The decoder's length limits are fixed when it is built, and they must stay near the message
// length so that a header claiming 2^31 array elements fails before anything is allocated.
// So there is one reusable decoder per power-of-two message size: limits at most 2x the length.
const decoders = new Map<number, Decoder>();

function decoderFor(length: number): Decoder {
  const bits = Math.max(10, length < 2 ** 31 ? 32 - Math.clz32(length) : Math.ceil(Math.log2(length + 1))); // bits of `length`
  let decoder = decoders.get(bits);
  if (decoder === undefined) {
    const limit = 2 ** bits;
    decoder = new Decoder({
      extensionCodec: codec,
      maxStrLength: limit,
      maxBinLength: limit,
      maxArrayLength: limit,
      maxMapLength: limit,
      maxExtLength: limit,
    });
    decoders.set(bits, decoder);
  }
  return decoder;
}

/**
 * Decode one message. Tensors come back as Tensor, as views into `bytes` where their data is
 * aligned in memory, else as copies; always as copies with `copyTensors`, so that the caller
 * may reuse `bytes` at once (a fast-lane slot). Any malformed input throws CodecError and
 * nothing else.
 */
export function decodeMessage(bytes: Uint8Array, copyTensors = false): unknown {
  if (!(bytes instanceof Uint8Array)) throw new CodecError('message must be a Uint8Array');
  codec.copy = copyTensors;
  try {
    return decoderFor(bytes.length).decode(bytes);
  } catch (e) {
    if (e instanceof CodecError) throw e;
    throw new CodecError(`invalid message (${bytes.length} bytes): ${messageOf(e)}`, { cause: e });
  } finally {
    codec.copy = false;
  }
}
