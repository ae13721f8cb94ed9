// PyTorch Flight Recorder dumps (one file per rank, `<prefix><rank>`, written on the
// watchdog's timeout): read as pickle (torch's protocol 2 or Python's 4/5) or JSON
// (`_dump_nccl_trace_json`), and checked field by field into one typed form, whatever the
// trace version (2.3 … 2.10) and container. Fields this reader does not use are ignored.
import { isTuple, readPickle, PickleError } from '../../src/codec/pickle.js';

export class EvidenceError extends Error {
  override name = 'EvidenceError';
}

export type FrState = 'scheduled' | 'started' | 'completed';

/** Backends whose profiling names the reader knows (`nccl:all_reduce`, `gloo:…`). */
export const BACKENDS = ['nccl', 'ncclx', 'gloo', 'xccl'] as const;

export interface FrFrame {
  readonly name: string;
  readonly filename: string;
  readonly line: number;
}

export interface FrEntry {
  readonly recordId: number;
  /** The process group's name (torch's uid, "0", "1", …) and description ("mesh_ep", …). */
  readonly pgName: string;
  readonly seq: number;
  readonly p2pSeq: number;
  readonly profilingName: string;
  readonly backend: string;
  /** The op without its backend prefix and peer suffix: all_to_all, send, coalesced, … */
  readonly op: string;
  /** send/recv: the peer pair in group ranks, as the profiling name gives it. */
  readonly p2p: { readonly from: number; readonly to: number } | null;
  readonly inputSizes: readonly (readonly number[])[];
  readonly outputSizes: readonly (readonly number[])[];
  readonly inputDtypes: readonly string[];
  readonly outputDtypes: readonly string[];
  readonly state: FrState;
  readonly createdNs: bigint;
  readonly completedNs: bigint | null;
  readonly frames: readonly FrFrame[];
}

export interface FrGroup {
  readonly name: string;
  readonly desc: string;
  /** Global ranks in group-rank order. */
  readonly ranks: readonly number[];
}

export interface FrDump {
  readonly file: string;
  readonly rank: number;
  readonly version: string;
  readonly commLibVersion: string | null;
  readonly groups: ReadonlyMap<string, FrGroup>;
  /** Entries in record order (one counter per process across groups). */
  readonly entries: readonly FrEntry[];
  /** The ring buffer dropped its oldest entries (the first record id is not 0). */
  readonly truncated: boolean;
}

/** A Flight Recorder dump's file name: prefix, rank (`nccl_trace_rank_3`, `fr_dump_12.json`). */
export const DUMP_NAME = /^(?!rank\d+\.record\.json$)(.*?)(\d+)(\.json|\.pkl)?$/;

/** Reads one rank's dump from its bytes: JSON when it starts with `{`, pickle otherwise. */
export function readDump(bytes: Uint8Array, file: string, rank: number): FrDump {
  let value: unknown;
  let i = 0;
  while (i < bytes.length && (bytes[i] === 0x20 || bytes[i] === 0x0a || bytes[i] === 0x0d || bytes[i] === 0x09)) i++;
  if (bytes[i] === 0x7b) {
    try {
      value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
    } catch (e) {
      throw new EvidenceError(`${file}: not valid JSON: ${(e as Error).message}`);
    }
  } else if (bytes[i] === 0x80) {
    try {
      // Dicts read as the objects JSON gives, so both forms go through one reader.
      value = readPickle(bytes, file);
    } catch (e) {
      if (e instanceof PickleError) throw new EvidenceError(e.message);
      throw e;
    }
  } else {
    throw new EvidenceError(`${file}: neither a pickle (first byte 0x80) nor JSON: not a Flight Recorder dump`);
  }
  return parseDump(value, file, rank);
}

const MAX_RANK = 1 << 20;

/** A field that is wrong, named relative to the entry or table it is in; the reader adds where. */
class FieldError extends Error {
  constructor(
    readonly field: string,
    readonly problem: string,
  ) {
    super(`${field} ${problem}`);
  }
}

