// `ep-actors diagnose`: PyTorch Flight Recorder dumps (fixtures written by Python's pickle
// and json, test/fixtures/flight-recorder/make_dumps.py) and ep-actors rank records through
// the collective tracker. The cases PyTorch's own analyzer tests
// (test/distributed/flight_recorder/test_fr_analysis.py) are written here as our own, plus
// what it does not check: missing collectives, cycles across groups, dead ranks, the EP ops.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { analyzeDumps } from '../sim/postmortem/analyze.js';
import { EvidenceError, parseDump, readDump, type FrDump } from '../sim/postmortem/flightRecorder.js';
import { freePort } from '../actors/rendezvous.js';
import { runLaunchedRank } from '../actors/launch.js';
import type { RankRecord } from '../actors/rankRecord.js';
import { validateScenario } from '../machines/scenario.js';
import { seededRng } from '../src/moe/random.js';
import { isTuple, readPickle, type PickleValue } from '../src/codec/pickle.js';
import { repoRoot } from './paths.js';
import { runCli } from './cli.js';
import { verdictJson } from '../cli/diagnose.js';
import { formatDiagnosis } from '../machines/diagnosis.js';

const fixtures = join(repoRoot, 'test', 'fixtures', 'flight-recorder');
const dumpsIn = (kase: string): FrDump[] =>
  readdirSync(join(fixtures, kase)).map((f) => readDump(readFileSync(join(fixtures, kase, f)), f, Number(/(\d+)$/.exec(f)![1])));

test('each fixture: the verdict, group, position, seq, op, layer and culprits', () => {
  const want: Record<string, [string, string | null, number | null, number | null, string | null, number | null, number[]]> = {
    healthy: ['ok', null, null, null, null, null, []],
    'zero-token': ['missing', 'mesh_ep', 5, 6, 'bwd.dispatch', 0, [1]],
    'zero-token-layer1': ['mismatch', 'mesh_ep', 9, 10, 'bwd.dispatch', 1, [2]],
    truncated: ['missing', 'mesh_ep', 7, 18, 'bwd.dispatch', 0, [1]],
    'dead-rank': ['crash', 'mesh_ep', 0, 2, 'fwd.dispatch', 0, [3]],
    'size-mismatch': ['mismatch', 'mesh_dp [0, 2]', 1, 2, 'torch.reduce_scatter', 0, [0, 2]],
    'dtype-mismatch': ['mismatch', 'mesh_ep', 1, 2, 'fwd.dispatch', 0, [2]],
    'fsdp-rs-vs-ag': ['mismatch', 'mesh_dp [0, 2]', 1, 2, 'torch.reduce_scatter', 0, [0, 2]],
    cycle: ['cycle', 'mesh_dp [0, 2]', 0, 1, 'torch.all_gather', 0, [0, 1, 2, 3]],
    'a2a-totals': ['mismatch', 'mesh_ep', 1, 2, 'fwd.dispatch', 0, [0, 1, 2, 3]],
  };
  for (const [kase, [verdict, communicator, position, seq, op, layer, culprits]] of Object.entries(want)) {
    const pm = analyzeDumps(dumpsIn(kase));
    const d = pm.diagnosis;
    const here = pm.ledger.filter((e) => e.communicator === d.communicator && e.position === d.position);
    const at = here.find((e) => !d.culprits.includes(e.rank)) ?? here[0];
    assert.equal([d.verdict, d.communicator, d.position, pm.seq, at?.op ?? null, at?.layer ?? null, d.culprits], [verdict, communicator, position, seq, op, layer, culprits], `${kase}: ${d.cause}`);
  }
});

test('clean steps read as the rank machine\'s ops, layer by layer, step after step', () => {
  const pm = analyzeDumps(dumpsIn('healthy'));
  const count = (op: string, layer: number) => pm.ledger.filter((e) => e.op === op && e.layer === layer).length;
  // 4 ranks × 2 steps of each op in each of the 2 layers; nothing left as a bare torch.all_to_all.
  for (const op of ['fwd.counts', 'fwd.dispatch', 'fwd.expert_ids', 'fwd.combine', 'bwd.combine', 'bwd.dispatch']) for (const layer of [0, 1]) assert.is(count(op, layer), 8, `${op} layer ${layer}`);
  assert.is(pm.ledger.length, 4 * 2 * 12);
  assert.equal(pm.ledger.filter((e) => e.rank === 0).slice(8, 12).map((e) => `${e.op}@${e.layer}`), ['bwd.combine@1', 'bwd.dispatch@1', 'bwd.combine@0', 'bwd.dispatch@0']);
});

