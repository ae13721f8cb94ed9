// A pickle reader for data only: the subset PyTorch Flight Recorder dumps use. torch's C++
// pickler writes protocol 2 (dicts, lists, tuples, str, ints up to 8-byte LONG1, floats,
// bools, None, memo puts and gets); Python re-pickles them as protocol 4/5 (FRAME,
// SHORT_BINUNICODE, MEMOIZE). Files come from outside: every opcode is checked against this
// list, every length against the bytes left, nesting against a depth limit. Nothing names a
// callable except torch's own list-type tags (`torch.jit._pickle.build_intlist` and kin),
// which are identities on their one argument and are read as such: no code runs.

export class PickleError extends Error {
  override name = 'PickleError';
}

export type PickleValue = null | boolean | number | bigint | string | PickleValue[] | PickleTuple | PickleDict;
/** A tuple, told apart from a list (Flight Recorder frames and p2p pairs use them). */
export interface PickleTuple {
  readonly tuple: readonly PickleValue[];
}
/** Keys of a dict are strings or ints in these files; Map keeps ints as ints. */
export type PickleDict = Map<string | number | bigint, PickleValue>;

/** Containers nested deeper than this are refused (dumps nest five or six levels). */
const MAX_DEPTH = 64;
/** Memo slots beyond this are refused before any array grows to them. */
const MAX_MEMO = 1 << 24;
const MIN_SAFE = BigInt(Number.MIN_SAFE_INTEGER);
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const TORCH_LIST_TAGS = new Set(['build_intlist', 'build_doublelist', 'build_boollist', 'build_tensorlist', 'restore_type_tag']);

const MARK = Symbol('mark');
/** A GLOBAL that names one of torch's list-type tags: REDUCE applies it as the identity. */
interface ListTag {
  readonly listTag: string;
}
type StackItem = PickleValue | typeof MARK | ListTag;

const utf8 = new TextDecoder('utf-8', { fatal: true });

const isTag = (v: StackItem): v is ListTag => typeof v === 'object' && v !== null && 'listTag' in v;
export const isTuple = (v: unknown): v is PickleTuple => typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Map) && 'tuple' in v;

/**
 * Decode one pickle from `bytes`. Errors are PickleErrors naming `what` (the file) and the
 * byte offset of the opcode that could not be read.
 */
