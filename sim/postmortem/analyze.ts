// Flight Recorder dumps into the simulator's collective model: process groups told apart by
// name and member set, ranks aligned on what every ring buffer still holds, each rank's
// entries turned into the calls NCCL pairs by position (coalesced runs as one call, p2p as
// send/recv pairs), EP-shaped groups mapped onto the rank machine's positions, and all of it
// replayed through the CollectiveTracker a simulation uses. The checks PyTorch's own
// analyzer makes (op, sizes by the per-op rules, dtypes, state, all-to-all totals) become
// tracker findings; the tracker adds missing collectives and cross-group wait-for cycles.
import { CollectiveTracker, describe, type Finding, type LedgerEntry } from '../../machines/ledger.js';
import type { CommunicatorSpec } from '../../machines/mesh.js';
import { hangSummaries, rankRanges, rankWord, type Diagnosis, type RankReport } from '../../machines/diagnosis.js';
import { withDeadRanks } from '../../machines/postmortem.js';
import { makeVariant } from '../../machines/variants.js';
import type { IssuedCollective } from '../../machines/snapshot.js';
import type { CollectiveOp } from '../../src/ep/types.js';
import { DEFAULT_SCENARIO, type Scenario } from '../../machines/scenario.js';
import type { ReportInput } from '../../machines/record.js';
import type { TraceEvent } from '../../machines/spans.js';
import { EvidenceError, type FrDump, type FrEntry, type FrState } from './flightRecorder.js';

interface Group {
  readonly spec: CommunicatorSpec;
  readonly name: string;
  /** Collective seq ids below this are not compared (a ring buffer dropped them, or they completed before a rank died). */
  base: number;
}

/** One collective call of one rank: an entry, or a coalesced run of entries sharing a seq. */
interface Call {
  readonly rank: number;
  readonly comm: string;
  readonly seq: number;
  readonly entries: readonly FrEntry[];
  readonly kind: string;
  readonly state: FrState;
  issued: IssuedCollective;
  dtype: string;
}

/** What the dumps say, in the tracker's terms: the verdict, the ledger, the report input and the dump's own seq of the verdict. */
export interface PostMortem {
  readonly diagnosis: Diagnosis;
  readonly ledger: readonly LedgerEntry[];
  /** At most a window of each group's positions, renumbered, past REPORT_LIMIT calls. */
  readonly report: ReportInput;
  /** collective_seq_id of the verdict's position (null when none or not a collective). */
  readonly seq: number | null;
}

/** torch's op names (all_gather_into_tensor, _reduce_scatter_base, …) folded to the collective they are. */
export function opKind(op: string): string {
  let k = opKinds.get(op);
  if (k === undefined) {
    if (opKinds.size > 10_000) opKinds.clear(); // a bound for a long-lived process
    opKinds.set(op, (k = foldOp(op)));
  }
  return k;
}
/** A dump names a handful of ops a million times: each is folded once. */
const opKinds = new Map<string, string>();

function foldOp(op: string): string {
  const o = op.replace(/^_+/, '');
  if (/^all_?reduce/.test(o)) return 'all_reduce';
  if (/^all_?gather/.test(o)) return 'all_gather';
  if (/^reduce_scatter/.test(o)) return 'reduce_scatter';
  if (/^(all_to_all|alltoall)/.test(o)) return 'all_to_all';
  if (/^broadcast/.test(o)) return 'broadcast';
  if (/^reduce(_oop)?$/.test(o)) return 'reduce';
  return o;
}

function numel(shapes: readonly (readonly number[])[]): number {
  let n = 0;
  for (const s of shapes) {
    let m = 1;
    for (const d of s) m *= d;
    n += m;
  }
  return n;
}
const shapeText = (shapes: readonly (readonly number[])[]) => shapes.map((s) => `[${s.join(', ')}]`).join(' ');

/** The analyzer's per-op size rule on one rank's call: what is wrong, or null. */
export function sizeRuleProblem(kind: string, entries: readonly FrEntry[], groupSize: number): string | null {
  const ins = entries.length === 1 ? entries[0]!.inputSizes : entries.flatMap((e) => e.inputSizes);
  const outs = entries.length === 1 ? entries[0]!.outputSizes : entries.flatMap((e) => e.outputSizes);
  if (ins.length === 0 && outs.length === 0) return null;
  if (kind === 'all_reduce') return sameShapes(ins, outs) ? null : `its all_reduce's input ${shapeText(ins)} differs from its output ${shapeText(outs)}`;
  const inN = numel(ins);
  const outN = numel(outs);
  if (kind === 'all_gather' && outN !== inN * groupSize) return `its all_gather's output has ${outN} elements, not input ${inN} × group size ${groupSize}`;
  if (kind === 'reduce_scatter' && inN !== outN * groupSize) return `its reduce_scatter's input has ${inN} elements, not output ${outN} × group size ${groupSize}`;
  return null;
}

/** The ops with a size rule between input and output. */
const SIZED = new Set(['all_reduce', 'all_gather', 'reduce_scatter']);