test('the causes read in the EP layer\'s terms and name the hazard', () => {
  const cause = (kase: string) => analyzeDumps(dumpsIn(kase)).diagnosis.cause;
  assert.match(cause('zero-token'), /^rank 1 never issued bwd\.dispatch of layer 0; ranks 0, 2, 3 wait in it \(mesh_ep, seq 6\)/);
  assert.match(cause('zero-token'), /rank 1 received 0 rows in layer 0 \(its fwd\.dispatch returned \[0, 8\]\): the zero-token hazard — variant no-dispatch-edge/);
  assert.match(cause('zero-token'), /called from backward at kempnerforge\/distributed\/expert_parallel\.py:131/);
  // Shapes tell layer 0's bwd.combine (what rank 2 issued) from layer 1's bwd.dispatch (what it skipped).
  assert.match(cause('zero-token-layer1'), /rank 2 never issued bwd\.dispatch of layer 1: at that position rank 2 issued bwd\.combine of layer 0; ranks 0, 1, 3 wait in bwd\.dispatch/);
  assert.match(cause('size-mismatch'), /rank 2 issued torch\.reduce_scatter of 96 elements but rank 0 of 128.*unused-experts hazard/);
  assert.match(cause('fsdp-rs-vs-ag'), /rank 2 issued torch\.all_gather .* but rank 0 issued torch\.reduce_scatter.*unused-experts hazard/);
  assert.match(cause('dtype-mismatch'), /rank 0 sends Float but rank 2 sends BFloat16 in fwd\.dispatch/);
  assert.match(cause('cycle'), /a wait-for cycle across groups mesh_dp \[0, 2\], mesh_ep \[2, 3\], mesh_dp \[1, 3\] and mesh_ep \[0, 1\]|a wait-for cycle across groups .*mesh_dp.*mesh_ep/);
  assert.match(cause('dead-rank'), /^rank 3 left no Flight Recorder dump: it died .*; ranks 0–2 wait for it in fwd\.dispatch of layer 0/);
  assert.match(cause('a2a-totals'), /sends 256 elements in all but receives 264/);
});

test('pickle 2, 4, 5 and JSON forms of one case give the same diagnosis', () => {
  const base = analyzeDumps(dumpsIn('zero-token'));
  for (const form of ['zero-token-pickle4', 'zero-token-pickle5', 'zero-token-json']) {
    const pm = analyzeDumps(dumpsIn(form));
    const strip = (c: string) => c.replace(/ \(called from [^)]*\)/g, ''); // JSON dumps carry no frames
    assert.equal({ ...pm.diagnosis, cause: strip(pm.diagnosis.cause) }, { ...base.diagnosis, cause: strip(base.diagnosis.cause) }, form);
    assert.is(pm.seq, base.seq);
    assert.is(pm.ledger.length, base.ledger.length);
  }
});

// ---------------------------------------------------------------- the analyzer's cases

interface E {
  op?: string;
  seq?: number;
  pg?: string;
  in?: number[][];
  out?: number[][];
  inDtype?: string;
  outDtype?: string;
  state?: string;
  p2pSeq?: number;
}

