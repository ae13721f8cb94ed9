import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { validateScenario } from '../machines/scenario.js';
import { reportFromDes } from '../sim/report/fromDes.js';
import { renderReport } from '../sim/report/html.js';
import { fromTraceFile, toTraceFile } from '../sim/report/input.js';
import { waitForGraph } from '../sim/report/waitfor.js';
import { timeAxis } from '../sim/report/timeline.js';
import { avoidance } from '../sim/report/sections.js';
import { CORPUS } from '../sim/corpus/index.js';
import { VARIANT_NAMES } from '../machines/variants.js';
import { machineGraph } from '../machines/exporters.js';
import { rankMachine } from '../machines/rankMachine.js';
import { runActors, reportFromRun } from '../actors/supervisor.js';
import { analyzeDumps } from '../sim/postmortem/analyze.js';
import { readDump } from '../sim/postmortem/flightRecorder.js';
import { readdirSync } from 'node:fs';
import type { ReportInput } from '../machines/record.js';
import type { TraceEvent } from '../machines/spans.js';
import { cliPath, repoRoot } from './paths.js';

const starve = validateScenario({ ep: 4, routing: 'starve:1', variant: 'no-dispatch-edge' });
const input = reportFromDes(starve);
const html = renderReport(input);

test('reportFromDes records every rank path from the initial state to where it stopped', () => {
  assert.is(input.paths.length, 4);
  for (const p of input.paths) assert.is(p[0], 'forward.route');
  // Rank 1 received nothing, passed the dispatch choice without bwd.dispatch and finished.
  const p1 = input.paths[1]!;
  assert.is(p1[p1.length - 1], 'done');
  assert.ok(p1.includes('backward.dispatchChoice'), 'eventless choice states are on the path');
  assert.not.ok(p1.includes('backward.dispatch'));
  for (const r of [0, 2, 3]) assert.is(input.paths[r]![input.paths[r]!.length - 1], 'backward.dispatch');
});

test('routing is summed per source and destination, and the starved rank gets nothing', () => {
  const { sendRows, rowsPerExpert } = input.routing;
  assert.is(sendRows.length, 4);
  for (const row of sendRows) {
    assert.is(row[1], 0);
    assert.is(row.reduce((a, b) => a + b, 0), starve.tokens * starve.topK);
  }
  // 8 experts over 4 ranks: rank 1 owns experts 2 and 3.
  assert.is(rowsPerExpert[2], 0);
  assert.is(rowsPerExpert[3], 0);
  assert.is(rowsPerExpert.reduce((a, b) => a + b, 0), 4 * starve.tokens * starve.topK);
});

test('simulated time from the engine: matched collectives end together, a hung one runs to the end', () => {
  const trace = input.trace;
  assert.is(trace.length, input.ledger.length);
  // Ends compared to the nanosecond: ts and dur are each rounded µs floats.
  const end = (e: (typeof trace)[number]) => Math.round((e.ts + e.dur) * 1000);
  const slot = (c: string, p: number) => trace.filter((e) => e.args.communicator === c && e.args.position === p);
  for (let p = 0; p < 5; p++) assert.is(new Set(slot('ep', p).map(end)).size, 1, `position ${p}`);
  const hung = slot('ep', 5);
  assert.equal(hung.map((e) => e.tid).sort(), [0, 2, 3]);
  assert.is(Math.min(...hung.map(end)), Math.max(...trace.map(end)));
  // A rank starts its next collective only after its previous one ended.
  for (let r = 0; r < 4; r++) {
    const mine = trace.filter((e) => e.tid === r);
    for (let i = 1; i < mine.length; i++) assert.ok(Math.round(mine[i]!.ts * 1000) >= end(mine[i - 1]!));
  }
});

test('the report marks the first divergence: ep position 5, where rank 1 never issued', () => {
  const row = /<tr class="divergence" id="first-divergence"><th>5<\/th>(.*?)<\/tr>/.exec(html);
  assert.ok(row, 'divergence row for position 5');
  const cells = [...row![1]!.matchAll(/<td data-r="(\d+)" class="([^"]*)"/g)].map((m) => [Number(m[1]), m[2]]);
  assert.equal(cells.map(([r]) => r), [0, 1, 2, 3]);
  assert.is(cells[1]![1], 'missing');
  assert.is((html.match(/class="divergence"/g) ?? []).length, 1);
});

