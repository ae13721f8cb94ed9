// `diagnose` at the size real jobs dump: 512 ranks (dp=64 × ep=8, two MoE layers, FSDP on
// the dp groups), each ring buffer full at its default 2,000 entries, the zero-token hazard
// in the last step (one rank never issues layer 0's bwd.dispatch). The same dumps in both
// forms torch writes: pickle (protocol 2 as torch's C++ pickler writes it: memoized strings,
// shared frame dicts, 8-byte LONG1 time stamps) and JSON. Timed as CPU time in this process:
// reading and checking each form, the analysis (groups, alignment, EP mapping, tracker,
// diagnosis) and the HTML report; then `ep-actors diagnose --json --html` on a folder of
// each form, as a user runs it, with its CPU time, wall time and peak RSS.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { join } from 'node:path';
import type { BenchRow } from './harness.js';
import { readDump, type FrDump } from '../../sim/postmortem/flightRecorder.js';
import { analyzeDumps } from '../../sim/postmortem/analyze.js';
import { renderReport } from '../../sim/report/html.js';
import { cliPath } from '../paths.js';

const EP = 8;
const DP = Number(process.env.FR_DP ?? 64);
const RING = 2000;
const D = 64;
/** Python frames per entry (torch records the whole stack; a training step is a dozen deep or more). */
const FRAMES = 12;

type Value = null | boolean | number | bigint | string | Value[] | { tuple: Value[] } | { [k: string]: Value };

const frame = (name: string, filename: string, line: number) => ({ name, filename, line });
const STACK = Array.from({ length: FRAMES - 2 }, (_, i) => frame(i ? `forward_${i}` : 'train_step', i ? `/opt/job/model/block_${i}.py` : '/opt/job/train.py', 10 + 7 * i));
const CALL_SITES: Record<string, Value> = {};
/** One frames list per call site, its frame dicts shared across entries (torch memoizes them by pointer). */
function framesFor(op: string, line: number): Value {
  return (CALL_SITES[`${op}:${line}`] ??= [frame(op, '/usr/lib/python3/torch/distributed/distributed_c10d.py', 4000 + line), frame('ep_dispatch_and_compute', 'kempnerforge/distributed/expert_parallel.py', line), ...STACK]);
}