/** One rank's dump, fields as torch writes them (defaults: a completed all_reduce of [4, 4] on pg "0" of ranks 0, 1). */
function dump(rank: number, entries: E[], opts: { groups?: Record<string, number[]>; version?: string; extra?: Record<string, unknown> } = {}): FrDump {
  const groups = opts.groups ?? { '0': [0, 1] };
  const seqs = new Map<string, number>();
  const value = {
    version: opts.version ?? '2.8',
    comm_lib_version: '2.21.5',
    pg_config: Object.fromEntries(Object.entries(groups).map(([name, ranks]) => [name, { name, desc: name === '0' ? 'default_pg' : `group${name}`, ranks: JSON.stringify(ranks).replace(/,/g, ', ') }])),
    pg_status: {},
    entries: entries.map((e, i) => {
      const pg = e.pg ?? '0';
      const seq = e.seq ?? (seqs.set(pg, (seqs.get(pg) ?? 0) + 1), seqs.get(pg)!);
      const inp = e.in ?? [[4, 4]];
      const out = e.out ?? inp;
      return {
        record_id: i,
        pg_id: Number(pg),
        process_group: [pg, pg === '0' ? 'default_pg' : `group${pg}`],
        collective_seq_id: seq,
        p2p_seq_id: e.p2pSeq ?? 0,
        op_id: i + 1,
        profiling_name: (e.op ?? 'all_reduce').includes(':') ? e.op : `nccl:${e.op ?? 'all_reduce'}`,
        time_created_ns: 1_700_000_000_000_000_000n + BigInt(i),
        input_sizes: inp,
        input_dtypes: inp.map(() => e.inDtype ?? 'Float'),
        output_sizes: out,
        output_dtypes: out.map(() => e.outDtype ?? e.inDtype ?? 'Float'),
        state: e.state ?? 'completed',
        time_discovered_started_ns: null,
        time_discovered_completed_ns: null,
        retired: true,
        timeout_ms: 600000,
        is_p2p: false,
        ...opts.extra,
      };
    }),
    ...opts.extra,
  };
  return parseDump(value, `rank${rank}`, rank);
}

const verdictOf = (dumps: FrDump[]) => analyzeDumps(dumps).diagnosis;