const STATE_ORDER: Record<FrState, number> = { scheduled: 0, started: 1, completed: 2 };
const STATE_BIT: Record<FrState, number> = { scheduled: 1, started: 2, completed: 4 };

/** The calls at one position of a group, and which states they are in (STATE_BIT). */
interface Position {
  readonly calls: Call[];
  states: number;
}

/** Reads a set of dumps (one per rank) into the verdict, diagnosis and report input. */
export function analyzeDumps(dumps: readonly FrDump[]): PostMortem {
  if (dumps.length === 0) throw new EvidenceError('no Flight Recorder dumps to read');
  const versions = [...new Set(dumps.map((d) => d.version))];
  if (versions.length > 1) throw new EvidenceError(`the dumps come from different Flight Recorder versions (${dumps.map((d) => `${d.file}: ${d.version}`).join(', ')}); they must come from one job`);
  const byRank = new Map<number, FrDump>();
  for (const d of dumps) {
    if (byRank.has(d.rank)) throw new EvidenceError(`${d.file} and ${byRank.get(d.rank)!.file} are both dumps of rank ${d.rank}`);
    byRank.set(d.rank, d);
  }
  const groups = groupsOf(dumps);
  const perDump = new Map(dumps.map((d) => [d, new Map([...d.groups].map(([name, g]) => [name, groups.get(groupKey(g))!]))]));
  const groupOf = (d: FrDump, pgName: string) => perDump.get(d)!.get(pgName)!;
  const world = [...new Set([...byRank.keys(), ...[...groups.values()].flatMap((g) => g.spec.members)])].sort((a, b) => a - b);
  const dead = world.filter((r) => !byRank.has(r));
  align(groups, byRank, groupOf, dead);

  // Each rank's calls, in record order.
  const calls = new Map<number, Call[]>();
  const p2pSpecs = new Map<string, CommunicatorSpec>();
  for (const d of dumps) {
    const mine: Call[] = [];
    for (const e of d.entries) {
      const g = groupOf(d, e.pgName);
      if (e.p2p) {
        const [from, to] = [g.spec.members[e.p2p.from], g.spec.members[e.p2p.to]];
        if (from === undefined || to === undefined || (from !== d.rank && to !== d.rank)) throw new EvidenceError(`${d.file}: ${e.profilingName} names group ranks outside ${g.spec.id} or not rank ${d.rank}`);
        const id = `${g.spec.id} ${from}→${to}`;
        p2pSpecs.set(id, { id, kind: 'group', members: [from, to] });
        mine.push(call(d.rank, id, e.p2pSeq, [e], 'p2p'));
        continue;
      }
      const last = mine[mine.length - 1];
      // A coalesced run: entries of one group sharing a seq id; torch's `coalesced` entry closes it.
      if (last && last.comm === g.spec.id && last.seq === e.seq && last.kind !== 'p2p') {
        mine[mine.length - 1] = call(d.rank, g.spec.id, e.seq, [...last.entries, e], 'coalesced');
      } else mine.push(call(d.rank, g.spec.id, e.seq, [e], opKind(e.op)));
    }
    calls.set(d.rank, mine);
  }
  const specs = [...[...groups.values()].map((g) => g.spec), ...p2pSpecs.values()];
  // The EP shapes are read on everything a rank holds; what lies before the alignment is then left out.
  const skips = mapEpGroups(groups, calls);
  const baseOf = new Map([...groups.values()].map((g) => [g.spec.id, g.base]));
  for (const [r, cs] of calls) calls.set(r, cs.filter((c) => c.kind === 'p2p' || c.seq >= baseOf.get(c.comm)!));

  const tracker = new CollectiveTracker({ ep: 1, dp: 1 }, true, specs);
  /** Per communicator, per position: the calls issued there so far. */
  const slot = new Map<string, Position[]>(specs.map((x) => [x.id, []]));
  const specOf = new Map(specs.map((x) => [x.id, x]));
  // Replay to quiescence: the ranks that can move take turns, one call each, first come first
  // served; a rank leaves the queue when a call blocks it and rejoins when that position
  // completes. A position the analyzer's checks find wrong never completes (its ranks stay
  // blocked, as in NCCL).
  const order = [...calls.keys()].sort((a, b) => a - b);
  const indexOf = new Map(order.map((r, i) => [r, i]));
  const callsOf = order.map((r) => calls.get(r)!);
  const next = new Int32Array(order.length);
  // A ring of rank indices, each at most once in it (queued).
  const queue = new Int32Array(order.length);
  const queued = new Uint8Array(order.length);
  let head = 0;
  let size = 0;
  const enqueue = (i: number) => {
    if (queued[i]) return;
    queued[i] = 1;
    queue[(head + size++) % queue.length] = i;
  };
  let current: Call;
  const judge = (entry: LedgerEntry) => {
    const at = (slot.get(entry.communicator)![entry.position] ??= { calls: [], states: 0 });
    const before = at.states;
    at.calls.push(current);
    at.states |= STATE_BIT[current.state];
    return frCheck(current, at, before, specOf.get(current.comm)!, entry.position);
  };
  order.forEach((_, i) => enqueue(i));
  while (size > 0) {
    const i = queue[head]!;
    head = (head + 1) % queue.length;
    size--;
    queued[i] = 0;
    if (next[i]! >= callsOf[i]!.length || tracker.blockedOn(order[i]!)) continue;
    current = callsOf[i]![next[i]!++]!;
    const { completed } = tracker.issue(order[i]!, current.issued, current.dtype, current.comm, judge);
    for (const e of completed ?? []) enqueue(indexOf.get(e.rank)!);
    if (!tracker.blockedOn(order[i]!)) enqueue(i);
  }
  // Nothing can move: a rank whose evidence ends, not blocked, has finished (dead ones never do).
  for (const r of order) if (!tracker.blockedOn(r)) tracker.finish(r);
  // Every hung group, in the tracker's canonical order (what `sim --json` lists): the first is the verdict.
  const hangs = tracker.hangs();

  const ranks = rankReports(world, calls);
  const ledger = tracker.entries;
  const callOf = (e: LedgerEntry) => slot.get(e.communicator)![e.position]!.calls.find((c) => c.rank === e.rank)!;
  const found: Diagnosis = hangs.length
    ? { ...explain(hangs[0]!, tracker, callOf, ranks, skips), hangs: hangSummaries(hangs) }
    : world.every((r) => tracker.isFinished(r)) && tracker.openPositions().length === 0
      ? { verdict: 'ok', communicator: null, position: null, culprits: [], ranks, cause: `every rank's collectives matched; ${ledger.length} collective calls from ${dumps.length} dumps` }
      : { verdict: 'timeout', communicator: null, position: null, culprits: [], ranks, cause: 'the dumps end without a proof of a hang: collectives are in flight but no rank is shown to be missing or waiting in a cycle' };
  const diagnosis = withDeadRanks(found, dead, ledger, specs, 'Flight Recorder dump');

  // The dumps' own number for the verdict's position: the seq id its calls carry there.
  const there = slot.get(diagnosis.communicator ?? '')?.[diagnosis.position ?? -1]?.calls[0];
  const seq = there ? there.seq : null;
  return { diagnosis, ledger, report: reportInput(dumps, world, specs, ledger, diagnosis, calls, groups), seq };
}

