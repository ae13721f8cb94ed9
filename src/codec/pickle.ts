// A pickle reader for data only: the subset PyTorch Flight Recorder dumps use (DESIGN.md,
// "Post-mortem evidence"). torch's C++ pickler writes protocol 2 (dicts, lists, tuples, str,
// ints up to 8-byte LONG1, floats, bools, None, memo puts and gets); Python re-pickles them
// as protocol 4/5 (FRAME, SHORT_BINUNICODE, MEMOIZE). No GLOBAL is in either: torch pickles
// the dump with type tags off (`pickle_str`: Pickler(..., tag_aggregates=false)) and every
// list in it is a generic one (no `build_intlist`), and Python re-pickles plain dicts, lists
// and tuples. So every GLOBAL and REDUCE is refused: nothing is named, nothing runs. Files
// come from outside: every opcode is checked against this list, every length against the
// bytes left, nesting against a depth limit, and what memo gets share against a budget.

export class PickleError extends Error {
  override name = 'PickleError';
}

export type PickleValue = null | boolean | number | bigint | string | PickleValue[] | PickleTuple | PickleDict;
/** A tuple, told apart from a list (a Flight Recorder entry's process_group is one). */
export class PickleTuple {
  constructor(readonly tuple: readonly PickleValue[]) {}
}
/**
 * A dict, as the object JSON.parse would give for the same data (one reader downstream for
 * both forms): int keys read as their decimal strings, a later duplicate key wins.
 */
export interface PickleDict {
  [key: string]: PickleValue;
}

/** Containers nested deeper than this are refused (dumps nest five or six levels). */
const MAX_DEPTH = 64;
/** Memo slots beyond this are refused before any array grows to them. */
const MAX_MEMO = 1 << 24;
/**
 * Values (containers and what they hold, a shared one counted at each place it appears) per
 * byte of file, beyond a fixed allowance: memo gets let a few bytes stand for a large shared
 * container, and a tree of them could otherwise unfold to 2**64 values. A dump's shared
 * frame dicts unfold to about 2 values per byte.
 */
const VALUES_PER_BYTE = 16;
const VALUES_ALLOWANCE = 1 << 16;

/**
 * A container while it is read: its depth, how many values it unfolds to, and whether it is
 * already nested in another (sealed: a memo get may share it, never change it). Nesting seals
 * what it nests, so a container that changes is in no other one: no container can come to
 * contain itself, and a depth is final by the time it counts toward a parent's.
 */
class Box {
  depth = 1;
  size = 1;
  sealed = false;
  constructor(
    readonly kind: 'list' | 'dict' | 'tuple',
    public value: PickleValue[] | PickleDict | PickleTuple,
  ) {}
}

const MARK = Symbol('mark');
/** A list or tuple's value until its items are taken (never seen outside). */
const UNSET = Object.freeze([]) as unknown as PickleValue[];
type Item = null | boolean | number | bigint | string | Box | typeof MARK;

const utf8 = new TextDecoder('utf-8', { fatal: true });

export const isTuple = (v: unknown): v is PickleTuple => v instanceof PickleTuple;

/**
 * Decode one pickle from `bytes`. Errors are PickleErrors naming `what` (the file) and the
 * byte offset of the opcode that could not be read.
 */
