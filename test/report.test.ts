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
import { waitForGraph } from '../sim/report/sections.js';
import { cliPath } from './paths.js';

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
  assert.match(html, /ranks 0, 2, 3 wait in bwd\.dispatch \(ep #5\) for rank 1 \(in done\)/);
});

test('the wait-for graph groups ranks in the same situation', () => {
  const big = reportFromDes(validateScenario({ ep: 16, experts: 32, routing: 'starve:3', variant: 'no-dispatch-edge' }));
  const { groups, edges } = waitForGraph(big);
  assert.is(groups.length, 2);
  assert.equal(groups.find((g) => g.kind === 'free')!.ranks, [3]);
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

test.run();