// Checkers that build no message unless a check fails (a dump holds a million fields).
const obj = (v: unknown, field: string): Record<string, unknown> => {
  if (v && typeof v === 'object' && !Array.isArray(v) && !isTuple(v)) return v as Record<string, unknown>;
  throw new FieldError(field, 'is not a dict');
};
/** A list, or a tuple (pickle keeps process_group one; JSON has lists only). */
const list = (v: unknown, field: string): readonly unknown[] => {
  if (Array.isArray(v)) return v;
  if (isTuple(v)) return v.tuple;
  throw new FieldError(field, 'is not a list');
};
const str = (v: unknown, field: string): string => {
  if (typeof v === 'string') return v;
  throw new FieldError(field, 'is not a string');
};
const int = (v: unknown, field: string): number => {
  if (typeof v === 'number' && Number.isSafeInteger(v)) return v;
  // JSON dumps write some counters as strings ("-1" for none).
  if (typeof v === 'string' && /^-?\d{1,15}$/.test(v)) return Number(v);
  throw new FieldError(field, 'is not an integer');
};
const ns = (v: unknown, field: string): bigint | null => {
  if (v === null || v === undefined || v === 0) return null;
  if (typeof v === 'bigint') return v;
  if (typeof v === 'number' && Number.isFinite(v)) return BigInt(Math.round(v));
  throw new FieldError(field, 'is not a time in ns');
};
/**
 * The lists a dump repeats entry after entry (shapes, dtypes, frames), kept once per dump:
 * its million entries then hold a few dozen lists, not several million.
 */
class Shared {
  private readonly lists = new Map<string, readonly unknown[]>();
  private readonly frameIds = new Map<object, number>();
  list<T>(key: string, v: readonly T[]): readonly T[] {
    const known = this.lists.get(key);
    if (known) return known as readonly T[];
    this.lists.set(key, v);
    return v;
  }
  /** Frames by identity: torch shares each frame dict across the entries that name it. */
  frames(frames: readonly FrFrame[]): readonly FrFrame[] {
    let key = 'f';
    for (const f of frames) {
      let id = this.frameIds.get(f);
      if (id === undefined) this.frameIds.set(f, (id = this.frameIds.size));
      key += `${id},`;
    }
    return this.list(key, frames);
  }
}
const shapes = (v: unknown, field: string, shared: Shared): readonly number[][] => {
  const outer = list(v, field);
  let key = 's';
  for (let k = 0; k < outer.length; k++) {
    const s = outer[k];
    if (!Array.isArray(s)) throw new FieldError(`${field}[${k}]`, 'is not a list');
    for (let j = 0; j < s.length; j++) if (typeof s[j] !== 'number' || !Number.isSafeInteger(s[j]) || s[j] < 0) throw new FieldError(`${field}[${k}][${j}]`, 'is not a size');
    key += `${s.join(',')};`;
  }
  return shared.list(key, outer as readonly number[][]);
};
const strings = (v: unknown, field: string, shared: Shared): readonly string[] => {
  const out = v === undefined ? [] : list(v, field);
  for (let k = 0; k < out.length; k++) if (typeof out[k] !== 'string') throw new FieldError(`${field}[${k}]`, 'is not a string');
  return shared.list(`d${out.join(';')}`, out as readonly string[]);
};
const NO_FRAMES: readonly FrFrame[] = [];
const isFrame = (f: unknown): f is FrFrame => !!f && typeof f === 'object' && typeof (f as FrFrame).name === 'string' && typeof (f as FrFrame).filename === 'string' && typeof (f as FrFrame).line === 'number';
/** Frames as they are where each is {name, filename, line} (torch shares them across entries: no copy per entry); otherwise read leniently. */
function frameList(frames: readonly unknown[]): readonly FrFrame[] {
  if (frames.every(isFrame)) return frames;
  return frames.map((f, k) => {
    const fr = obj(f, `frames[${k}]`);
    return { name: String(fr.name ?? ''), filename: String(fr.filename ?? ''), line: typeof fr.line === 'number' ? fr.line : 0 };
  });
}
const PROFILING = /^([a-z]+):(\S+)(?: (\d+)(->|<-)(\d+))?$/;
const STATES: readonly string[] = ['scheduled', 'started', 'completed'];

type Profiling = Pick<FrEntry, 'backend' | 'op' | 'p2p'>;
/** A dump repeats a handful of profiling names a million times: each is read once. */
const profilings = new Map<string, Profiling>();
function profiling(name: string): Profiling {
  const known = profilings.get(name);
  if (known) return known;
  const pm = PROFILING.exec(name);
  if (!pm) throw new FieldError('profiling_name', `${JSON.stringify(name.slice(0, 60))} is not backend:op`);
  const [, backend, op, a, arrow, b] = pm;
  if (!(BACKENDS as readonly string[]).includes(backend!)) throw new FieldError('profiling_name', `has backend ${JSON.stringify(backend)}; known: ${BACKENDS.join(', ')}`);
  const p: Profiling = { backend: backend!, op: op!, p2p: a === undefined ? null : arrow === '->' ? { from: Number(a), to: Number(b) } : { from: Number(b), to: Number(a) } };
  if (profilings.size > 10_000) profilings.clear(); // a bound for a long-lived process
  profilings.set(name, p);
  return p;
}

/** Checks a decoded dump; every error names the file and the field. */
export function parseDump(value: unknown, file: string, rank: number): FrDump {
  const fail = (msg: string): never => {
    throw new EvidenceError(`${file}: ${msg}`);
  };
  try {
    return parseFields(value, file, rank, fail);
  } catch (e) {
    if (e instanceof FieldError) fail(e.message);
    throw e;
  }
}