export function readPickle(bytes: Uint8Array, what = 'pickle'): PickleValue {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const end = bytes.length;
  const budget = VALUES_ALLOWANCE + VALUES_PER_BYTE * end;
  // The stack with its own height: truncating an array's length is a runtime call per container.
  const stack: Item[] = [];
  let sp = 0;
  const marks: number[] = [];
  const memo: Item[] = [];
  let floor = 0; // the stack below this (the innermost MARK and under) is not for pops
  let pos = 0;
  let at = 0;
  const fail = (msg: string): never => {
    throw new PickleError(`${what}: ${msg} at byte ${at}`);
  };
  const need = (n: number) => {
    if (n > end - pos) fail(`needs ${n} bytes but ${end - pos} are left`);
  };
  const u8 = () => (need(1), bytes[pos++]!);
  const u32 = () => (need(4), (pos += 4), view.getUint32(pos - 4, true));
  const u64 = () => {
    need(8);
    pos += 8;
    const n = view.getUint32(pos - 4, true) * 2 ** 32 + view.getUint32(pos - 8, true);
    if (n > end) fail(`length ${view.getBigUint64(pos - 8, true)} exceeds the ${end}-byte file`);
    return n;
  };
  const text = (n: number): string => {
    need(n);
    const from = pos;
    pos += n;
    // Dumps are mostly short ASCII keys and names: read as latin1 (the same bytes) when they are.
    if (n <= 256) {
      let i = from;
      while (i < pos && bytes[i]! < 0x80) i++;
      if (i === pos) return latin1.toString('latin1', from, pos);
    }
    try {
      return utf8.decode(bytes.subarray(from, pos));
    } catch {
      return fail(`a string of ${n} bytes is not valid UTF-8`);
    }
  };
  const line = () => {
    const stop = bytes.indexOf(0x0a, pos);
    if (stop < 0 || stop - pos > 256) fail('a GLOBAL name without its newline');
    const s = text(stop - pos);
    pos++;
    return s;
  };
  const push = (v: Item) => {
    stack[sp++] = v;
  };
  const pop = (): Item => (sp > floor ? stack[--sp]! : fail('pops an empty stack'));
  const top = (): Item => (sp > floor ? stack[sp - 1]! : fail('reads an empty stack'));
  /** The innermost MARK's index, closed: the items above it are the caller's. */
  const closeMark = (): number => {
    const m = marks.pop();
    if (m === undefined) return fail('closes a MARK that was never opened');
    floor = marks.length ? marks[marks.length - 1]! + 1 : 0;
    return m;
  };
  /** `child` as it goes into `parent`: sealed, its depth and size counted. */
  const inner = (parent: Box, child: Item): PickleValue => {
    if (!(child instanceof Box)) {
      if (child === MARK) fail('uses a MARK as data');
      if (++parent.size > budget) fail(`unfolds to more than ${budget} values (memo gets sharing containers)`);
      return child as PickleValue;
    }
    if (child === parent) fail('a container that contains itself');
    if (child.depth >= parent.depth) {
      if (child.depth >= MAX_DEPTH) fail(`nests deeper than ${MAX_DEPTH} levels`);
      parent.depth = child.depth + 1;
    }
    parent.size += child.size;
    if (parent.size > budget) fail(`unfolds to more than ${budget} values (memo gets sharing containers)`);
    child.sealed = true;
    return child.value;
  };
  const open = (item: Item, kind: 'list' | 'dict', op: string): Box => {
    if (!(item instanceof Box) || item.kind !== kind) return fail(`${op} on something that is not a ${kind}`);
    if (item.sealed) fail(`${op} changes a container already nested in another (a dump never does)`);
    return item;
  };
  const setItem = (d: Box, k: Item, v: Item) => {
    if (typeof k !== 'string' && typeof k !== 'number' && typeof k !== 'bigint') return fail(`dict key of type ${k instanceof Box ? k.kind : k === MARK ? 'MARK' : describe(k)}`);
    const key = typeof k === 'string' ? k : String(k);
    const o = d.value as PickleDict;
    // An own property, never the prototype's setter.
    if (key === '__proto__') Object.defineProperty(o, key, { value: inner(d, v), enumerable: true, writable: true, configurable: true });
    else o[key] = inner(d, v);
  };
  /**
   * Dicts that repeat a key sequence (a dump's entries, its frames) are made as copies of the
   * first: one object of its final shape, not one grown key by key. Keyed by the first key.
   */
  const templates = new Map<string, { keys: string[]; dict: PickleDict }>();
  /** The stack's items from `from` up as key, value pairs into the dict `d`; the caller drops them. */
  const setItems = (d: Box, from: number, op: string) => {
    const n = sp - from;
    if (n % 2) fail(`${op} with an odd number of items`);
    const first = stack[from];
    // Only a fresh dict (nothing counted in it yet) is replaced by a copy.
    const fresh = d.size === 1 && n >= 8 && typeof first === 'string';
    const t = fresh ? templates.get(first) : undefined;
    if (t && t.keys.length * 2 === n && t.keys.every((k, i) => stack[from + 2 * i] === k)) {
      const o: PickleDict = { ...t.dict };
      for (let i = 0; i < t.keys.length; i++) o[t.keys[i]!] = inner(d, stack[from + 2 * i + 1]!);
      d.value = o;
      return;
    }
    for (let i = from; i < sp; i += 2) setItem(d, stack[i]!, stack[i + 1]!);
    if (fresh && !templates.has(first)) {
      const keys = Object.keys(d.value);
      if (keys.length * 2 === n && !keys.includes('__proto__') && keys.every((k, i) => stack[from + 2 * i] === k)) templates.set(first, { keys, dict: { ...(d.value as PickleDict) } });
    }
  };
  /**
   * The stack's items from `from` up, which leave it, as `box`'s items: an array of exactly
   * their number (one grown by push keeps room for 16, and a dump holds millions of short lists).
   */
  const take = (box: Box, from: number): PickleValue[] => {
    const items = stack.slice(from, sp) as PickleValue[];
    for (let i = 0; i < items.length; i++) items[i] = inner(box, items[i] as Item);
    sp = from;
    return items;
  };
  const tuple = (from: number): Box => {
    const t = new Box('tuple', UNSET);
    t.value = new PickleTuple(take(t, from));
    return t;
  };

  for (;;) {
    at = pos;
    if (pos >= end) fail('ends before its STOP opcode');
    const op = bytes[pos++]!;
    switch (op) {
      case 0x80: // PROTO
        if (u8() > 5) fail('protocol above 5');
        break;
      case 0x95: // FRAME: a length hint, checked and otherwise ignored
        if (u64() > end - pos) fail('frame runs past the end');
        break;
      case 0x2e: {
        // STOP
        if (marks.length) fail('STOP inside an open MARK');
        if (sp !== 1) fail(`STOP with ${sp} values on the stack`);
        const v = stack[0]!;
        return v instanceof Box ? v.value : (v as PickleValue);
      }
      case 0x28: // MARK
        if (marks.length >= MAX_DEPTH) fail(`nests deeper than ${MAX_DEPTH} levels`);
        marks.push(sp);
        push(MARK);
        floor = sp;
        break;
      case 0x7d: // EMPTY_DICT
        push(new Box('dict', {}));
        break;
      case 0x5d: // EMPTY_LIST
        push(new Box('list', []));
        break;
      case 0x29: // EMPTY_TUPLE
        push(new Box('tuple', new PickleTuple([])));
        break;
      case 0x74: {
        // TUPLE
        const m = closeMark();
        const t = tuple(m + 1);
        stack[m] = t; // in the MARK's place
        break;
      }
      case 0x85: // TUPLE1
      case 0x86: // TUPLE2
      case 0x87: {
        // TUPLE3
        const from = sp - (op - 0x84);
        if (from < floor) fail('pops an empty stack');
        push(tuple(from));
        break;
      }
      case 0x6c: {
        // LIST
        const m = closeMark();
        const l = new Box('list', UNSET);
        l.value = take(l, m + 1);
        stack[m] = l;
        break;
      }
      case 0x64: {
        // DICT
        const m = closeMark();
        const d = new Box('dict', {});
        setItems(d, m + 1, 'DICT');
        stack[m] = d;
        sp = m + 1;
        break;
      }
      case 0x61: {
        // APPEND
        const v = pop();
        const l = open(top(), 'list', 'APPEND');
        (l.value as PickleValue[]).push(inner(l, v));
        break;
      }
      case 0x65: {
        // APPENDS
        const m = closeMark();
        const l = open(m > floor ? stack[m - 1]! : fail('reads an empty stack'), 'list', 'APPENDS');
        if (l.size === 1) l.value = take(l, m + 1); // a fresh list (both picklers' way): its items at once
        else for (const v of take(l, m + 1)) (l.value as PickleValue[]).push(v);
        sp = m;
        break;
      }
      case 0x73: {
        // SETITEM
        const v = pop();
        const k = pop();
        setItem(open(top(), 'dict', 'SETITEM'), k, v);
        break;
      }
      case 0x75: {
        // SETITEMS
        const m = closeMark();
        const d = open(m > floor ? stack[m - 1]! : fail('reads an empty stack'), 'dict', 'SETITEMS');
        setItems(d, m + 1, 'SETITEMS');
        sp = m;
        break;
      }
      case 0x58: // BINUNICODE
        push(text(u32()));
        break;
      case 0x8c: // SHORT_BINUNICODE
        push(text(u8()));
        break;
      case 0x8d: // BINUNICODE8
        push(text(u64()));
        break;
      case 0x4a: // BININT
        need(4);
        push(view.getInt32(pos, true));
        pos += 4;
        break;
      case 0x4b: // BININT1
        push(u8());
        break;
      case 0x4d: // BININT2
        need(2);
        push(bytes[pos]! | (bytes[pos + 1]! << 8));
        pos += 2;
        break;
      case 0x8a: {
        // LONG1: n-byte two's-complement little-endian; a bigint only where a double is not exact
        const n = u8();
        need(n);
        if (n === 8) {
          // torch writes every int beyond 32 bits this way: time stamps past 2**53 stay exact.
          const v = view.getInt32(pos + 4, true) * 2 ** 32 + view.getUint32(pos, true);
          push(Number.isSafeInteger(v) ? v : view.getBigInt64(pos, true));
        } else if (n <= 6) {
          let v = 0;
          for (let i = n - 1; i >= 0; i--) v = v * 256 + bytes[pos + i]!;
          push(n > 0 && bytes[pos + n - 1]! & 0x80 ? v - 2 ** (8 * n) : v);
        } else {
          let v = 0n;
          for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(bytes[pos + i]!);
          if (bytes[pos + n - 1]! & 0x80) v -= 1n << BigInt(8 * n);
          push(v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v);
        }
        pos += n;
        break;
      }
      case 0x47: // BINFLOAT: big-endian double
        need(8);
        push(view.getFloat64(pos, false));
        pos += 8;
        break;
      case 0x88: // NEWTRUE
        push(true);
        break;
      case 0x89: // NEWFALSE
        push(false);
        break;
      case 0x4e: // NONE
        push(null);
        break;
      case 0x71: // BINPUT
      case 0x72: // LONG_BINPUT
      case 0x94: {
        // MEMOIZE
        const slot = op === 0x71 ? u8() : op === 0x72 ? u32() : memo.length;
        if (slot >= MAX_MEMO) fail(`memo slot ${slot} exceeds ${MAX_MEMO}`);
        memo[slot] = top();
        break;
      }
      case 0x68: // BINGET
      case 0x6a: {
        // LONG_BINGET
        const slot = op === 0x68 ? u8() : u32();
        const v = memo[slot];
        if (v === undefined) fail(`memo slot ${slot} was never stored`);
        push(v!);
        break;
      }
      case 0x63: {
        // GLOBAL: named for the error, never looked up
        const name = `${line()}.${line()}`;
        fail(`refuses GLOBAL ${name} (a Flight Recorder dump holds data only; no code is run)`);
        break;
      }
      default:
        fail(`unsupported opcode 0x${op.toString(16).padStart(2, '0')} (a Flight Recorder dump uses plain data only)`);
    }
  }
}

const describe = (v: null | boolean | number | string): string => (v === null ? 'None' : typeof v);