const groupKey = (g: { name: string; ranks: readonly number[] }) => `${g.name}|${g.ranks.join(',')}`;

/** Groups by name and member set; ids read as their description, made unique by members where two share one. */
function groupsOf(dumps: readonly FrDump[]): Map<string, Group> {
  const found = new Map<string, { name: string; desc: string; ranks: readonly number[] }>();
  for (const d of dumps) for (const g of d.groups.values()) if (!found.has(groupKey(g))) found.set(groupKey(g), g);
  const label = (g: { name: string; desc: string }) => (g.desc && g.desc !== 'undefined' ? g.desc : `pg ${g.name}`);
  const counts = new Map<string, number>();
  for (const g of found.values()) counts.set(label(g), (counts.get(label(g)) ?? 0) + 1);
  const out = new Map<string, Group>();
  const low = (ranks: readonly number[]) => ranks.reduce((m, r) => Math.min(m, r), Infinity);
  const sorted = [...found.entries()].sort(([, a], [, b]) => low(a.ranks) - low(b.ranks) || Number(a.name) - Number(b.name) || a.name.localeCompare(b.name));
  for (const [key, g] of sorted) {
    const id = counts.get(label(g))! > 1 ? `${label(g)} [${g.ranks.join(', ')}]` : label(g);
    out.set(key, { spec: { id, kind: 'group', members: g.ranks }, name: g.name, base: 1 });
  }
  return out;
}

/**
 * Where each group's comparison starts: the oldest seq every member's ring buffer still
 * holds, and with a member that left no dump, after what its live peers saw complete
 * (it took part in those; the rest is where they wait for it).
 */
function align(groups: Map<string, Group>, byRank: Map<number, FrDump>, groupOf: (d: FrDump, pg: string) => Group, dead: readonly number[]): void {
  for (const g of groups.values()) {
    let base = 1;
    let completed = 0;
    for (const r of g.spec.members) {
      const d = byRank.get(r);
      if (!d) continue;
      const seqs = d.entries.filter((e) => !e.p2p && groupOf(d, e.pgName) === g);
      if (d.truncated && seqs.length) base = Math.max(base, seqs[0]!.seq);
      for (const e of seqs) if (e.state === 'completed') completed = Math.max(completed, e.seq);
    }
    if (g.spec.members.some((r) => dead.includes(r))) base = Math.max(base, completed + 1);
    g.base = base;
  }
}

