// safetensors, the case-file container: u64 LE header length N, N bytes of JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the
// data buffer (offsets are relative to its start). Files come from outside, so every field
// is checked before any length in it is used to slice or allocate.
import { readFile } from 'node:fs/promises';
import { writeFileAtomic } from '../atomic.js';
import { ELEMENT_SIZE, STORAGE_CTOR, Tensor, type DType, type Storage } from '../tensor.js';

export class SafetensorsError extends Error {
  override name = 'SafetensorsError';
}

export interface SafetensorsFile {
  tensors: Map<string, Tensor>;
  metadata: Record<string, string>;
}

const FILE_DTYPE: Record<string, DType> = { F32: 'f32', F64: 'f64', I32: 'i32', I64: 'i64', BF16: 'bf16', F16: 'f16' };
const DTYPE_NAME: Record<DType, string> = { f32: 'F32', f64: 'F64', i32: 'I32', i64: 'I64', bf16: 'BF16', f16: 'F16' };

/** Headers beyond this are refused before decoding (the Python implementation's cap). */
const MAX_HEADER = 100_000_000;
const METADATA_KEY = '__metadata__';

// File data is little-endian; typed arrays use the host order.
if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) throw new Error('ep-actors safetensors codec needs a little-endian host');

const utf8 = new TextDecoder('utf-8', { fatal: true });
const utf8Encoder = new TextEncoder();

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function show(v: unknown): string {
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 60 ? `${s.slice(0, 57)}...` : s;
}

interface Entry {
  name: string;
  dtype: DType;
  shape: number[];
  begin: number;
  end: number;
}

export function readSafetensors(bytes: Uint8Array, what?: string): SafetensorsFile {
  const fail = (msg: string): never => {
    throw new SafetensorsError(what ? `${what}: ${msg}` : msg);
  };
  if (bytes.length < 8) fail(`file is ${bytes.length} bytes, too short for the 8-byte header length`);
  const claimed = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
  if (claimed > BigInt(bytes.length - 8)) fail(`header length ${claimed} runs past the end of the ${bytes.length}-byte file`);
  if (claimed > BigInt(MAX_HEADER)) fail(`header length ${claimed} exceeds the ${MAX_HEADER}-byte limit`);
  const headerLength = Number(claimed);

  let text: string;
  try {
    text = utf8.decode(bytes.subarray(8, 8 + headerLength));
  } catch {
    return fail('header is not valid UTF-8');
  }
  let header: unknown;
  try {
    header = JSON.parse(text);
  } catch (e) {
    return fail(`header is not valid JSON: ${(e as Error).message}`);
  }
  if (!isPlainObject(header)) return fail('header is not a JSON object');

  const buffer = bytes.subarray(8 + headerLength);
  let metadata: Record<string, string> = {};
  const entries: Entry[] = [];
  for (const [name, info] of Object.entries(header)) {
    if (name === METADATA_KEY) {
      if (!isPlainObject(info)) fail(`${METADATA_KEY} is not an object`);
      const pairs = Object.entries(info as Record<string, unknown>);
      for (const [k, v] of pairs) if (typeof v !== 'string') fail(`metadata '${k}' is ${show(v)}, not a string`);
      // fromEntries defines own properties, so a key like "__proto__" stays a plain key.
      metadata = Object.fromEntries(pairs) as Record<string, string>;
      continue;
    }
    entries.push(checkEntry(name, info, buffer.length, fail));
  }

  const byOffset = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  for (let i = 1; i < byOffset.length; i++) {
    const prev = byOffset[i - 1]!;
    const cur = byOffset[i]!;
    if (cur.begin < prev.end) {
      fail(`tensor '${cur.name}': data_offsets [${cur.begin}, ${cur.end}] overlap tensor '${prev.name}' at [${prev.begin}, ${prev.end}]`);
    }
  }

  const tensors = new Map<string, Tensor>();
  for (const e of entries) {
    // A fresh array: offsets in a file need not be aligned to the element size.
    const data: Storage = new STORAGE_CTOR[e.dtype]((e.end - e.begin) / ELEMENT_SIZE[e.dtype]);
    new Uint8Array(data.buffer).set(buffer.subarray(e.begin, e.end));
    tensors.set(e.name, new Tensor(e.dtype, e.shape, data));
  }
  return { tensors, metadata };
}