test('analyzer cases: matched, type, size and state mismatches, dtypes', () => {
  assert.is(verdictOf([dump(0, [{}]), dump(1, [{}])]).verdict, 'ok', 'an all-reduce matched with itself');
  const types = verdictOf([dump(0, [{}]), dump(1, [{ op: 'all_gather_into_tensor', in: [[4, 4]], out: [[8, 4]] }])]);
  assert.equal([types.verdict, types.position], ['mismatch', 0]);
  assert.match(types.cause, /rank 1 issued torch\.all_gather .* but rank 0 issued torch\.all_reduce/);
  // Sizes alone cannot decide an all-to-all (the dump holds no per-peer splits): with equal totals it passes.
  assert.is(verdictOf([dump(0, [{ op: 'all_to_all', in: [[6, 4]], out: [[2, 4]] }]), dump(1, [{ op: 'all_to_all', in: [[2, 4]], out: [[6, 4]] }])]).verdict, 'ok');
  const inSize = verdictOf([dump(0, [{ in: [[5, 4]] }]), dump(1, [{ in: [[4, 4]] }])]);
  assert.equal([inSize.verdict, inSize.cause.includes('rank 1 issued torch.all_reduce of 16 elements but rank 0 of 20')], ['mismatch', true], inSize.cause);
  const outSize = verdictOf([dump(0, [{ op: 'broadcast', out: [[5, 4]] }]), dump(1, [{ op: 'broadcast', out: [[4, 4]] }])]);
  assert.equal([outSize.verdict, /output \[5, 4\] but rank 1's has \[4, 4\]/.test(outSize.cause)], ['mismatch', true], outSize.cause);
  const inOut = verdictOf([dump(0, [{}]), dump(1, [{ in: [[4, 4]], out: [[5, 4]] }])]);
  assert.equal([inOut.verdict, inOut.culprits], ['mismatch', [1]]);
  assert.match(inOut.cause, /rank 1: its all_reduce's input \[4, 4\] differs from its output \[5, 4\]/);
  const state = verdictOf([dump(0, [{ state: 'completed' }]), dump(1, [{ state: 'scheduled' }])]);
  assert.equal([state.verdict, state.culprits], ['mismatch', [1]]);
  assert.match(state.cause, /state mismatch/);
  const dtype = verdictOf([dump(0, [{}]), dump(1, [{ outDtype: 'Half' }])]);
  assert.equal(dtype.verdict, 'mismatch');
  assert.match(dtype.cause, /rank 1 sends Float→Half but rank 0 sends Float/);
});

test('analyzer cases: every collective matched with itself passes, with the group-size rules', () => {
  const ops: E[] = [
    { op: 'all_reduce' },
    { op: 'allreduce_coalesced' },
    { op: 'broadcast' },
    { op: '_broadcast_oop' },
    { op: 'reduce' },
    { op: '_reduce_oop' },
    { op: 'all_gather_into_tensor', in: [[16]], out: [[32]] },
    { op: '_allgather_base', in: [[16]], out: [[32]] },
    { op: 'all_gather', in: [[16]], out: [[32]] },
    { op: 'reduce_scatter_tensor', in: [[16]], out: [[8]] },
    { op: '_reduce_scatter_base', in: [[16]], out: [[8]] },
    { op: 'all_to_all', in: [[16]], out: [[16]] },
    { op: 'barrier', in: [[1]] },
    { op: 'gather' },
    { op: 'scatter' },
  ];
  for (const e of ops) assert.is(verdictOf([dump(0, [e]), dump(1, [e])]).verdict, 'ok', e.op);
  assert.is(verdictOf([dump(0, ops), dump(1, ops)]).verdict, 'ok', 'all of them in a row');
  const gather = verdictOf([dump(0, [{ op: 'all_gather_into_tensor', in: [[16]], out: [[16]] }]), dump(1, [{ op: 'all_gather_into_tensor', in: [[16]], out: [[16]] }])]);
  assert.match(gather.cause, /output has 16 elements, not input 16 × group size 2/);
  const scatter = verdictOf([dump(0, [{ op: 'reduce_scatter_tensor', in: [[16]], out: [[16]] }]), dump(1, [{ op: 'reduce_scatter_tensor', in: [[16]], out: [[8]] }])]);
  assert.match(scatter.cause, /rank 0: its reduce_scatter's input has 16 elements, not output 16 × group size 2/);
});

test('backends nccl, ncclx, gloo and xccl parse; an unknown one is refused in one line', () => {
  for (const b of ['nccl', 'ncclx', 'gloo', 'xccl']) assert.is(verdictOf([dump(0, [{ op: `${b}:all_reduce` }]), dump(1, [{ op: `${b}:all_reduce` }])]).verdict, 'ok', b);
  assert.throws(() => dump(0, [{ op: 'mpi:all_reduce' }]), (e: Error) => e instanceof EvidenceError && /^rank0: entries\[0\]\.profiling_name has backend "mpi"; known: nccl, ncclx, gloo, xccl$/.test(e.message));
});

test('end to end: version 2.8, a sub-group whose members differ per rank, coalesced runs, one rank with more', () => {
  // Two groups named "1" with different members are two groups: each matches within itself.
  const split = [0, 1, 2, 3].map((r) => dump(r, [{}, { pg: '1' }, {}], { groups: { '0': [0, 1, 2, 3], '1': r < 2 ? [0, 1] : [2, 3] } }));
  const d = analyzeDumps(split);
  assert.is(d.report.diagnosis.verdict, 'ok', d.report.diagnosis.cause);
  assert.equal(d.report.communicators!.map((c) => c.id), ['default_pg', 'group1 [0, 1]', 'group1 [2, 3]']);
  // Coalesced all-reduce: two tensors and torch's closing `coalesced` entry share seq 1.
  const coalesced: E[] = [{ seq: 1 }, { seq: 1, in: [[8]] }, { seq: 1, op: 'coalesced', in: [], out: [] }];
  assert.is(verdictOf([dump(0, coalesced), dump(1, coalesced)]).verdict, 'ok');
  const bcasts: E[] = [{ op: 'broadcast' }, { op: 'broadcast' }, { seq: 3, op: '_broadcast_oop' }, { seq: 3, op: '_broadcast_oop' }, { seq: 3, op: 'coalesced', in: [], out: [] }];
  assert.is(verdictOf([dump(0, bcasts), dump(1, bcasts)]).verdict, 'ok');
  // A coalesced out-of-place broadcast of [4,4] then [5,5] on one rank, [4,4] twice on the other.
  const a: E[] = [{ seq: 1, op: '_broadcast_oop' }, { seq: 1, op: '_broadcast_oop', in: [[5, 5]] }, { seq: 1, op: 'coalesced', in: [], out: [] }];
  const b: E[] = [{ seq: 1, op: '_broadcast_oop' }, { seq: 1, op: '_broadcast_oop' }, { seq: 1, op: 'coalesced', in: [], out: [] }];
  const oop = verdictOf([dump(0, a), dump(1, b)]);
  assert.is(oop.verdict, 'mismatch');
  assert.match(oop.cause, /rank 1 issued torch\.broadcast_coalesced of 32 elements but rank 0 of 41/);
  const rs: E[] = [{ op: '_reduce_oop' }, { op: '_reduce_oop' }, { seq: 3, op: 'reduce_scatter_tensor_coalesced', in: [[8], [8]], out: [[4], [4]] }, { seq: 3, op: 'coalesced', in: [], out: [] }];
  assert.is(verdictOf([dump(0, rs), dump(1, rs)]).verdict, 'ok');
  // One rank with only the all-reduce, the other with one more: PyTorch's analyzer passes it
  // (it only compares what both hold). Here the second all-reduce has a member that finished
  // without issuing it, and its peer waits there forever: missing, culprit rank 1.
  const more = verdictOf([dump(0, [{}, { state: 'started' }]), dump(1, [{}])]);
  assert.equal([more.verdict, more.position, more.culprits], ['missing', 1, [1]]);
});

test('two groups each hung on its own: both listed, in the tracker\'s canonical order, as sim --json lists hangs', () => {
  // Group 1 (ranks 0, 1): rank 1 stops before the second all-reduce. Group 2 (ranks 2, 3): sizes disagree at the first.
  const groups = (r: number): { groups: Record<string, number[]> } => ({ groups: r < 2 ? { '1': [0, 1] } : { '2': [2, 3] } });
  const pm = analyzeDumps([
    dump(0, [{ pg: '1' }, { pg: '1', state: 'started' }], groups(0)),
    dump(1, [{ pg: '1' }], groups(1)),
    dump(2, [{ pg: '2', state: 'started' }], groups(2)),
    dump(3, [{ pg: '2', in: [[5, 4]], state: 'started' }], groups(3)),
  ]);
  const j = verdictJson(pm);
  assert.equal(
    j.hangs.map((h) => [h.verdict, h.communicator, h.position, h.culprits]),
    [
      ['missing', 'group1', 1, [1]],
      ['mismatch', 'group2', 0, [2, 3]],
    ],
  );
  // The headline is the first hang; the readable form lists the other as well.
  assert.equal([j.verdict, j.communicator, j.position, j.culprits], ['missing', 'group1', 1, [1]]);
  assert.match(formatDiagnosis(pm.diagnosis), /\nalso: {4}mismatch on group2, position 0 \(ranks 2, 3\): rank 3 issued torch\.all_reduce of 20 elements but rank 2 of 16/);
  // Each entry has exactly the fields sim --json gives every hang (machines/diagnosis.ts HangSummary).
  for (const h of j.hangs) assert.equal(Object.keys(h), ['verdict', 'communicator', 'position', 'culprits', 'detail']);
  // A clean run lists none.
  assert.equal(verdictJson(analyzeDumps([dump(0, [{}]), dump(1, [{}])])).hangs, []);
});

test('a long ledger: the verdict on all of it, the report a renumbered window around it', () => {
  const many = (r: number) => dump(r, Array.from({ length: 12_000 }, (_, i): E => (i === 11_990 && r === 1 ? { in: [[5, 4]] } : {})));
  const pm = analyzeDumps([many(0), many(1)]);
  assert.equal([pm.diagnosis.verdict, pm.diagnosis.position, pm.seq, pm.ledger.length], ['mismatch', 11_990, 11_991, 24_000 - 18]);
  assert.ok(pm.report.ledger.length <= 2 * 48, `${pm.report.ledger.length} entries in the report`);
  assert.is(pm.report.diagnosis.position, 40, 'the verdict 8 positions before the window ends');
  assert.ok(pm.report.ledger.some((e) => e.position === 40 && e.rank === 1));
  assert.match(pm.report.evidence!, /the ledger and timeline show 48 positions of each group/);
});

test('send/recv pair by direction and order; an unmatched send is missing its receive', () => {
  const send: E = { op: 'nccl:send 0->1', in: [[4]], p2pSeq: 1 };
  const recv: E = { op: 'nccl:recv 1<-0', in: [[4]], p2pSeq: 1 };
  assert.is(verdictOf([dump(0, [send]), dump(1, [recv])]).verdict, 'ok');
  assert.is(verdictOf([dump(0, [send]), dump(1, [{ ...recv, in: [[5]] }])]).verdict, 'mismatch');
  const lost = verdictOf([dump(0, [{ ...send, state: 'started' }]), dump(1, [])]);
  assert.equal([lost.verdict, lost.communicator, lost.culprits], ['missing', 'default_pg 0→1', [1]]);
});

test('bad input, one clear line each: mixed versions, unknown version, damaged fields; unknown fields ignored; old versions without sizes', () => {
  assert.throws(() => analyzeDumps([dump(0, [{}]), dump(1, [{}], { version: '2.4' })]), /different Flight Recorder versions \(rank0: 2\.8, rank1: 2\.4\)/);
  assert.throws(() => dump(0, [{}], { version: '3.0' }), /rank0: Flight Recorder version "3\.0" is not one this reader knows/);
  assert.is(verdictOf([dump(0, [{}], { extra: { future_field: [1, 2] } }), dump(1, [{}], { extra: { future_field: 'x' } })]).verdict, 'ok');
  assert.throws(() => parseDump({ version: '2.8', pg_config: { '0': { name: '0', desc: '', ranks: '[0, 1]' } }, entries: [{ process_group: ['7', ''] }] }, 'r0', 0), /r0: entries\[0\] is on process group "7", which pg_config does not list/);
  assert.throws(() => parseDump({ version: '2.8', pg_config: { '0': { ranks: 'all of them' } } }, 'r0', 0), /pg_config\[0\]\.ranks "all of them" is not a list of ranks/);
  // 2.3: all-to-all entries without sizes read as unknown; matched by position and op only.
  const old = (r: number) => {
    const d = dump(r, [{ op: 'all_to_all' }], { version: '2.3' });
    return parseDump({ version: '2.3', pg_config: { '0': { name: '0', desc: 'default_pg', ranks: '[0, 1]' } }, entries: [{ ...Object.fromEntries(Object.entries(rawEntry(d)).filter(([k]) => !k.endsWith('sizes'))) }] }, `r${r}`, r);
  };
  assert.is(verdictOf([old(0), old(1)]).verdict, 'ok');
});

/** The raw fields of a dump's first entry, for rewriting one. */
function rawEntry(d: FrDump): Record<string, unknown> {
  const e = d.entries[0]!;
  return { record_id: e.recordId, process_group: [e.pgName, 'default_pg'], collective_seq_id: e.seq, profiling_name: e.profilingName, state: e.state, time_created_ns: e.createdNs, input_dtypes: e.inputDtypes, output_dtypes: e.outputDtypes };
}

test('fuzz: 5,000 mutated dump files read as a diagnosis or an EvidenceError, never another error', () => {
  const rand = seededRng(0xd1a6);
  const files = ['zero-token', 'zero-token-json', 'cycle', 'truncated'].flatMap((k) => readdirSync(join(fixtures, k)).map((f) => [k, f, readFileSync(join(fixtures, k, f))] as const));
  let refused = 0;
  for (let i = 0; i < 5000; i++) {
    const [kase, name, base] = files[i % files.length]!;
    const b = Uint8Array.from(base);
    const cut = Math.floor(rand() * 3);
    const bytes = cut === 0 ? b.subarray(0, Math.floor(rand() * b.length)) : b;
    if (cut > 0) for (let k = 1 + Math.floor(rand() * 4); k > 0; k--) bytes[Math.floor(rand() * bytes.length)] = Math.floor(rand() * 256);
    try {
      const rank = Number(/(\d+)$/.exec(name)![1]);
      const others = dumpsIn(kase).filter((d) => d.rank !== rank);
      analyzeDumps([...others, readDump(bytes, name, rank)]);
    } catch (e) {
      if (!(e instanceof EvidenceError)) throw new Error(`mutation ${i} of ${kase}/${name}: ${(e as Error).stack}`);
      refused++;
    }
  }
  assert.ok(refused > 1000, `only ${refused} of 5000 damaged dumps were refused`);
});

test('fuzz: 3,000 dumps with damaged fields and structure (seq ids, states, sizes, ops, groups, lost entries and dumps) give a diagnosis or an EvidenceError', () => {
  const rand = seededRng(0x5e91);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const plain = (v: PickleValue): unknown => (isTuple(v) ? v.tuple.map(plain) : Array.isArray(v) ? v.map(plain) : v !== null && typeof v === 'object' ? Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)])) : v);
  type Raw = { pg_config: Record<string, { ranks: string }>; entries: Record<string, unknown>[] };
  const kases = readdirSync(fixtures).filter((k) => !k.includes('.') && !k.endsWith('json'));
  const sets = kases.map((k) => readdirSync(join(fixtures, k)).map((f) => [Number(/(\d+)$/.exec(f)![1]), plain(readPickle(readFileSync(join(fixtures, k, f))))] as [number, Raw]));
  let refused = 0;
  for (let i = 0; i < 3000; i++) {
    const ds = structuredClone(pick(sets));
    for (let k = 0; k < 1 + Math.floor(rand() * 3); k++) {
      const d = pick(ds)[1];
      const e = d.entries.length ? pick(d.entries) : null;
      if (!e) continue;
      const m = Math.floor(rand() * 10);
      if (m === 0) e.collective_seq_id = Math.floor(rand() * 10) - 1;
      else if (m === 1) e.state = pick(['scheduled', 'started', 'completed']);
      else if (m === 2) e.input_sizes = pick([[], [[]], [[0]], [[3, 2], [1]], [[4]]]);
      else if (m === 3) e.profiling_name = pick(['nccl:coalesced', 'nccl:send 0->1', 'nccl:recv 1<-0', 'nccl:all_reduce', 'gloo:barrier', 'nccl:send 0->9']);
      else if (m === 4) d.entries.splice(d.entries.indexOf(e), 1);
      else if (m === 5) e.process_group = [pick(Object.keys(d.pg_config)), 'x'];
      else if (m === 6) d.entries.push({ ...e, record_id: (e.record_id as number) + 1000 });
      else if (m === 7) e.output_sizes = pick([[], [[1]], [[8, 8]], [[0, 8]]]);
      else if (m === 8) ds.splice(ds.findIndex((x) => x[1] === d), 1);
      else d.pg_config[pick(Object.keys(d.pg_config))]!.ranks = pick(['[0, 1]', '[1, 2]', '[0, 1, 2, 3]', '[3]', '[]']);
    }
    try {
      analyzeDumps(ds.map(([r, v]) => parseDump(v, `r${r}`, r)));
    } catch (e) {
      if (!(e instanceof EvidenceError)) throw new Error(`mutation ${i}: ${(e as Error).stack}`);
      refused++;
    }
  }
  assert.ok(refused > 100 && refused < 2900, `${refused} of 3000 refused`);
});