function call(rank: number, comm: string, seq: number, entries: FrEntry[], kind: string): Call {
  const single = entries.length === 1 && entries[0]!.op !== 'coalesced';
  const members = single ? entries : entries.filter((e) => e.op !== 'coalesced');
  const used = members.length ? members : entries;
  const kinds = single ? [kind] : [...new Set(used.map((e) => opKind(e.op)))];
  const k = !single && (kind === 'coalesced' || entries.some((e) => e.op === 'coalesced')) ? (kinds.length === 1 ? `${kinds[0]}_coalesced` : 'coalesced') : kind;
  const state = single ? entries[0]!.state : entries.reduce<FrState>((s, e) => (STATE_ORDER[e.state] < STATE_ORDER[s] ? e.state : s), 'completed');
  const dtypes = (f: 'inputDtypes' | 'outputDtypes') => (single && used[0]![f].length <= 1 ? (used[0]![f][0] ?? '') : [...new Set(used.flatMap((e) => e[f]))].join(','));
  const dtype = dtypes('inputDtypes') === dtypes('outputDtypes') || !dtypes('outputDtypes') ? dtypes('inputDtypes') : `${dtypes('inputDtypes')}→${dtypes('outputDtypes')}`;
  // NCCL pairs counts, not shapes: the tracker compares elements; all-to-alls by totals (frCheck).
  const size = k === 'all_to_all' ? null : numel(single ? used[0]!.inputSizes : used.flatMap((e) => e.inputSizes));
  return { rank, comm, seq, entries: used, kind: k, state, dtype, issued: torchIssued(k, size) };
}

/** One shared object per (op, size), as epIssued. */
const torchIssuedCache = new Map<string, Map<number | null, IssuedCollective>>();
function torchIssued(kind: string, size: number | null): IssuedCollective {
  let bySize = torchIssuedCache.get(kind);
  if (!bySize) torchIssuedCache.set(kind, (bySize = new Map()));
  let i = bySize.get(size);
  if (!i) {
    if (bySize.size > 100_000) bySize.clear(); // a bound for a long-lived process; only sharing is lost
    bySize.set(size, (i = { ...ISSUED_BASE, op: `torch.${kind === 'p2p' ? 'send/recv' : kind}`, phase: 'forward', layer: 0, size, statePath: '' }));
  }
  return i;
}

/** A skipped collective a rank's own shapes prove: it received no rows in that layer. */
interface Skip {
  readonly rank: number;
  readonly layer: number;
  readonly dispatchOut: readonly number[];
}

/**
 * Groups whose all-to-alls all have the EP layer's shape get the rank machine's
 * ops: per layer fwd.counts ([ep] Long), fwd.dispatch [S, D]→[R, D], fwd.expert_ids
 * [S, 1]→[R, 1], fwd.combine [R, D]→[S, D]; then per layer in reverse bwd.combine
 * [S, D]→[R, D] and bwd.dispatch [R, D]→[S, D]. A bwd.dispatch the shapes show was skipped
 * (the rank received no rows, R = 0, and its next call is the next expected one) is noted.
 */
function mapEpGroups(groups: Map<string, Group>, calls: Map<number, Call[]>): Skip[] {
  const skips: Skip[] = [];
  for (const g of groups.values()) {
    const n = g.spec.members.length;
    // Other collectives on the group (a metric all-reduce, a barrier) stay torch's and do not break the reading.
    const per = g.spec.members.map((r) => (calls.get(r) ?? []).filter((c) => c.comm === g.spec.id && c.kind === 'all_to_all' && c.entries.length === 1));
    if (!per.some((cs) => cs.length)) continue;
    const mapped = per.map((cs) => mapEp(cs, n));
    if (mapped.some((m) => m === null)) continue;
    per.forEach((cs, i) => {
      const m = mapped[i]!;
      cs.forEach((c, k) => {
        const x = m.ops[k];
        if (x) c.issued = epIssued(x.op, x.layer);
      });
      for (const s of m.skips) skips.push({ rank: g.spec.members[i]!, ...s });
    });
  }
  return skips;
}

/** What every call from a dump shares: no per-peer splits (totals are checked by frCheck), no guards; `comm` is unused (calls name their group). */
const ISSUED_BASE = { comm: 'ep', issuer: 'layer', unit: null, microBatch: 0, sendSplits: null, recvSplits: null, size: null, why: [] } as const;

/** One shared object per (op, layer): a million calls need a dozen of them. */
const epIssuedCache = new Map<EpOp, IssuedCollective[]>();
function epIssued(op: EpOp, layer: number): IssuedCollective {
  let byLayer = epIssuedCache.get(op);
  if (!byLayer) epIssuedCache.set(op, (byLayer = []));
  return (byLayer[layer] ??= { ...ISSUED_BASE, op, phase: op.startsWith('bwd') ? 'backward' : 'forward', layer, statePath: STATE_PATH[op]! });
}

const STATE_PATH: Record<string, string> = {
  'fwd.counts': 'forward.counts',
  'fwd.dispatch': 'forward.dispatch',
  'fwd.expert_ids': 'forward.expertIds',
  'fwd.combine': 'forward.combine',
  'bwd.combine': 'backward.combine',
  'bwd.dispatch': 'backward.dispatch',
};

type EpOp = 'fwd.counts' | 'fwd.dispatch' | 'fwd.expert_ids' | 'fwd.combine' | 'bwd.combine' | 'bwd.dispatch';