/** One rank's collectives over `steps` steps as a Flight Recorder dump keeps them (the newest RING), pickle-shaped (bigints, None, frames). */
function dumpValue(rank: number, steps: number): { [k: string]: Value } {
  const e = rank % EP;
  const d = Math.floor(rank / EP);
  const epName = String(1 + d);
  const dpName = String(1 + DP + e);
  const seq = new Map<string, number>();
  const entries: { [k: string]: Value }[] = [];
  const add = (pg: string, op: string, inp: number[][], out: number[][], line: number, dtype = 'Float') => {
    const s = (seq.get(pg) ?? 0) + 1;
    seq.set(pg, s);
    entries.push({
      frames: framesFor(op, line),
      record_id: entries.length,
      pg_id: Number(pg),
      process_group: { tuple: [pg, pg === epName ? 'mesh_ep' : 'mesh_dp'] },
      thread_name: 'pt_main_thread',
      thread_id: '140234567890',
      collective_seq_id: s,
      p2p_seq_id: 0,
      op_id: s,
      profiling_name: `nccl:${op}`,
      time_created_ns: 1_732_000_000_000_000_000n + BigInt(entries.length) * 1_000_003n + BigInt(rank),
      input_sizes: inp,
      input_dtypes: inp.map(() => dtype),
      output_sizes: out,
      output_dtypes: out.map(() => dtype),
      state: 'completed',
      time_discovered_started_ns: null,
      time_discovered_completed_ns: null,
      retired: true,
      timeout_ms: 600000,
      is_p2p: false,
    });
  };
  for (let step = 0; step < steps; step++) {
    const last = step === steps - 1;
    add(dpName, 'all_gather_into_tensor', [[4096]], [[4096 * DP]], 1);
    // Rank 1 receives nothing in the last step's layer 0; rank 0 takes its share.
    const recv = last && rank === 1 ? [0, 16] : last && rank === 0 ? [32, 16] : [16, 16];
    for (let l = 0; l < 2; l++) {
      add(epName, 'all_to_all', [[EP]], [[EP]], 120, 'Long');
      add(epName, 'all_to_all', [[16, D]], [[recv[l]!, D]], 131);
      add(epName, 'all_to_all', [[16, 1]], [[recv[l]!, 1]], 137, 'Long');
      add(epName, 'all_to_all', [[recv[l]!, D]], [[16, D]], 152);
    }
    for (let l = 1; l >= 0; l--) {
      add(epName, 'all_to_all', [[16, D]], [[recv[l]!, D]], 152);
      if (!(last && rank === 1 && l === 0)) add(epName, 'all_to_all', [[recv[l]!, D]], [[16, D]], 131);
    }
    if (!last) add(dpName, 'reduce_scatter_tensor', [[4096 * DP]], [[4096]], 2);
  }
  // The hang: the peers of rank 1 started layer 0's bwd.dispatch and wait there.
  const tail = entries[entries.length - 1]!;
  if (rank !== 1 && Math.floor(rank / EP) === 0) tail.state = 'started';
  const pgs = [epName, dpName];
  return {
    version: '2.8',
    comm_lib_version: '2.21.5',
    pg_config: Object.fromEntries(pgs.map((pg) => [pg, { name: pg, desc: pg === epName ? 'mesh_ep' : 'mesh_dp', ranks: `[${(pg === epName ? Array.from({ length: EP }, (_, k) => d * EP + k) : Array.from({ length: DP }, (_, k) => k * EP + e)).join(', ')}]` }])),
    pg_status: Object.fromEntries(pgs.map((pg) => [pg, { last_enqueued_collective: seq.get(pg)!, last_started_collective: seq.get(pg)!, last_completed_collective: seq.get(pg)! - 1 }])),
    entries: entries.slice(-RING),
  };
}

/** The JSON form (`_dump_nccl_trace_json`): no frames, 0 for unknown times, pg_status as strings. */
function jsonBytes(v: { [k: string]: Value }): Uint8Array {
  const text = JSON.stringify(v, (k, x: unknown) => {
    if (k === 'frames') return undefined;
    if (typeof x === 'bigint') return Number(x);
    if (x === null && k.startsWith('time_discovered')) return 0;
    if (x && typeof x === 'object' && 'tuple' in x) return (x as { tuple: Value[] }).tuple;
    if (typeof x === 'number' && k.startsWith('last_')) return String(x);
    return x;
  });
  return new TextEncoder().encode(text);
}

/**
 * Protocol 2 as torch's C++ pickler (torch::jit::Pickler, tag_aggregates off) writes it:
 * strings memoized by value (BINUNICODE + BINPUT, then BINGET), containers shared by
 * reference memoized after they are written, ints in the smallest of BININT1/BININT2/BININT
 * and 8-byte LONG1 beyond, dicts and lists as MARK … SETITEMS/APPENDS.
 */
