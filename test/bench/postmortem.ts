// `diagnose` at the size real jobs dump: 512 ranks (dp=64 × ep=8, two MoE layers, FSDP on
// the dp groups), each ring buffer full at its default 2,000 entries, the zero-token hazard
// in the last step (one rank never issues layer 0's bwd.dispatch). Timed: the dumps as JSON
// bytes read and checked, the analysis (groups, alignment, EP mapping, tracker, diagnosis),
// and the HTML report; the heap the parsed dumps and the analysis hold.
import type { BenchRow } from './harness.js';
import { time } from './harness.js';
import { readDump, type FrDump } from '../../sim/postmortem/flightRecorder.js';
import { analyzeDumps } from '../../sim/postmortem/analyze.js';
import { renderReport } from '../../sim/report/html.js';

const EP = 8;
const DP = Number(process.env.FR_DP ?? 64);
const RING = 2000;
const D = 64;

/** One rank's collectives over `steps` steps as a Flight Recorder JSON dump keeps them (the newest RING). */
function dumpBytes(rank: number, steps: number): Uint8Array {
  const e = rank % EP;
  const d = Math.floor(rank / EP);
  const epName = String(1 + d);
  const dpName = String(1 + DP + e);
  const seq = new Map<string, number>();
  const entries: Record<string, unknown>[] = [];
  const add = (pg: string, op: string, inp: number[][], out: number[][], dtype = 'Float') => {
    const s = (seq.get(pg) ?? 0) + 1;
    seq.set(pg, s);
    entries.push({
      record_id: entries.length,
      pg_id: Number(pg),
      process_group: [pg, pg === epName ? 'mesh_ep' : 'mesh_dp'],
      collective_seq_id: s,
      p2p_seq_id: 0,
      op_id: s,
      profiling_name: `nccl:${op}`,
      time_created_ns: 1.732e18 + entries.length * 1e6,
      input_sizes: inp,
      input_dtypes: inp.map(() => dtype),
      output_sizes: out,
      output_dtypes: out.map(() => dtype),
      state: 'completed',
      time_discovered_started_ns: 0,
      time_discovered_completed_ns: 0,
      retired: true,
      timeout_ms: 600000,
      is_p2p: false,
    });
  };
  for (let step = 0; step < steps; step++) {
    const last = step === steps - 1;
    add(dpName, 'all_gather_into_tensor', [[4096]], [[4096 * DP]]);
    // Rank 1 receives nothing in the last step's layer 0; rank 0 takes its share.
    const recv = last && rank === 1 ? [0, 16] : last && rank === 0 ? [32, 16] : [16, 16];
    for (let l = 0; l < 2; l++) {
      add(epName, 'all_to_all', [[EP]], [[EP]], 'Long');
      add(epName, 'all_to_all', [[16, D]], [[recv[l]!, D]]);
      add(epName, 'all_to_all', [[16, 1]], [[recv[l]!, 1]], 'Long');
      add(epName, 'all_to_all', [[recv[l]!, D]], [[16, D]]);
    }
    for (let l = 1; l >= 0; l--) {
      add(epName, 'all_to_all', [[16, D]], [[recv[l]!, D]]);
      if (!(last && rank === 1 && l === 0)) add(epName, 'all_to_all', [[recv[l]!, D]], [[16, D]]);
    }
    if (!last) add(dpName, 'reduce_scatter_tensor', [[4096 * DP]], [[4096]]);
  }
  // The hang: the peers of rank 1 started layer 0's bwd.dispatch and wait there.
  const tail = entries[entries.length - 1]!;
  if (rank !== 1 && Math.floor(rank / EP) === 0) tail.state = 'started';
  const kept = entries.slice(-RING);
  const pgs = [epName, dpName];
  return new TextEncoder().encode(
    JSON.stringify({
      version: '2.8',
      comm_lib_version: '2.21.5',
      pg_config: Object.fromEntries(pgs.map((pg) => [pg, { name: pg, desc: pg === epName ? 'mesh_ep' : 'mesh_dp', ranks: `[${(pg === epName ? Array.from({ length: EP }, (_, k) => d * EP + k) : Array.from({ length: DP }, (_, k) => k * EP + e)).join(', ')}]` }])),
      pg_status: {},
      entries: kept,
    }),
  );
}

/** CPU time of one call (user + system, ms): on a loaded machine wall time says more about the neighbours. */
function cpuMs(fn: () => unknown): number {
  const c0 = process.cpuUsage();
  fn();
  const c = process.cpuUsage(c0);
  return (c.user + c.system) / 1000;
}

export async function bench(): Promise<BenchRow[]> {
  const ranks = EP * DP;
  const steps = Math.ceil(RING / 14) + 2; // 14 collectives per step: the ring buffer overflows
  const files = Array.from({ length: ranks }, (_, r) => dumpBytes(r, steps));
  const mb = files.reduce((a, f) => a + f.length, 0) / 1e6;
  const heap0 = process.memoryUsage().heapUsed;
  let dumps: FrDump[] = [];
  const readCpu = cpuMs(() => (dumps = files.map((f, r) => readDump(f, `nccl_trace_rank_${r}`, r))));
  let pm = analyzeDumps(dumps);
  const held = (process.memoryUsage().heapUsed - heap0) / 1e6;
  const analyzeCpu = cpuMs(() => (pm = analyzeDumps(dumps)));
  const d = pm.diagnosis;
  const read = await time(() => (dumps = files.map((f, r) => readDump(f, `nccl_trace_rank_${r}`, r))), 1, 0);
  const analyze = await time(() => analyzeDumps(dumps), 1, 0);
  const html = renderReport(pm.report);
  const render = await time(() => renderReport(pm.report), 1, 0);
  const what = `${ranks} ranks × ${RING} entries`;
  return [
    { name: `read and check the dumps (${what}, ${mb.toFixed(0)} MB of JSON)`, value: read.medianMs, unit: 'ms', note: `${readCpu.toFixed(0)} ms of CPU` },
    { name: `analyze: verdict and diagnosis (${what})`, value: analyze.medianMs, unit: 'ms', note: `${analyzeCpu.toFixed(0)} ms of CPU; ${d.verdict} on ${d.communicator} #${d.position} (seq ${pm.seq}), culprit ${d.culprits.join(', ')}; ${pm.ledger.length} ledger entries` },
    { name: `heap held by the dumps and the analysis (${what})`, value: held, unit: 'MB' },
    { name: `report render (${what})`, value: render.medianMs, unit: 'ms', note: `${(Buffer.byteLength(html) / 1e6).toFixed(1)} MB of HTML, a window of ${pm.report.ledger.length} calls` },
  ];
}