function mapEp(cs: readonly Call[], n: number): { ops: ({ op: EpOp; layer: number } | null)[]; skips: { layer: number; dispatchOut: number[] }[] } | null {
  const ops: ({ op: EpOp; layer: number } | null)[] = [];
  const skips: { layer: number; dispatchOut: number[] }[] = [];
  let layers: { s: number; r: number; d: number }[] = [];
  let expect: EpOp | 'counts-or-backward' | null = null;
  let backward: { op: EpOp; layer: number; in: number[]; out: number[] }[] = [];
  const same = (a: readonly number[] | undefined, b: readonly number[]) => !!a && a.length === b.length && a.every((x, i) => x === b[i]);
  for (const c of cs) {
    const e = c.entries[0]!;
    const [inS, outS] = [e.inputSizes[0], e.outputSizes[0]];
    if (!inS || !outS || e.inputSizes.length !== 1 || e.outputSizes.length !== 1) return null;
    const isLong = e.inputDtypes[0] === 'Long';
    if (isLong && same(inS, [n]) && same(outS, [n])) {
      // fwd.counts: the next layer (after a combine), or a new step (after the backward, or at the start).
      if (expect === 'fwd.dispatch' || expect === 'fwd.expert_ids' || expect === 'fwd.combine') return null;
      if (expect !== null && expect !== 'counts-or-backward') {
        // What the backward still expected must be B′s the shapes show skipped (R = 0), nothing else.
        for (const x of backward) {
          if (x.op !== 'bwd.dispatch' || x.in[0] !== 0) return null;
          skips.push({ layer: x.layer, dispatchOut: x.in });
        }
      }
      if (expect !== 'counts-or-backward') layers = [];
      backward = [];
      ops.push({ op: 'fwd.counts', layer: layers.length });
      expect = 'fwd.dispatch';
      continue;
    }
    if (expect === null) {
      ops.push(null); // before the first counts exchange the ring buffer held: not mapped
      continue;
    }
    if (expect === 'fwd.dispatch' && !isLong && inS.length === 2 && outS.length === 2) {
      layers.push({ s: inS[0]!, r: outS[0]!, d: inS[1]! });
      ops.push({ op: 'fwd.dispatch', layer: layers.length - 1 });
      expect = 'fwd.expert_ids';
    } else if (expect === 'fwd.expert_ids' && isLong && same(inS, [layers.at(-1)!.s, 1]) && same(outS, [layers.at(-1)!.r, 1])) {
      ops.push({ op: 'fwd.expert_ids', layer: layers.length - 1 });
      expect = 'fwd.combine';
    } else if (expect === 'fwd.combine' && same(inS, [layers.at(-1)!.r, layers.at(-1)!.d]) && same(outS, [layers.at(-1)!.s, layers.at(-1)!.d])) {
      ops.push({ op: 'fwd.combine', layer: layers.length - 1 });
      expect = 'counts-or-backward';
    } else if (expect === 'counts-or-backward' || backward.length) {
      if (expect === 'counts-or-backward') {
        backward = layers.flatMap((l, i) => [
          { op: 'bwd.combine' as const, layer: i, in: [l.s, l.d], out: [l.r, l.d] },
          { op: 'bwd.dispatch' as const, layer: i, in: [l.r, l.d], out: [l.s, l.d] },
        ]);
        backward = [...layers.keys()].reverse().flatMap((i) => backward.slice(2 * i, 2 * i + 2));
        expect = 'bwd.combine';
      }
      let hit = false;
      while (backward.length && !hit) {
        const x = backward[0]!;
        if (same(inS, x.in) && same(outS, x.out)) {
          ops.push({ op: x.op, layer: x.layer });
          hit = true;
        } else if (x.op === 'bwd.dispatch' && x.in[0] === 0) skips.push({ layer: x.layer, dispatchOut: x.in });
        else return null;
        backward.shift();
      }
      if (!hit) return null;
    } else return null;
  }
  // A rank whose evidence ends where the next expected call is a B′ of a layer it received nothing in.
  if (backward[0]?.op === 'bwd.dispatch' && backward[0].in[0] === 0) skips.push({ layer: backward[0].layer, dispatchOut: backward[0].in });
  return { ops, skips };
}

const SIDES = ['inputSizes', 'outputSizes'] as const;
const BOTH_STATES = STATE_BIT.completed | STATE_BIT.scheduled;

/** A call's shapes of one side, over its entries (one entry: its own list, no copy). */
const shapesOf = (c: Call, f: 'inputSizes' | 'outputSizes') => (c.entries.length === 1 ? c.entries[0]![f] : c.entries.flatMap((e) => e[f]));

function sameShapes(a: readonly (readonly number[])[], b: readonly (readonly number[])[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i]!;
    const y = b[i]!;
    if (x.length !== y.length) return false;
    for (let j = 0; j < x.length; j++) if (x[j] !== y[j]) return false;
  }
  return true;
}

/**
 * The analyzer's checks of the call `c` just added at a position, in the tracker's terms:
 * shapes, state, all-to-all totals. `before`: the states the position held without it.
 */