function parseFields(value: unknown, file: string, rank: number, fail: (msg: string) => never): FrDump {
  const top = obj(value, 'the dump');
  const version = str(top.version, 'version');
  const m = /^2\.(\d+)$/.exec(version);
  if (!m || Number(m[1]) < 2) fail(`Flight Recorder version ${JSON.stringify(version)} is not one this reader knows (2.2 … 2.10)`);
  const minor = Number(m![1]);
  const lib = top.comm_lib_version ?? top.nccl_version ?? null;
  const groups = new Map<string, FrGroup>();
  for (const [key, g] of Object.entries(obj(top.pg_config ?? {}, 'pg_config'))) {
    const cfg = obj(g, `pg_config[${key}]`);
    const ranksText = str(cfg.ranks, `pg_config[${key}].ranks`);
    if (!/^\[\s*(\d+\s*(,\s*\d+\s*)*)?\]$/.test(ranksText)) fail(`pg_config[${key}].ranks ${JSON.stringify(ranksText.slice(0, 40))} is not a list of ranks`);
    const ranks = (JSON.parse(ranksText) as number[]).map((r) => (r < MAX_RANK ? r : fail(`pg_config[${key}] has rank ${r}`)));
    if (new Set(ranks).size !== ranks.length) fail(`pg_config[${key}] lists a rank twice`);
    groups.set(String(cfg.name ?? key), { name: String(cfg.name ?? key), desc: typeof cfg.desc === 'string' ? cfg.desc : '', ranks });
  }
  const raw = list(top.entries ?? [], 'entries');
  const entries: FrEntry[] = new Array(raw.length);
  const shared = new Shared();
  const mine = new Set<string>(); // groups already seen to include this rank
  for (let i = 0; i < raw.length; i++) {
    try {
      entries[i] = parseEntry(raw[i], groups, minor, shared);
    } catch (e) {
      if (e instanceof FieldError) fail(`entries[${i}]${e.field ? `.${e.field}` : ''} ${e.problem}`);
      throw e;
    }
    const e = entries[i]!;
    if (i > 0 && e.recordId <= entries[i - 1]!.recordId) fail(`entries[${i}].record_id ${e.recordId} does not follow ${entries[i - 1]!.recordId}`);
    if (!mine.has(e.pgName)) {
      if (!groups.get(e.pgName)!.ranks.includes(rank)) fail(`entries[${i}] is on process group ${e.pgName}, whose ranks do not include ${rank} (the rank its file name gives)`);
      mine.add(e.pgName);
    }
  }
  return { file, rank, version, commLibVersion: lib === null ? null : String(lib), groups, entries, truncated: (entries[0]?.recordId ?? 0) > 0 };
}

function parseEntry(raw: unknown, groups: ReadonlyMap<string, FrGroup>, minor: number, shared: Shared): FrEntry {
  const e = obj(raw, '');
  const pgName = str(list(e.process_group, 'process_group')[0], 'process_group[0]');
  if (!groups.has(pgName)) throw new FieldError('', `is on process group ${JSON.stringify(pgName)}, which pg_config does not list`);
  const profilingName = str(e.profiling_name, 'profiling_name');
  const { backend, op, p2p } = profiling(profilingName);
  // Before 2.4 all-to-all entries carry no sizes; absent reads as unknown (empty).
  const sizes = (v: unknown, field: string) => (v === undefined && minor < 4 ? [] : shapes(v, field, shared));
  const state = str(e.state, 'state');
  if (!STATES.includes(state)) throw new FieldError('state', `${JSON.stringify(state)} is not scheduled, started or completed`);
  const frames = e.frames === undefined ? NO_FRAMES : shared.frames(frameList(list(e.frames, 'frames')));
  return {
    recordId: int(e.record_id, 'record_id'),
    pgName,
    seq: int(e.collective_seq_id, 'collective_seq_id'),
    p2pSeq: e.p2p_seq_id === undefined ? 0 : int(e.p2p_seq_id, 'p2p_seq_id'),
    profilingName,
    backend,
    op,
    p2p,
    inputSizes: sizes(e.input_sizes, 'input_sizes'),
    outputSizes: sizes(e.output_sizes, 'output_sizes'),
    inputDtypes: strings(e.input_dtypes, 'input_dtypes', shared),
    outputDtypes: strings(e.output_dtypes, 'output_dtypes', shared),
    state: state as FrState,
    createdNs: ns(e.time_created_ns, 'time_created_ns') ?? 0n,
    completedNs: ns(e.time_discovered_completed_ns, 'time_discovered_completed_ns'),
    frames,
  };
}