export function readPickle(bytes: Uint8Array, what = 'pickle'): PickleValue {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const stack: StackItem[] = [];
  const marks: number[] = [];
  const memo: StackItem[] = [];
  let pos = 0;
  let at = 0;
  const fail = (msg: string): never => {
    throw new PickleError(`${what}: ${msg} at byte ${at}`);
  };
  const need = (n: number) => {
    if (n > bytes.length - pos) fail(`needs ${n} bytes but ${bytes.length - pos} are left`);
  };
  const u8 = () => (need(1), bytes[pos++]!);
  const u16 = () => (need(2), (pos += 2), view.getUint16(pos - 2, true));
  const u32 = () => (need(4), (pos += 4), view.getUint32(pos - 4, true));
  const u64 = () => {
    need(8);
    pos += 8;
    const n = view.getBigUint64(pos - 8, true);
    if (n > BigInt(bytes.length)) fail(`length ${n} exceeds the ${bytes.length}-byte file`);
    return Number(n);
  };
  const text = (n: number) => {
    need(n);
    pos += n;
    // Dumps are mostly short ASCII keys and names: read as latin1 (the same bytes) without a TextDecoder call each.
    if (n <= 256) {
      let ascii = true;
      for (let i = pos - n; i < pos && ascii; i++) ascii = bytes[i]! < 0x80;
      if (ascii) return latin1.toString('latin1', pos - n, pos);
    }
    try {
      return utf8.decode(bytes.subarray(pos - n, pos));
    } catch {
      return fail(`a string of ${n} bytes is not valid UTF-8`);
    }
  };
  const line = () => {
    const end = bytes.indexOf(0x0a, pos);
    if (end < 0 || end - pos > 256) fail('a GLOBAL name without its newline');
    const s = text(end - pos);
    pos++;
    return s;
  };
  /** The stack above the innermost MARK is what pops may take. */
  const floor = () => (marks.length ? marks[marks.length - 1]! + 1 : 0);
  const pop = (): StackItem => (stack.length > floor() ? stack.pop()! : fail('pops an empty stack'));
  const value = (v: StackItem): PickleValue => (v === MARK || isTag(v) ? fail('uses a GLOBAL as data') : v);
  const top = (): StackItem => (stack.length > floor() ? stack[stack.length - 1]! : fail('reads an empty stack'));
  const popMark = (): PickleValue[] => {
    const m = marks.pop();
    if (m === undefined) fail('closes a MARK that was never opened');
    const items = stack.splice(m! + 1);
    stack.pop(); // the MARK itself
    for (const v of items) value(v);
    return items as PickleValue[];
  };
  const push = (v: StackItem) => stack.push(v);
  const put = (slot: number) => {
    if (slot >= MAX_MEMO) fail(`memo slot ${slot} exceeds ${MAX_MEMO}`);
    memo[slot] = top();
  };
  const get = (slot: number) => {
    if (memo[slot] === undefined) fail(`memo slot ${slot} was never stored`);
    push(memo[slot]!);
  };
  /**
   * Nesting is checked as it is built: a container's depth is final once it is put inside
   * another (then it is sealed: a memo get may share it, never change it), so depths add up
   * at each insertion and no container can come to contain itself.
   */
  /** Depth of each container holding containers; negative once sealed (nested in another). */
  const depth = new Map<object, number>();
  const nest = (parent: object, child: PickleValue) => {
    if (child === null || typeof child !== 'object') return;
    if (child === parent) fail('a container that contains itself');
    const c = depth.get(child) ?? 1;
    const d = Math.abs(c) + 1;
    if (d > MAX_DEPTH) fail(`nests deeper than ${MAX_DEPTH} levels`);
    const p = depth.get(parent) ?? 1;
    if (d > p) depth.set(parent, d);
    if (c > 0 && !isTuple(child)) depth.set(child, -c);
  };
  const target = (c: StackItem, what: string): object => {
    if ((depth.get(c as object) ?? 1) < 0) fail(`${what} changes a container already nested in another (a dump never does)`);
    return c as object;
  };
  const setItems = (dict: StackItem, items: PickleValue[]) => {
    if (!(dict instanceof Map)) fail('SETITEMS on something that is not a dict');
    if (items.length % 2) fail('SETITEMS with an odd number of items');
    const d = target(dict, 'SETITEMS') as PickleDict;
    for (let i = 0; i < items.length; i += 2) {
      const k = items[i]!;
      if (typeof k !== 'string' && typeof k !== 'number' && typeof k !== 'bigint') fail(`dict key of type ${describe(k)}`);
      nest(d, items[i + 1]!);
      d.set(k as string | number | bigint, items[i + 1]!);
    }
  };
  const appendTo = (list: StackItem, items: PickleValue[]) => {
    if (!Array.isArray(list)) fail('APPENDS on something that is not a list');
    const l = target(list, 'APPENDS') as PickleValue[];
    for (const item of items) {
      nest(l, item);
      l.push(item);
    }
  };
  const tuple = (items: PickleValue[]): PickleTuple => {
    const t = { tuple: items };
    for (const item of items) nest(t, item);
    return t;
  };

  for (;;) {
    at = pos;
    if (pos >= bytes.length) fail('ends before its STOP opcode');
    const op = bytes[pos++]!;
    switch (op) {
      case 0x80: // PROTO
        if (u8() > 5) fail('protocol above 5');
        break;
      case 0x95: // FRAME: a length hint, checked and otherwise ignored
        if (u64() > bytes.length - pos) fail('frame runs past the end');
        break;
      case 0x2e: {
        // STOP
        if (marks.length) fail('STOP inside an open MARK');
        if (stack.length !== 1) fail(`STOP with ${stack.length} values on the stack`);
        return value(stack[0]!);
      }
      case 0x28: // MARK
        if (marks.length >= MAX_DEPTH) fail(`nests deeper than ${MAX_DEPTH} levels`);
        marks.push(stack.length);
        stack.push(MARK);
        break;
      case 0x7d: // EMPTY_DICT
        push(new Map());
        break;
      case 0x5d: // EMPTY_LIST
        push([]);
        break;
      case 0x29: // EMPTY_TUPLE
        push(tuple([]));
        break;
      case 0x74: // TUPLE
        push(tuple(popMark()));
        break;
      case 0x85: // TUPLE1
      case 0x86: // TUPLE2
      case 0x87: {
        // TUPLE3
        const n = op - 0x84;
        const items: PickleValue[] = [];
        for (let i = 0; i < n; i++) items.unshift(value(pop()));
        push(tuple(items));
        break;
      }
      case 0x6c: {
        // LIST
        const l: PickleValue[] = [];
        appendTo(l, popMark());
        push(l);
        break;
      }
      case 0x64: {
        // DICT
        const d: PickleDict = new Map();
        setItems(d, popMark());
        push(d);
        break;
      }
      case 0x61: {
        // APPEND
        const v = value(pop());
        const list = top();
        if (!Array.isArray(list)) fail('APPEND on something that is not a list');
        nest(target(list, 'APPEND'), v);
        (list as PickleValue[]).push(v);
        break;
      }
      case 0x65: {
        // APPENDS
        const items = popMark();
        appendTo(top(), items);
        break;
      }
      case 0x73: {
        // SETITEM
        const v = value(pop());
        const k = value(pop());
        setItems(top(), [k, v]);
        break;
      }
      case 0x75: {
        // SETITEMS
        const items = popMark();
        setItems(top(), items);
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
        push(u16());
        break;
      case 0x8a: {
        // LONG1: n-byte two's-complement little-endian
        const n = u8();
        need(n);
        const negative = n > 0 && (bytes[pos + n - 1]! & 0x80) !== 0;
        if (n <= 6) {
          // Up to 48 bits: exact in a double, no BigInt made.
          let v = 0;
          for (let i = n - 1; i >= 0; i--) v = v * 256 + bytes[pos + i]!;
          push(negative ? v - 2 ** (8 * n) : v);
        } else {
          let v = 0n;
          for (let i = n - 1; i >= 0; i--) v = (v << 8n) | BigInt(bytes[pos + i]!);
          if (negative) v -= 1n << BigInt(8 * n);
          push(v >= MIN_SAFE && v <= MAX_SAFE ? Number(v) : v);
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
        put(u8());
        break;
      case 0x72: // LONG_BINPUT
        put(u32());
        break;
      case 0x94: // MEMOIZE
        put(memo.length);
        break;
      case 0x68: // BINGET
        get(u8());
        break;
      case 0x6a: // LONG_BINGET
        get(u32());
        break;
      case 0x63: {
        // GLOBAL: only torch's list-type tags, which REDUCE applies as identities
        const module = line();
        const name = line();
        if (module !== 'torch.jit._pickle' || !TORCH_LIST_TAGS.has(name)) fail(`refuses GLOBAL ${module}.${name} (a dump holds data only; no code is run)`);
        push({ listTag: name });
        break;
      }
      case 0x52: {
        // REDUCE
        const args = value(pop());
        const fn = pop();
        if (!isTag(fn) || !isTuple(args) || args.tuple.length < 1) fail('REDUCE of something other than a torch list-type tag');
        push((args as PickleTuple).tuple[0]!);
        break;
      }
      default:
        fail(`unsupported opcode 0x${op.toString(16).padStart(2, '0')} (a Flight Recorder dump uses plain data only)`);
    }
  }
}

function describe(v: PickleValue): string {
  if (v === null) return 'None';
  if (Array.isArray(v)) return 'list';
  if (v instanceof Map) return 'dict';
  if (isTuple(v)) return 'tuple';
  return typeof v;
}