function frCheck(c: Call, at: Position, before: number, spec: CommunicatorSpec, position: number): Finding | null {
  const mismatch = (culprits: number[], detail: string): Finding => ({ kind: 'mismatch', communicator: spec.id, position, culprits, detail });
  const here = at.calls;
  // Most calls pass every check: all-to-alls until their position is full, the rest on a shape compare.
  if (c.kind === 'all_to_all' && here.length < spec.members.length && (at.states & BOTH_STATES) !== BOTH_STATES) return null;
  const kind = c.kind.endsWith('_coalesced') ? c.kind.slice(0, -'_coalesced'.length) : c.kind;
  const rule = SIZED.has(kind) ? sizeRuleProblem(kind, c.entries, spec.members.length) : null;
  if (rule) return mismatch([c.rank], `rank ${c.rank}: ${rule} in ${describe(c.issued)}`);
  const ref = here[0] === c ? here[1] : here[0];
  if (ref && ref.kind === c.kind && c.kind !== 'all_to_all') {
    for (const f of SIDES) {
      if (!sameShapes(shapesOf(ref, f), shapesOf(c, f))) return mismatch([ref.rank, c.rank], `rank ${ref.rank}'s ${describe(c.issued)} has ${f === 'inputSizes' ? 'input' : 'output'} ${shapeText(shapesOf(ref, f))} but rank ${c.rank}'s has ${shapeText(shapesOf(c, f))}`);
    }
  }
  // Completed beside scheduled: found when the call that brings the second of them arrives.
  if ((at.states & BOTH_STATES) === BOTH_STATES && (before & BOTH_STATES) !== BOTH_STATES) {
    const done = here.find((x) => x.state === 'completed')!;
    const waiting = here.find((x) => x.state === 'scheduled')!;
    return mismatch([waiting.rank], `rank ${done.rank}'s ${describe(c.issued)} completed while rank ${waiting.rank}'s is still scheduled: a state mismatch`);
  }
  if (here.length === spec.members.length && c.kind === 'all_to_all') {
    let sent = 0;
    let received = 0;
    for (const x of here) {
      const e = x.entries[0]!;
      if (!e.inputSizes.length) return null; // before 2.4 no sizes: totals unknown
      sent += numel(e.inputSizes);
      received += numel(e.outputSizes);
    }
    if (sent !== received) {
      return mismatch(
        here.map((x) => x.rank),
        `the ranks' ${describe(c.issued)} sends ${sent} elements in all but receives ${received}: ${here.map((x) => `rank ${x.rank} ${shapeText(x.entries[0]!.inputSizes)}→${shapeText(x.entries[0]!.outputSizes)}`).join(', ')}`,
      );
    }
  }
  return null;
}

/** Where each rank is, by its own dump: the first call it has not completed. */
function rankReports(world: readonly number[], calls: Map<number, Call[]>): RankReport[] {
  return world.map((rank) => {
    const c = (calls.get(rank) ?? []).find((x) => x.state !== 'completed');
    if (!c) return { rank, state: 'done', op: null, phase: null, layer: 0, microBatch: 0 };
    const where = c.issued.statePath || c.issued.op;
    return { rank, state: c.state === 'started' ? where : `${where} (${c.state})`, op: c.issued.op, phase: c.issued.statePath ? c.issued.phase : null, layer: c.issued.layer, microBatch: 0 };
  });
}

/** Majority at a position: the ranks whose call differs from what most members issued. */
function oddOnes(entries: readonly LedgerEntry[], callOf: (e: LedgerEntry) => Call): number[] | null {
  const sig = (e: LedgerEntry) => {
    const c = callOf(e);
    return JSON.stringify([e.op, e.layer, e.dtype, e.size, c.kind === 'all_to_all' ? null : c.entries.map((x) => [x.inputSizes, x.outputSizes])]);
  };
  const groups = new Map<string, number[]>();
  for (const e of entries) groups.set(sig(e), [...(groups.get(sig(e)) ?? []), e.rank]);
  const sizes = [...groups.values()].sort((a, b) => a.length - b.length);
  const top = sizes.at(-1);
  if (!top || sizes.length < 2 || sizes.filter((g) => g.length === top.length).length > 1) return null;
  return sizes.slice(0, -1).flat().sort((a, b) => a - b);
}

