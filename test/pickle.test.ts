// The pickle reader against Python's own pickle (the fixtures make_dumps.py wrote with
// protocols 2, 4 and 5), hand-made opcode streams, and damaged input: every outcome is a
// value or a PickleError naming the file and byte offset.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { isTuple, PickleError, readPickle, type PickleDict, type PickleValue } from '../src/codec/pickle.js';
import { seededRng } from '../src/moe/random.js';
import { repoRoot } from './paths.js';

const fixtures = join(repoRoot, 'test', 'fixtures', 'flight-recorder');
const file = (kase: string, rank: number) => readFileSync(join(fixtures, kase, `nccl_trace_rank_${rank}`));
const bytes = (...parts: (number | string)[]) => Uint8Array.from(parts.flatMap((p) => (typeof p === 'number' ? [p] : [...Buffer.from(p, 'latin1')])));

/** Tuples and bigints as plain JSON-able values, for deep comparison. */
function plain(v: PickleValue): unknown {
  if (isTuple(v)) return { tuple: v.tuple.map(plain) };
  if (Array.isArray(v)) return v.map(plain);
  if (v !== null && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return typeof v === 'bigint' ? `${v}n` : v;
}

test('protocols 2, 4 and 5 of one dump decode to the same value, and it is the JSON form plus frames', () => {
  for (let rank = 0; rank < 4; rank++) {
    const p2 = plain(readPickle(file('zero-token', rank)));
    assert.equal(plain(readPickle(file('zero-token-pickle4', rank))), p2);
    assert.equal(plain(readPickle(file('zero-token-pickle5', rank))), p2);
    const json = JSON.parse(file('zero-token-json', rank).toString('utf8')) as { entries: { collective_seq_id: number; input_sizes: number[][]; profiling_name: string }[] };
    const fromPickle = p2 as { entries: { collective_seq_id: number; input_sizes: number[][]; profiling_name: string; frames: unknown[]; process_group: { tuple: string[] } }[] };
    assert.is(fromPickle.entries.length, json.entries.length);
    fromPickle.entries.forEach((e, i) => {
      assert.equal([e.collective_seq_id, e.input_sizes, e.profiling_name], [json.entries[i]!.collective_seq_id, json.entries[i]!.input_sizes, json.entries[i]!.profiling_name]);
      assert.equal(e.process_group, { tuple: ['1', 'mesh_ep'] }, 'a tuple stays a tuple');
      assert.is(e.frames.length, 1);
    });
  }
});

test('64-bit integers stay exact: time_created_ns past 2**53 is a bigint, small ints are numbers', () => {
  const dump = readPickle(file('healthy', 2)) as PickleDict;
  const entries = dump.entries as PickleDict[];
  // make_dumps.py: T0 + 1_000_003 * record_id + 17 * rank
  assert.is(entries[0]!.time_created_ns, 1_732_000_000_123_456_789n + 34n);
  assert.is(entries[5]!.time_created_ns, 1_732_000_000_123_456_789n + 5n * 1_000_003n + 34n);
  assert.is(entries[5]!.record_id, 5);
  // LONG1 edge cases: negative, zero-length, 8-byte min, just inside the safe range.
  assert.is(readPickle(bytes(0x80, 2, 0x8a, 1, 0xff, 0x2e)), -1);
  assert.is(readPickle(bytes(0x80, 2, 0x8a, 0, 0x2e)), 0);
  assert.is(readPickle(bytes(0x80, 2, 0x8a, 8, 0, 0, 0, 0, 0, 0, 0, 0x80, 0x2e)), -(2n ** 63n));
  assert.is(readPickle(bytes(0x80, 2, 0x8a, 7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x2e)), Number.MAX_SAFE_INTEGER);
  assert.is(readPickle(bytes(0x80, 2, 0x8a, 7, 0, 0, 0, 0, 0, 0, 0x20, 0x2e)), 2n ** 53n);
  assert.is(readPickle(bytes(0x80, 2, 0x4a, 0xfe, 0xff, 0xff, 0xff, 0x2e)), -2, 'BININT is signed');
  assert.is(readPickle(bytes(0x80, 2, 0x4d, 0xff, 0xff, 0x2e)), 65535, 'BININT2 is unsigned');
});

test('the rest of the subset: floats, bools, None, tuples, BINUNICODE8, memo, dict and list forms', () => {
  assert.is(readPickle(bytes(0x80, 2, 0x47, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0, 0x2e)), 1.5);
  assert.equal(plain(readPickle(bytes(0x80, 2, 0x88, 0x89, 0x4e, 0x87, 0x2e))), { tuple: [true, false, null] });
  assert.equal(plain(readPickle(bytes(0x80, 2, 0x29, 0x2e))), { tuple: [] });
  assert.is(readPickle(bytes(0x80, 4, 0x8d, 2, 0, 0, 0, 0, 0, 0, 0, 'hi', 0x2e)), 'hi');
  // A string memoized once and fetched twice (Python shares repeated strings this way).
  assert.equal(plain(readPickle(bytes(0x80, 2, 0x5d, 0x71, 0, 0x58, 1, 0, 0, 0, 'a', 0x71, 1, 0x61, 0x68, 1, 0x61, 0x2e))), ['a', 'a']);
  assert.equal(plain(readPickle(bytes(0x80, 4, 0x95, 9, 0, 0, 0, 0, 0, 0, 0, 0x7d, 0x94, 0x8c, 1, 'k', 0x94, 0x4b, 7, 0x73, 0x2e))), { k: 7 });
  assert.equal(plain(readPickle(bytes(0x80, 2, 0x28, 0x4b, 1, 0x4b, 2, 0x6c, 0x2e))), [1, 2], 'LIST');
  assert.equal(plain(readPickle(bytes(0x80, 2, 0x28, 0x4b, 1, 0x4b, 2, 0x64, 0x2e))), { 1: 2 }, 'DICT with an int key (read as JSON would)');
  // A "__proto__" key is an own entry, not the dict's prototype.
  const proto = readPickle(bytes(0x80, 2, 0x7d, 0x58, 9, 0, 0, 0, '__proto__', 0x7d, 0x58, 1, 0, 0, 0, 'x', 0x4b, 1, 0x73, 0x73, 0x2e)) as PickleDict;
  assert.equal([Object.keys(proto), Object.getPrototypeOf(proto) === Object.prototype, (proto as { x?: unknown }).x], [['__proto__'], true, undefined]);
  assert.ok(isTuple(readPickle(bytes(0x80, 2, 0x4b, 1, 0x85, 0x2e))) && !isTuple(readPickle(bytes(0x80, 2, 0x7d, 0x58, 5, 0, 0, 0, 'tuple', 0x5d, 0x73, 0x2e))), 'a dict with a "tuple" key is no tuple');
  // A frame dict torch memoizes once (BINPUT after SETITEMS) and shares by BINGET in every entry's frames.
  const frames = plain(readPickle(bytes(0x80, 2, 0x5d, 0x28, 0x7d, 0x28, 0x58, 4, 0, 0, 0, 'line', 0x4b, 7, 0x75, 0x71, 0, 0x68, 0, 0x65, 0x2e)));
  assert.equal(frames, [{ line: 7 }, { line: 7 }]);
  // 8-byte LONG1 (torch's form of every int past 32 bits): a number while exact, a bigint past 2**53.
  const long8 = (n: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigInt64LE(n);
    return readPickle(bytes(0x80, 2, 0x8a, 8, ...b, 0x2e));
  };
  assert.is(long8(-1n), -1);
  assert.is(long8(2n ** 53n - 1n), Number.MAX_SAFE_INTEGER);
  assert.is(long8(-(2n ** 53n) + 1n), Number.MIN_SAFE_INTEGER);
  assert.is(long8(2n ** 53n), 2n ** 53n);
  assert.is(long8(-(2n ** 53n)), -(2n ** 53n));
  assert.is(long8(1_732_000_000_123_456_789n), 1_732_000_000_123_456_789n);
});

test('refused with the offset: every GLOBAL (torch\'s list tags too), REDUCE, unknown opcodes, truncation, cycles, deep nesting, memo blow-ups', () => {
  const refuse = (b: Uint8Array, re: RegExp) => {
    try {
      readPickle(b, 'dump.pkl');
    } catch (e) {
      assert.instance(e, PickleError);
      assert.match((e as Error).message, /^dump\.pkl: /);
      assert.match((e as Error).message, re);
      return;
    }
    assert.unreachable(`accepted ${Buffer.from(b).toString('hex')}`);
  };
  refuse(bytes(0x80, 2, 0x63, 'os\nsystem\n', 0x8c, 2, 'ls', 0x85, 0x52, 0x2e), /refuses GLOBAL os\.system .* at byte 2$/);
  // torch pickles a dump with type tags off and generic lists only: not even its own list tags appear (DESIGN.md).
  refuse(bytes(0x80, 2, 0x63, 'torch.jit._pickle\nbuild_intlist\n', 0x5d, 0x28, 0x4b, 3, 0x65, 0x85, 0x52, 0x2e), /refuses GLOBAL torch\.jit\._pickle\.build_intlist .* at byte 2$/);
  refuse(bytes(0x80, 2, 0x63, 'collections\nOrderedDict\n', 0x29, 0x52, 0x2e), /refuses GLOBAL collections\.OrderedDict .* at byte 2$/);
  refuse(bytes(0x80, 2, 0x5d, 0x29, 0x52, 0x2e), /unsupported opcode 0x52 .* at byte 4/);
  // Each list holds the one before twice: 64 levels would unfold to 2**64 values.
  const laughs = [0x80, 2, 0x5d, 0x71, 0];
  for (let i = 1; i < 64; i++) laughs.push(0x5d, 0x28, 0x68, i - 1, 0x68, i - 1, 0x65, 0x71, i);
  refuse(bytes(...laughs, 0x2e), /unfolds to more than \d+ values .* at byte \d+/);
  refuse(bytes(0x80, 2, 0x69, 0x2e), /unsupported opcode 0x69 .* at byte 2/);
  refuse(bytes(0x80, 2, 0x58, 0xff, 0xff, 0xff, 0x7f, 'ab'), /needs 2147483647 bytes but 2 are left at byte 2/);
  refuse(bytes(0x80, 2, 0x4b, 1), /ends before its STOP opcode at byte 4/);
  refuse(bytes(0x80, 2, 0x68, 9, 0x2e), /memo slot 9 was never stored/);
  refuse(bytes(0x80, 2, 0x5d, 0x71, 0, 0x68, 0, 0x61, 0x2e), /contains itself/);
  refuse(bytes(0x80, 2, ...new Array(70).fill(0x5d), ...new Array(69).fill(0x61), 0x2e), /nests deeper than 64 levels/);
  refuse(bytes(0x80, 2, 0x5d, ...new Array(70).fill([0x28, 0x5d]).flat(), 0x2e), /nests deeper than 64 levels/);
  refuse(bytes(0x80, 2, 0x4b, 1, 0x4b, 2, 0x2e), /STOP with 2 values/);
  refuse(bytes(0x80, 2, 0x7d, 0x5d, 0x4b, 1, 0x73, 0x2e), /dict key of type list/);
});

type Rand = () => number;
const int = (rand: Rand, n: number) => Math.floor(rand() * n);

function mutate(rand: Rand, base: Uint8Array): Uint8Array {
  const out = base.slice();
  switch (int(rand, 4)) {
    case 0:
      return base.slice(0, int(rand, base.length));
    case 1:
      for (let k = 1 + int(rand, 6); k > 0; k--) out[int(rand, out.length)] = int(rand, 256);
      return out;
    case 2: {
      // A length field blown up: 0xff over a run of bytes.
      const at = int(rand, out.length - 4);
      out.fill(0xff, at, at + 1 + int(rand, 4));
      return out;
    }
    default: {
      // Splice a chunk from elsewhere (opcodes out of place, marks unbalanced).
      const a = int(rand, out.length);
      const b = int(rand, out.length);
      return Uint8Array.from([...out.subarray(0, a), ...out.subarray(b, Math.min(out.length, b + int(rand, 64))), ...out.subarray(a)]);
    }
  }
}

test('fuzz: 6,000 mutated dumps and 1,000 random streams end in a value or a PickleError, never another error', () => {
  const rand = seededRng(0x9e11);
  const bases = readdirSync(fixtures)
    .filter((d) => !d.includes('.') && !d.endsWith('json'))
    .map((d) => file(d, 0));
  let refused = 0;
  const attempt = (b: Uint8Array, what: string) => {
    try {
      readPickle(b, 'fuzz');
    } catch (e) {
      if (!(e instanceof PickleError)) throw new Error(`${what}: ${(e as Error).stack}\ninput ${Buffer.from(b).toString('hex').slice(0, 400)}`);
      refused++;
    }
  };
  for (let i = 0; i < 6000; i++) attempt(mutate(rand, bases[i % bases.length]!), `mutation ${i}`);
  for (let i = 0; i < 1000; i++) {
    const b = Uint8Array.from({ length: 1 + int(rand, 64) }, () => int(rand, 256));
    if (i % 2) b[0] = 0x80;
    attempt(b, `random ${i}`);
  }
  assert.ok(refused > 5000, `only ${refused} of 7000 damaged inputs were refused`);
});

test.run();