// ---------------------------------------------------------------- the command

test('diagnose: exit codes, --json shape, --html report, --help, and one-line errors', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-diagnose-'));
  try {
    const ok = await runCli(['diagnose', join(fixtures, 'healthy')]);
    assert.is(ok.code, 0, ok.stderr);
    assert.match(ok.stdout, /^verdict: ok/);
    const html = join(dir, 'report.html');
    const hang = await runCli(['diagnose', join(fixtures, 'zero-token'), '--json', '--html', html]);
    assert.is(hang.code, 2, hang.stderr);
    const j = JSON.parse(hang.stdout) as Record<string, unknown>;
    assert.equal(Object.keys(j), ['verdict', 'communicator', 'position', 'seq', 'op', 'layer', 'culprits', 'ranks', 'cause', 'hangs']);
    assert.equal(j.hangs, [{ verdict: 'missing', communicator: 'mesh_ep', position: 5, culprits: [1], detail: 'rank 1 finished without issuing position 5, where ranks 0, 2, 3 wait in bwd.dispatch' }]);
    assert.equal([j.verdict, j.communicator, j.position, j.seq, j.op, j.layer, j.culprits], ['missing', 'mesh_ep', 5, 6, 'bwd.dispatch', 0, [1]]);
    const page = readFileSync(html, 'utf8');
    assert.match(page, /Flight Recorder dumps of 4 ranks/);
    assert.match(page, /data-comm="mesh_ep"/);
    const files = ['nccl_trace_rank_0', 'nccl_trace_rank_1'].map((f) => join(fixtures, 'cycle', f));
    assert.is((await runCli(['diagnose', ...files, join(fixtures, 'cycle', 'nccl_trace_rank_2'), join(fixtures, 'cycle', 'nccl_trace_rank_3')])).code, 2);
    const help = await runCli(['diagnose', '--help']);
    assert.is(help.code, 0);
    assert.match(help.stdout, /TORCH_NCCL_TRACE_BUFFER_SIZE[\s\S]*TORCH_NCCL_DUMP_ON_TIMEOUT=1[\s\S]*TORCH_NCCL_DEBUG_INFO_TEMP_FILE/);
    // Damaged, empty, mixed: exit 1, one line naming the file and what is wrong, no report written.
    writeFileSync(join(dir, 'nccl_trace_rank_0'), readFileSync(join(fixtures, 'zero-token', 'nccl_trace_rank_0')).subarray(0, 300));
    writeFileSync(join(dir, 'nccl_trace_rank_1'), readFileSync(join(fixtures, 'zero-token', 'nccl_trace_rank_1')));
    const broken = join(dir, 'broken.html');
    const damaged = await runCli(['diagnose', dir, '--html', broken]);
    assert.is(damaged.code, 1);
    assert.match(damaged.stderr, /^ep-actors: \S+nccl_trace_rank_0: .* at byte \d+\n$/);
    assert.not.ok(existsSync(broken), 'no report from bad evidence');
    const empty = mkdtempSync(join(tmpdir(), 'ep-actors-empty-'));
    const none = await runCli(['diagnose', empty]);
    rmSync(empty, { recursive: true });
    assert.is(none.code, 1);
    assert.match(none.stderr, /no Flight Recorder dumps .* or rank records .* in it/);
    writeFileSync(join(dir, 'nccl_trace_rank_0'), readFileSync(join(fixtures, 'zero-token', 'nccl_trace_rank_0')));
    writeFileSync(join(dir, 'rank0.record.json'), '{}');
    const mixed = await runCli(['diagnose', join(dir, 'rank0.record.json'), join(dir, 'nccl_trace_rank_0')]);
    assert.is(mixed.code, 1);
    assert.match(mixed.stderr, /mixes rank records .* and Flight Recorder dumps/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('rank records: diagnose and viz report --ranks give one verdict; a rank with no record is a crash naming it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-records-'));
  try {
    const scenario = validateScenario({ ep: 4, routing: 'starve:1', variant: 'no-dispatch-edge' });
    const port = await freePort();
    const records: RankRecord[] = [];
    await Promise.allSettled(
      [0, 1, 2, 3].map((rank) =>
        runLaunchedRank({ scenario, env: { rank, worldSize: 4, localRank: rank, masterAddr: '127.0.0.1', masterPort: port }, exchange: 'tcp', backend: 'ts', timeoutMs: 20_000, keep: (r) => records.push(r) }),
      ),
    );
    assert.is(records.length, 4);
    for (const r of records) writeFileSync(join(dir, `rank${r.rank}.record.json`), JSON.stringify(r));
    const html = join(dir, 'report.html');
    const d = await runCli(['diagnose', dir, '--json']);
    const v = await runCli(['viz', 'report', '--ranks', dir, '--html', html, '--json']);
    assert.is(d.code, 2, d.stderr);
    assert.is(v.code, 0, v.stderr);
    assert.is(d.stdout, v.stdout);
    const j = JSON.parse(d.stdout) as { verdict: string; communicator: string; position: number; seq: null; op: string; culprits: number[] };
    assert.equal([j.verdict, j.communicator, j.position, j.seq, j.op, j.culprits], ['missing', 'ep', 5, null, 'bwd.dispatch', [1]]);

    // kill -9 of rank 2: its record never gets written. The others' records still merge.
    rmSync(join(dir, 'rank2.record.json'));
    rmSync(html);
    const gone = await runCli(['viz', 'report', '--ranks', dir, '--html', html, '--json']);
    assert.is(gone.code, 0, gone.stderr);
    assert.ok(existsSync(html), 'the report is still written');
    const c = JSON.parse(gone.stdout) as { verdict: string; communicator: string; position: number; op: string; culprits: number[]; cause: string; ranks: { rank: number; state: string }[] };
    assert.equal([c.verdict, c.communicator, c.position, c.op, c.culprits], ['crash', 'ep', 5, 'bwd.dispatch', [2]]);
    assert.match(c.cause, /^rank 2 left no rank record: it died .*; ranks 0, 3 wait for it in bwd\.dispatch of layer 0 \(ep, position 5\); besides, a missing on ep, position 5/);
    assert.is(c.ranks[2]!.state, 'dead (no rank record)');
    assert.is((await runCli(['diagnose', dir, '--json'])).stdout, gone.stdout);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