function checkEntry(name: string, info: unknown, bufferLength: number, fail: (msg: string) => never): Entry {
  const bad = (msg: string): never => fail(`tensor '${name}': ${msg}`);
  if (!isPlainObject(info)) return bad(`entry is ${show(info)}, not an object`);
  const { dtype: dtypeName, shape, data_offsets: offsets } = info;
  if (typeof dtypeName !== 'string' || !Object.hasOwn(FILE_DTYPE, dtypeName)) {
    return bad(`dtype ${show(dtypeName)} is not one of ${Object.keys(FILE_DTYPE).join(', ')}`);
  }
  const dtype = FILE_DTYPE[dtypeName]!;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    return bad(`shape ${show(shape)} is not a list of non-negative integers`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0)) {
    return bad(`data_offsets ${show(offsets)} are not two non-negative integers`);
  }
  const [begin, end] = offsets as [number, number];
  if (begin > end) bad(`data_offsets [${begin}, ${end}] begin after they end`);
  if (end > bufferLength) bad(`data_offsets [${begin}, ${end}] run past the ${bufferLength}-byte data buffer`);
  const held = end - begin;
  const elementSize = ELEMENT_SIZE[dtype];
  // The product is exact while it is a safe integer; past that it cannot match `held` anyway.
  let n = shape.includes(0) ? 0 : 1;
  for (const d of shape as number[]) {
    n *= d;
    if (n > Number.MAX_SAFE_INTEGER) break;
  }
  if (n * elementSize !== held) {
    const needs = Number.isSafeInteger(n) ? `${n * elementSize}` : 'more than 2^53 elements';
    bad(`data_offsets [${begin}, ${end}] hold ${held} bytes but shape [${shape.join(', ')}] of ${dtypeName} needs ${needs}`);
  }
  return { name, dtype, shape: shape as number[], begin, end };
}

/**
 * Serialize tensors (in name order) and string metadata. The header is padded with spaces
 * so that the data buffer starts 8-byte aligned.
 */
export function writeSafetensors(tensors: Map<string, Tensor> | Record<string, Tensor>, metadata?: Record<string, string>): Uint8Array {
  const named = (tensors instanceof Map ? [...tensors] : Object.entries(tensors)).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  // The header is built as text so that any name, "__proto__" included, is a plain key.
  const parts: string[] = [];
  let offset = 0;
  for (const [name, t] of named) {
    if (name === METADATA_KEY) throw new SafetensorsError(`tensor name '${METADATA_KEY}' is reserved for metadata`);
    if (!(t instanceof Tensor)) throw new SafetensorsError(`tensor '${name}' is not a Tensor`);
    const info = { dtype: DTYPE_NAME[t.dtype], shape: t.shape, data_offsets: [offset, offset + t.byteLength] };
    parts.push(`${JSON.stringify(name)}:${JSON.stringify(info)}`);
    offset += t.byteLength;
  }
  if (metadata !== undefined) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== 'string') throw new SafetensorsError(`metadata '${k}' is ${show(v)}, not a string`);
    }
    parts.push(`${JSON.stringify(METADATA_KEY)}:${JSON.stringify(metadata)}`);
  }
  const json = utf8Encoder.encode(`{${parts.join(',')}}`);
  const headerLength = json.length + ((8 - (json.length % 8)) % 8);
  const out = new Uint8Array(8 + headerLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLength), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.length, 8 + headerLength);
  let at = 8 + headerLength;
  for (const [, t] of named) {
    out.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.byteLength), at);
    at += t.byteLength;
  }
  return out;
}

export async function readSafetensorsFile(path: string): Promise<SafetensorsFile> {
  let bytes: Uint8Array;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new SafetensorsError(`${path}: cannot read: ${(e as Error).message}`, { cause: e });
  }
  return readSafetensors(bytes, path);
}

/** Write a safetensors file atomically (src/atomic.ts): readers see the old file or the whole new one. */
export async function writeSafetensorsFileAtomic(
  path: string,
  tensors: Map<string, Tensor> | Record<string, Tensor>,
  metadata?: Record<string, string>,
): Promise<void> {
  const bytes = writeSafetensors(tensors, metadata);
  try {
    await writeFileAtomic(path, bytes);
  } catch (e) {
    throw new SafetensorsError(`${path}: cannot write: ${(e as Error).message}`, { cause: e });
  }
}