test('the report is self-contained: no external URL, one lane per rank, the diagnosis in words', () => {
  const urls = [...html.matchAll(/(?:src|href)="([^"#][^"]*)"/g)].map((m) => m[1]!);
  assert.ok(urls.every((u) => u.startsWith('data:')), `external references: ${urls.filter((u) => !u.startsWith('data:')).join(', ')}`);
  assert.not.match(html, /<link\b|@import|url\((?!#)/);
  assert.is((html.match(/<g class="lane" data-r=/g) ?? []).length, 4);
  assert.match(html, /rank 1 received 0 rows in layer 0/i);
  assert.match(html, /ranks 0, 2, 3 wait in bwd\.dispatch \(ep #5\) for rank 1 \(finished, in done\)/);
});

test('the wait-for graph groups ranks in the same situation', () => {
  const big = reportFromDes(validateScenario({ ep: 16, experts: 32, routing: 'starve:3', variant: 'no-dispatch-edge' }));
  const { groups, edges } = waitForGraph(big);
  assert.is(groups.length, 2);
  assert.equal(groups.find((g) => g.kind === 'finished')!.ranks, [3]);
  assert.is(groups.find((g) => g.kind === 'waits')!.ranks.length, 15);
  assert.is(edges.length, 1);
  assert.match(renderReport(big), /ranks 0–2, 4–15 wait in bwd\.dispatch/);
});

test('a mismatch shows both sides stuck on each other', () => {
  const mm = reportFromDes(validateScenario({ ep: 4, dp: 2, fsdp: 'split', layers: 2, routing: 'starve:1', variant: 'no-unused-expert-grads', packed: false }));
  assert.is(mm.diagnosis.verdict, 'mismatch');
  const { groups, edges } = waitForGraph(mm);
  const stuck = groups.filter((g) => g.kind === 'mismatch');
  assert.is(stuck.length, 2);
  const [a, b] = stuck.map((g) => groups.indexOf(g));
  assert.ok(edges.some(([x, y]) => x === a && y === b) && edges.some(([x, y]) => x === b && y === a));
});

test('a clean run reports ok with nothing waiting and no divergence', () => {
  const ok = reportFromDes(validateScenario({ ep: 4, routing: 'uniform', variant: 'seed' }));
  assert.is(ok.diagnosis.verdict, 'ok');
  const page = renderReport(ok);
  assert.not.match(page, /class="divergence"/);
  assert.match(page, /Nothing waits/);
  for (const p of ok.paths) assert.is(p[p.length - 1], 'done');
});

test('the trace file is a Chrome trace carrying the report input, and viz report reads it', () => {
  const file = toTraceFile(input);
  assert.ok(file.traceEvents.some((e) => e.ph === 'M' && e.args.name === 'rank 3'), 'lanes are named for Perfetto');
  const back = fromTraceFile(JSON.parse(JSON.stringify(file)));
  assert.equal(back.trace, JSON.parse(JSON.stringify(input.trace)));
  assert.equal(back.paths, input.paths);
  assert.throws(() => fromTraceFile({ traceEvents: [] }, 't.json'), /t\.json: no epActors object/);

  const dir = mkdtempSync(join(tmpdir(), 'ep-report-'));
  try {
    writeFileSync(join(dir, 't.json'), JSON.stringify(file));
    const run = spawnSync(process.execPath, [cliPath, 'viz', 'report', join(dir, 't.json'), '--html', join(dir, 'r.html')], { encoding: 'utf8' });
    assert.is(run.status, 0, run.stderr);
    assert.match(run.stdout, /KiB/);
    assert.is(readFileSync(join(dir, 'r.html'), 'utf8'), renderReport(back));
    writeFileSync(join(dir, 'plain.json'), JSON.stringify({ traceEvents: [] }));
    const bad = spawnSync(process.execPath, [cliPath, 'viz', 'report', join(dir, 'plain.json'), '--html', join(dir, 'x.html')], { encoding: 'utf8' });
    assert.is(bad.status, 1);
    assert.match(bad.stderr, /no epActors object/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

const FINAL = new Set(machineGraph(rankMachine).states.filter((st) => st.kind === 'final').map((st) => st.path));

/**
 * Every rank the diagnosis places in a collective (an op, not a final state) has exactly
 * one never-completed span, its lane's last, of that op; no other rank has one.
 */
function assertPendingPerWaitingRank(input: ReportInput, what: string) {
  const waiting = input.diagnosis.ranks.filter((r) => r.op !== null && !FINAL.has(r.state));
  assert.ok(waiting.length > 0, `${what}: some rank waits`);
  for (const r of input.diagnosis.ranks) {
    const lane = input.trace.filter((e) => e.tid === r.rank).sort((a, b) => a.ts - b.ts);
    const open = lane.filter((e) => e.args.completed === false);
    if (!waiting.includes(r)) {
      assert.is(open.length, 0, `${what}: rank ${r.rank} (${r.state}) has no pending span`);
      continue;
    }
    assert.is(open.length, 1, `${what}: rank ${r.rank} waits in ${r.op} and has one pending span`);
    assert.is(open[0]!.name, r.op, `${what}: rank ${r.rank}'s pending span is its op`);
    assert.is(open[0], lane.at(-1), `${what}: rank ${r.rank}'s pending span is its last`);
  }
}

test('every waiting rank has its pending collective in the data: every corpus class, ep=64, the worker runtime, a Flight Recorder dump', async () => {
  for (const c of CORPUS) assertPendingPerWaitingRank(reportFromDes(c.scenario), c.name);
  assertPendingPerWaitingRank(reportFromDes(validateScenario({ ep: 64, experts: 128, routing: 'starve:1', variant: 'no-dispatch-edge' })), 'ep=64 starve');
  const run = await runActors(starve);
  assertPendingPerWaitingRank(reportFromRun(starve, run), 'worker runtime ep=4 starve');
  const dir = join(repoRoot, 'test', 'fixtures', 'flight-recorder', 'zero-token');
  const dumps = readdirSync(dir).map((f) => readDump(readFileSync(join(dir, f)), f, Number(/(\d+)$/.exec(f)![1])));
  const fr = analyzeDumps(dumps).report;
  assert.equal(fr.trace.filter((e) => e.args.completed === false).map((e) => e.tid).sort(), [0, 2, 3], 'the dump: ranks 0, 2, 3 never completed bwd.dispatch');
});

test('the timeline draws one hatched block per pending span and joins only collectives every member completed', () => {
  // second-stream: every rank issued position 3, with different ops, and none completed it.
  const mismatch = CORPUS.find((c) => c.scenario.variant === 'second-stream')!;
  const mm = reportFromDes(mismatch.scenario);
  const pending = mm.trace.filter((e) => e.args.completed === false);
  assert.is(pending.length, 4);
  const page = /<svg[^>]*class="timeline".*?<\/svg>/s.exec(renderReport(mm))![0];
  assert.is((page.match(/<rect class="op-[^"]* hung"/g) ?? []).length, pending.length);
  const slots = new Set(mm.trace.map((e) => `${e.args.communicator}#${e.args.position}`));
  const open = new Set(pending.map((e) => `${e.args.communicator}#${e.args.position}`));
  assert.is((page.match(/<line class="join"/g) ?? []).length, slots.size - open.size, 'no join line for the mismatched position');
});

test('the time axis folds start-up: the step gets the width, early ranks show the wait', () => {
  const span = (tid: number, ts: number, dur: number, completed = true): TraceEvent => ({ name: 'fwd.counts', ph: 'X', ts, dur, pid: 0, tid, args: { communicator: 'ep', position: 0, layer: 0, microBatch: 0, ...(completed ? {} : { completed: false as const }) } });
  // Rank 1's worker started late: rank 0 waited 900 µs in its first collective.
  const slow = timeAxis([span(0, 0, 905), span(1, 900, 5), { ...span(0, 905, 95, false), name: 'fwd.dispatch' }, { ...span(1, 905, 95), name: 'fwd.dispatch' }]);
  assert.ok(slow.folded);
  assert.is(slow.step, 900);
  assert.ok(slow.open, 'a pending span opens the right end');
  const startUp = slow.x(900) - slow.x(0);
  const step = slow.x(1000) - slow.x(900);
  assert.ok(step > 8 * startUp, `the step (${step} px) gets the width, not the start-up (${startUp} px)`);
  assert.ok(slow.right > slow.x(1000), 'pending blocks run past the run end');
  // The discrete-event engine has no start-up: nothing is folded.
  const des = timeAxis(input.trace);
  assert.not.ok(des.folded);
  assert.is(des.step, des.t0);
});

test('the timeline legend names each collective kind drawn in its colour, the pending hatch and the join', () => {
  const dp = reportFromDes(validateScenario({ ep: 4, dp: 2, fsdp: 'split', layers: 2, routing: 'starve:1', variant: 'no-unused-expert-grads', packed: false }));
  const page = renderReport(dp);
  const legend = /<p class="legend tl-legend" id="timeline-legend">(.*?)<\/p>/.exec(page)![1]!;
  const names = [...legend.matchAll(/data-legend="([^"]+)"/g)].map((m) => m[1]);
  const drawn = new Set(dp.trace.filter((e) => e.args.completed !== false).map((e) => e.name));
  for (const op of drawn) assert.ok(names.includes(op), `legend has ${op}`);
  assert.ok(names.includes('fsdp.all_gather') && names.includes('fsdp.reduce_scatter'));
  assert.ok(names.includes('pending') && names.includes('join') && names.includes('work'));
  assert.is(names.filter((nm) => !['pending', 'join', 'work', 'fold'].includes(nm!)).length, drawn.size, 'no kind that is not drawn');
});

test('a rank still computing is drawn as computing, not as a blocker (kernel-hang at ep=4 and ep=64)', () => {
  for (const s of [{ ep: 4 }, { ep: 64, experts: 128 }]) {
    const kh = reportFromDes(validateScenario({ ...s, routing: 'starve:1', variant: 'kernel-hang' }));
    assert.is(kh.diagnosis.verdict, 'stall');
    const { groups, edges } = waitForGraph(kh);
    const computing = groups.findIndex((g) => g.kind === 'computing');
    assert.equal(groups[computing]!.ranks, [1]);
    assert.match(groups[computing]!.label, /computing, never returns: in backward\.kernelHung/);
    assert.not.ok(groups.some((g) => g.kind === 'finished'), 'nothing is drawn as finished');
    const waits = groups.findIndex((g) => g.kind === 'waits');
    assert.is(groups[waits]!.ranks.length, s.ep - 1);
    assert.equal(edges, [[waits, computing]]);
    const page = renderReport(kh);
    assert.match(page, /<g class="wf computing culprit"/);
    assert.match(page, /<path class="wfe arrives"/, 'the arrow to a computing rank is drawn as such');
  }
});

test("the words name the ranks each box waits on, not every rank drawn in their box (stage-metric: two pipeline groups)", () => {
  const c = CORPUS.find((k) => k.scenario.variant === 'stage-metric')!;
  const sm = reportFromDes(c.scenario);
  const { groups } = waitForGraph(sm);
  const finished = groups.filter((g) => g.kind === 'finished');
  assert.is(finished.length, 1, 'the finished ranks of both groups share a box');
  const page = renderReport(sm);
  for (const g of groups.filter((k) => k.kind === 'waits')) {
    assert.ok(g.on.length > 0 && g.on.length < finished[0]!.ranks.length, 'each waits on some of the box');
    const line = new RegExp(`<li>ranks ${g.ranks.join(', ')} wait in [^<]* for ranks ${g.on.join(', ')} \\(finished, in done\\)</li>`);
    assert.match(page, line);
  }
});

test('a mismatch in sizes only is one box stuck on itself, not one box per rank (layer-metric at ep=64)', () => {
  const mm = reportFromDes(validateScenario({ ep: 64, experts: 128, layers: 2, routing: 'empty:2', variant: 'layer-metric' }));
  assert.is(mm.diagnosis.verdict, 'mismatch');
  const { groups, edges } = waitForGraph(mm);
  assert.is(groups.length, 1);
  assert.is(groups[0]!.ranks.length, 64);
  assert.equal(edges, [[0, 0]]);
  assert.match(renderReport(mm), /ranks 0–63 issued metric\.all_reduce \(ep #\d+\), with sizes that do not match one another/);
});

test('the title names the whole layout: ep, dp, FSDP wrap, layers, micro-batches, routing, variant', () => {
  const s = validateScenario({ ep: 4, dp: 2, fsdp: 'split', layers: 2, microBatches: 2, routing: 'starve:1', variant: 'no-unused-expert-grads', packed: false });
  const title = /<title>(.*?)<\/title>/.exec(renderReport(reportFromDes(s)))![1]!;
  for (const part of ['ep=4', 'dp=2', 'FSDP wrap split', '2 layers', '2 micro-batches', 'routing starve:1', 'variant no-unused-expert-grads']) assert.ok(title.includes(part), `title "${title}" names ${part}`);
  assert.match(/<title>(.*?)<\/title>/.exec(html)![1]!, /ep=4, dp=1, no FSDP, 1 layer, 1 micro-batch/);
});

test('every hazard class says how real code avoids it: one line per class, from the corpus, none on a clean run', () => {
  for (const v of VARIANT_NAMES.filter((v) => v !== 'seed')) assert.ok(CORPUS.some((c) => c.scenario.variant === v), `variant ${v} has a class in the corpus, with its fix`);
  for (const c of CORPUS) {
    const page = renderReport(reportFromDes(c.scenario));
    const lines = [...page.matchAll(/<p class="fix"><b>How real code avoids it:<\/b> (.*?)\. <span/g)];
    assert.is(lines.length, 1, c.name);
    assert.is(avoidance(c.scenario, c.expected), c, `${c.name}: its own class is the one picked`);
    assert.is(lines[0]![1], c.fix.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;'), c.name);
  }
  assert.not.match(renderReport(reportFromDes(validateScenario({ ep: 4, routing: 'uniform', variant: 'seed' }))), /class="fix"/);
});

test.run();