function torchPickle(root: Value): Uint8Array {
  const refs = new Map<object, number>();
  const count = (v: Value) => {
    if (v === null || typeof v !== 'object') return;
    const n = (refs.get(v) ?? 0) + 1;
    refs.set(v, n);
    if (n > 1) return;
    for (const x of Array.isArray(v) ? v : 'tuple' in v && Array.isArray(v.tuple) ? v.tuple : Object.values(v)) count(x as Value);
  };
  count(root);
  let buf = Buffer.alloc(1 << 20);
  let n = 0;
  const room = (k: number) => {
    if (n + k <= buf.length) return;
    const bigger = Buffer.alloc(Math.max(buf.length * 2, n + k));
    buf.copy(bigger, 0, 0, n);
    buf = bigger;
  };
  const op = (...bytes: number[]) => {
    room(bytes.length);
    for (const b of bytes) buf[n++] = b;
  };
  let memo = 0;
  const put = () => {
    const id = memo++;
    if (id < 256) op(0x71, id);
    else (op(0x72), u32(id));
    return id;
  };
  const u32 = (x: number) => {
    room(4);
    n = buf.writeUInt32LE(x, n);
  };
  const get = (id: number) => (id < 256 ? op(0x68, id) : (op(0x6a), u32(id)));
  const strings = new Map<string, number>();
  const shared = new Map<object, number>();
  const int = (x: number | bigint) => {
    if (typeof x === 'number' && x >= 0 && x < 256) op(0x4b, x);
    else if (typeof x === 'number' && x >= 0 && x < 65536) (op(0x4d), room(2), (n = buf.writeUInt16LE(x, n)));
    else if (typeof x === 'number' && x >= -(2 ** 31) && x < 2 ** 31) (op(0x4a), room(4), (n = buf.writeInt32LE(x, n)));
    else (op(0x8a, 8), room(8), (n = buf.writeBigInt64LE(BigInt(x), n)));
  };
  const write = (v: Value): void => {
    if (v === null) return op(0x4e);
    if (typeof v === 'boolean') return op(v ? 0x88 : 0x89);
    if (typeof v === 'number' || typeof v === 'bigint') return int(v);
    if (typeof v === 'string') {
      const id = strings.get(v);
      if (id !== undefined) return get(id);
      const len = Buffer.byteLength(v);
      op(0x58);
      room(4 + len);
      buf.writeUInt32LE(len, n);
      n += 4 + buf.write(v, n + 4);
      strings.set(v, put());
      return;
    }
    const id = shared.get(v);
    if (id !== undefined) return get(id);
    if (Array.isArray(v)) {
      op(0x5d, 0x28);
      v.forEach(write);
      op(0x65);
    } else if ('tuple' in v && Array.isArray(v.tuple)) {
      v.tuple.forEach(write);
      op(0x84 + v.tuple.length);
    } else {
      op(0x7d, 0x28);
      for (const [k, x] of Object.entries(v)) (write(k), write(x));
      op(0x75);
    }
    if (refs.get(v)! > 1) shared.set(v, put());
  };
  op(0x80, 2);
  write(root);
  op(0x2e);
  return buf.subarray(0, n);
}

/** CPU time of one call (user + system, ms): on a loaded machine wall time says more about the neighbours. */
function cpuMs(fn: () => unknown): number {
  const c0 = process.cpuUsage();
  fn();
  const c = process.cpuUsage(c0);
  return (c.user + c.system) / 1000;
}

/** The median CPU time of `runs` calls. */
function medianCpuMs(fn: () => unknown, runs: number): number {
  const xs = Array.from({ length: runs }, () => cpuMs(fn)).sort((a, b) => a - b);
  return xs[Math.floor(runs / 2)]!;
}

const RSS_HOOK = 'data:text/javascript,process.on("exit",()=>{const u=process.resourceUsage();process.stderr.write("\\nbench_usage="+JSON.stringify([u.maxRSS,u.userCPUTime+u.systemCPUTime])+"\\n")})';

/** `ep-actors diagnose DIR --json --html` as a user runs it: exit code, verdict, wall and CPU ms, peak RSS MB. */
function diagnoseCli(dir: string, html: string): { verdict: string; wallMs: number; cpuMs: number; rssMb: number } {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, ['--import', RSS_HOOK, cliPath, 'diagnose', dir, '--json', '--html', html], { encoding: 'utf8', maxBuffer: 1 << 28, timeout: 600_000 });
  const wallMs = performance.now() - t0;
  const usage = /bench_usage=(\[.*\])/.exec(r.stderr ?? '');
  if (r.status !== 2 || !usage) throw new Error(`diagnose ${dir}: exit ${r.status} ${r.signal ?? ''}: ${(r.stderr ?? '').trim().split('\n')[0]}`);
  const [rssKb, cpuUs] = JSON.parse(usage[1]!) as [number, number];
  return { verdict: (JSON.parse(r.stdout) as { verdict: string }).verdict, wallMs, cpuMs: cpuUs / 1000, rssMb: rssKb / 1024 };
}