const frameText = (c: Call | undefined) => {
  const f = c?.entries[0]?.frames.find((x) => x.filename && !/torch\/(distributed|autograd|nn)\//.test(x.filename)) ?? c?.entries[0]?.frames[0];
  return f ? ` (called from ${f.name} at ${f.filename}:${f.line})` : '';
};

const zeroToken = (proof: readonly Skip[]) =>
  `${proof.map((s) => `rank ${s.rank} received 0 rows in layer ${s.layer} (its fwd.dispatch returned [${s.dispatchOut.join(', ')}])`).join('; ')}: the zero-token hazard — ${makeVariant('no-dispatch-edge').rule}; the seed keeps it with \`received_tokens.sum()*0\``;

/** The finding in the user's terms: the EP op and layer, the hazard class it belongs to, where each side waits. */
function explain(finding: Finding, tracker: CollectiveTracker, callOf: (e: LedgerEntry) => Call, ranks: RankReport[], skips: readonly Skip[]): Diagnosis {
  const at = tracker.entries.filter((e) => e.communicator === finding.communicator && e.position === finding.position);
  const seqOf = (e: LedgerEntry | undefined) => (e ? callOf(e).seq : null);
  const parts: string[] = [];
  let culprits = finding.culprits;
  const where = (e: LedgerEntry) => `${finding.communicator}, seq ${seqOf(e)}`;
  if (finding.kind === 'missing') {
    const w = at[0]!;
    parts.push(`${rankWord(culprits)} never issued ${describe(w)}; ${rankWord(at.map((e) => e.rank))} ${at.length > 1 ? 'wait' : 'waits'} in it (${where(w)})${frameText(callOf(w))}`);
    const proof = skips.filter((s) => culprits.includes(s.rank) && w.op === 'bwd.dispatch' && s.layer === w.layer);
    if (proof.length) parts.push(zeroToken(proof));
  } else if (finding.kind === 'mismatch') {
    culprits = oddOnes(at, callOf) ?? culprits;
    const w = at.find((e) => !culprits.includes(e.rank)) ?? at[0]!;
    // A rank whose shapes prove it skipped the op its peers issued here: the zero-token hazard one layer on.
    const proof = skips.filter((s) => culprits.includes(s.rank) && w.op === 'bwd.dispatch' && s.layer === w.layer);
    if (proof.length) {
      const odd = at.filter((e) => culprits.includes(e.rank));
      parts.push(`${rankWord(culprits)} never issued ${describe(w)}: at that position ${odd.map((e) => `rank ${e.rank} issued ${describe(e)}`).join(', ')}; ${rankWord(at.filter((e) => !culprits.includes(e.rank)).map((e) => e.rank))} wait in ${w.op} (${where(w)})`);
      parts.push(zeroToken(proof));
    } else {
      parts.push(finding.detail);
      if (at.some((e) => e.op === 'torch.reduce_scatter')) {
        parts.push(`a reduce-scatter that differs by rank (in size, or missing on a rank) is the unused-experts hazard: ${makeVariant('no-unused-expert-grads').rule}; the seed adds zero contributions from unused experts' parameters`);
      }
      if (/sends \d+ elements in all but receives/.test(finding.detail)) parts.push('the ranks disagree on the split sizes (NCCL pairs them by position and never checks them: it hangs or reads garbage)');
      parts.push(`at ${where(w)}${frameText(callOf(w))}`);
    }
  } else if (finding.kind === 'blocked') {
    // Only where a dump is missing: the chain of waits ends at a rank that left no evidence.
    const w = at[0]!;
    parts.push(`${rankWord(at.map((e) => e.rank))} ${at.length > 1 ? 'wait' : 'waits'} in ${describe(w)} (${where(w)}) for ${rankWord(culprits)}: ${finding.detail}`);
  } else {
    const comms = [...new Set(finding.culprits.flatMap((r) => tracker.blockedOn(r)?.communicator ?? []))];
    const names = comms.length > 1 ? `groups ${comms.slice(0, -1).join(', ')} and ${comms.at(-1)}` : `group ${comms[0] ?? finding.communicator}`;
    parts.push(`a wait-for cycle across ${names}: each rank's collective on one group is started while the next, on the other, is scheduled behind it, and the groups were issued in opposite orders: ${finding.detail}`);
  }
  return { verdict: finding.kind === 'blocked' ? 'timeout' : finding.kind, communicator: finding.communicator, position: finding.position, culprits, ranks, cause: parts.join('; ') };
}

/**
 * Past this many calls the report shows a window of each group's positions, renumbered from
 * the window's start (a page a browser opens at 512 ranks × 2,000 entries); the verdict's
 * group shows the positions around it, the others their newest.
 */
const REPORT_LIMIT = 20_000;
const REPORT_WINDOW = 48;
/**
 * Past REPORT_LIMIT, the calls drawn: groups (the verdict's, the other hung ones, then in
 * order) while their windows fit. A 512-rank job has 72 groups; all of them would be a page
 * of 25 MB that a browser opens slowly, if at all.
 */
const REPORT_CALLS = 8_000;

/** The report a simulation writes, from the dumps: their groups, ledger, timeline and each rank's path through the machine. */
function reportInput(dumps: readonly FrDump[], world: readonly number[], specs: readonly CommunicatorSpec[], fullLedger: readonly LedgerEntry[], fullDiagnosis: Diagnosis, calls: Map<number, Call[]>, groups: Map<string, Group>): ReportInput {
  const from = new Map<string, number>();
  const shown = new Set<string>();
  if (fullLedger.length > REPORT_LIMIT) {
    for (const e of fullLedger) from.set(e.communicator, Math.max(from.get(e.communicator) ?? 0, e.position - REPORT_WINDOW + 1));
    if (fullDiagnosis.communicator !== null && fullDiagnosis.position !== null) from.set(fullDiagnosis.communicator, Math.max(0, fullDiagnosis.position - REPORT_WINDOW + 8));
    // Groups by priority while their windows fit the budget (the verdict's always).
    const membersOf = new Map(specs.map((x) => [x.id, x.members.length]));
    let budget = REPORT_CALLS;
    for (const id of [fullDiagnosis.communicator, ...(fullDiagnosis.hangs ?? []).map((h) => h.communicator), ...specs.map((x) => x.id)]) {
      const calls = REPORT_WINDOW * (membersOf.get(id ?? '') ?? 0);
      if (id === null || !from.has(id) || shown.has(id) || (calls > budget && shown.size > 0)) continue;
      shown.add(id);
      budget -= calls;
    }
  }
  const drawn = (comm: string) => shown.size === 0 || shown.has(comm);
  const shift = (comm: string, p: number) => p - (from.get(comm) ?? 0);
  const visible = (comm: string, p: number) => drawn(comm) && shift(comm, p) >= 0 && shift(comm, p) < REPORT_WINDOW + (from.size ? 0 : Infinity);
  const ledger = fullLedger.filter((e) => visible(e.communicator, e.position)).map((e) => (from.size ? { ...e, position: shift(e.communicator, e.position) } : e));
  const diagnosis = from.size && fullDiagnosis.communicator !== null && fullDiagnosis.position !== null ? { ...fullDiagnosis, position: shift(fullDiagnosis.communicator, fullDiagnosis.position) } : fullDiagnosis;
  const ep = [...groups.values()].find((g) => ledger.some((e) => e.communicator === g.spec.id && e.op === 'fwd.counts'));
  const epSize = ep?.spec.members.length ?? 1;
  const layers = 1 + ledger.reduce((m, e) => Math.max(m, e.layer), 0);
  // The scenario only sizes the page's machine and lanes; the evidence line says what was read.
  const scenario: Scenario = { ...DEFAULT_SCENARIO, ep: epSize, dp: Math.max(1, Math.ceil(world.length / epSize)), experts: epSize, topK: 1, layers, tokens: 0 };
  const t0 = dumps.reduce((t, d) => d.entries.reduce((u, e) => (e.createdNs > 0n && e.createdNs < u ? e.createdNs : u), t), BigInt(Number.MAX_SAFE_INTEGER) * 1_000_000n);
  const end = dumps.reduce((t, d) => d.entries.reduce((u, e) => (e.createdNs > u ? e.createdNs : e.completedNs && e.completedNs > u ? e.completedNs : u), t), t0);
  const us = (ns: bigint) => Number((ns - t0) / 1000n);
  const trace: TraceEvent[] = [];
  for (const [rank, cs] of calls) {
    const counters = new Map<string, number>();
    for (const c of cs) {
      const p = counters.get(c.comm) ?? 0;
      counters.set(c.comm, p + 1);
      if (!visible(c.comm, p)) continue;
      const first = c.entries[0]!;
      const stop = c.entries.at(-1)!.completedNs ?? end;
      trace.push({ name: c.issued.op, ph: 'X', ts: us(first.createdNs), dur: Math.max(0, us(stop) - us(first.createdNs)), pid: 0, tid: rank, args: { communicator: c.comm, position: shift(c.comm, p), layer: c.issued.layer, microBatch: 0, ...(c.state === 'completed' ? {} : { completed: false as const }) } });
    }
  }
  // Each rank's path through the machine up to where it stopped (in a windowed report, its last REPORT_WINDOW calls).
  const paths = world.map((r) => {
    const cs = calls.get(r) ?? [];
    const upTo = cs.findIndex((c) => c.state !== 'completed');
    const mine = upTo < 0 ? cs : cs.slice(0, upTo + 1);
    if (from.size && !mine.some((c) => drawn(c.comm))) return [];
    return (from.size ? mine.slice(-REPORT_WINDOW) : mine).flatMap((c) => (c.issued.statePath ? [c.issued.statePath] : []));
  });
  const d0 = dumps[0]!;
  const groupCount = new Set(fullLedger.map((e) => e.communicator)).size;
  const cut = from.size
    ? `; the ledger and timeline show ${REPORT_WINDOW} positions of each group (${ledger.length} of ${fullLedger.length} calls), numbered from the first shown${shown.size < groupCount ? `, of ${shown.size} of the ${groupCount} groups (the verdict's and the other hung ones first; the verdict and --json cover all)` : ''}`
    : '';
  const evidence = `Flight Recorder dumps of ${dumps.length} rank${dumps.length > 1 ? 's' : ''} (trace version ${d0.version}${d0.commLibVersion ? `, ${d0.entries[0]?.backend ?? 'nccl'} ${d0.commLibVersion}` : ''}); groups: ${specs.filter((s) => !s.id.includes('→') && drawn(s.id)).map((s) => `${s.id} (ranks ${rankRanges(s.members)})`).join(', ')}${cut}`;
  return { scenario, diagnosis, ledger, paths, trace, routing: { sendRows: [], rowsPerExpert: [] }, clock: 'real', communicators: specs.filter((x) => drawn(x.id)), evidence };
}