/** Every rank's dump in both forms (exported for profiling: `node --cpu-prof` on the CLI over these files). */
export function benchDumps(ranks = EP * DP): { json: Uint8Array[]; pickle: Uint8Array[] } {
  const steps = Math.ceil(RING / 14) + 2; // 14 collectives per step: the ring buffer overflows
  const json: Uint8Array[] = [];
  const pickle: Uint8Array[] = [];
  for (let r = 0; r < ranks; r++) {
    const v = dumpValue(r, steps);
    json.push(jsonBytes(v));
    pickle.push(torchPickle(v));
  }
  return { json, pickle };
}

export async function bench(): Promise<BenchRow[]> {
  const ranks = EP * DP;
  const what = `${ranks} ranks × ${RING} entries`;
  const { json, pickle } = benchDumps(ranks);
  const mb = (fs: Uint8Array[]) => (fs.reduce((a, f) => a + f.length, 0) / 1e6).toFixed(0);
  const readAll = (fs: Uint8Array[]) => fs.map((f, r) => readDump(f, `nccl_trace_rank_${r}`, r));
  const runs = Number(process.env.FR_RUNS ?? 3);

  // The heap the parsed dumps and the analysis keep, after collections (the runner passes no --expose-gc).
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  gc();
  const heap0 = process.memoryUsage().heapUsed;
  let dumps: FrDump[] = readAll(pickle);
  let pm = analyzeDumps(dumps);
  gc();
  const held = (process.memoryUsage().heapUsed - heap0) / 1e6;
  const readPickleMs = medianCpuMs(() => (dumps = readAll(pickle)), runs);
  const analyzeMs = medianCpuMs(() => (pm = analyzeDumps(dumps)), runs);
  const readJsonMs = medianCpuMs(() => (dumps = readAll(json)), runs);
  const d = pm.diagnosis;
  let html = '';
  const renderMs = medianCpuMs(() => (html = renderReport(pm.report)), runs);
  const verdict = `${d.verdict} on ${d.communicator} #${d.position} (seq ${pm.seq}), culprit ${d.culprits.join(', ')}`;
  const rows: BenchRow[] = [
    { name: `read and check the dumps, pickle (${what}, ${mb(pickle)} MB)`, value: readPickleMs, unit: 'ms', note: `median CPU time of ${runs}` },
    { name: `read and check the dumps, JSON (${what}, ${mb(json)} MB)`, value: readJsonMs, unit: 'ms', note: `median CPU time of ${runs}` },
    { name: `analyze: verdict and diagnosis (${what})`, value: analyzeMs, unit: 'ms', note: `median CPU time of ${runs}; ${verdict}; ${pm.ledger.length} ledger entries` },
    { name: `heap held by the dumps and the analysis (${what})`, value: held, unit: 'MB' },
    { name: `report render (${what})`, value: renderMs, unit: 'ms', note: `median CPU time of ${runs}; ${(Buffer.byteLength(html) / 1e6).toFixed(1)} MB of HTML, a window of ${pm.report.ledger.length} calls` },
  ];
  dumps = [];
  // The CLI on folders of files, as a user runs it.
  const dir = mkdtempSync(join(tmpdir(), 'fr-bench-'));
  try {
    for (const [form, files] of [['pickle', pickle], ['JSON', json]] as const) {
      const sub = join(dir, form);
      rmSync(sub, { recursive: true, force: true });
      spawnSync('mkdir', ['-p', sub]);
      files.forEach((f, r) => writeFileSync(join(sub, `nccl_trace_rank_${r}`), f));
      const c = diagnoseCli(sub, join(dir, `${form}.html`));
      const htmlMb = readFileSync(join(dir, `${form}.html`)).length / 1e6;
      rows.push({ name: `ep-actors diagnose --json --html, ${form} (${what})`, value: c.cpuMs, unit: 'ms', note: `CPU time; wall ${c.wallMs.toFixed(0)} ms; peak RSS ${c.rssMb.toFixed(0)} MB; verdict ${c.verdict}; ${htmlMb.toFixed(1)} MB of HTML` });
      rmSync(sub, { recursive: true, force: true });
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return rows;
}
