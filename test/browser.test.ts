// Reports and exports opened in a real browser, driven by playwright-core: the system's
// chromium when there is one, else the one npm installed (./chromium.ts decides).
// Every request the page makes is routed and fails the test unless it is a data: URL, so
// "no network at view time" is checked, not assumed. Screenshots go to test-artifacts/.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { rankMachine } from '../machines/rankMachine.js';
import { machineGraph, toMermaid, toScxml } from '../machines/exporters.js';
import { validateScenario } from '../machines/scenario.js';
import { reportFromDes } from '../sim/report/fromDes.js';
import { renderReport } from '../sim/report/html.js';
import { repoRoot } from './paths.js';
import { launchChromium } from './chromium.js';

// Page-side globals used inside evaluate(); the project compiles without the DOM library.
declare const getComputedStyle: (el: unknown) => { backgroundColor: string; stroke: string };
declare const scrollY: number;
declare const DOMParser: new () => { parseFromString(s: string, type: string): XmlDoc };
interface XmlEl {
  getAttribute(name: string): string | null;
  localName: string;
  namespaceURI: string | null;
}
interface XmlDoc {
  documentElement: XmlEl;
  querySelectorAll(sel: string): Iterable<XmlEl>;
  getElementsByTagName(name: string): ArrayLike<XmlEl> & Iterable<XmlEl>;
}

const artifacts = join(repoRoot, 'test-artifacts');
let browser: Browser | null = null;

async function launch(): Promise<Browser> {
  browser ??= await launchChromium();
  return browser;
}

interface Opened {
  page: Page;
  /** Console errors and uncaught exceptions, and every non-data: request the page tried. */
  errors: string[];
  requests: string[];
  close(): Promise<void>;
}

async function open(html: string, viewport = { width: 1400, height: 1000 }): Promise<Opened> {
  const context = await (await launch()).newContext({ viewport });
  const page = await context.newPage();
  const errors: string[] = [];
  const requests: string[] = [];
  page.on('console', (m) => m.type() === 'error' && errors.push(`console: ${m.text()}`));
  page.on('pageerror', (e) => errors.push(`page: ${e.message}`));
  page.on('request', (r) => !r.url().startsWith('data:') && requests.push(r.url()));
  await context.route('**/*', (route) => (route.request().url().startsWith('data:') ? route.continue() : route.abort()));
  await page.setContent(html, { waitUntil: 'load' });
  return { page, errors, requests, close: () => context.close() };
}

const starve4 = renderReport(reportFromDes(validateScenario({ ep: 4, routing: 'starve:1', variant: 'no-dispatch-edge' })));

test('starve report: diagram states, highlighted divergence, a lane per rank, no errors, no network', async () => {
  const { page, errors, requests, close } = await open(starve4);
  try {
    const svgText = await page.locator('svg.machine').textContent();
    for (const s of machineGraph(rankMachine).states.filter((s) => s.path)) assert.ok(svgText!.includes(s.key), `diagram shows ${s.key}`);

    const div = page.locator('#ledger tr.divergence');
    assert.is(await div.count(), 1);
    assert.is(await div.locator('th').textContent(), '5');
    const bg = (sel: string) => page.locator(sel).evaluate((el) => getComputedStyle(el).backgroundColor);
    assert.is.not(await bg('#ledger tr.divergence'), await bg('#ledger tbody tr:first-child'), 'the divergence row is coloured');
    assert.is(await div.locator('td.missing').getAttribute('data-r'), '1');

    assert.is(await page.locator('svg.timeline g.lane').count(), 4);
    assert.ok((await page.locator('svg.timeline line.join').count()) >= 5, 'matched collectives are joined across lanes');
    assert.ok((await page.locator('svg.timeline rect.hung').count()) === 3, 'ranks 0, 2, 3 hang in bwd.dispatch');
    assert.match((await page.locator('#waitfor').textContent())!, /ranks 0, 2, 3 wait in bwd\.dispatch/);

    // The culprit is picked first; its stop state (done) has the stop frame.
    const stroke = (path: string) => page.locator(`svg.machine g.st[data-path="${path}"] rect`).evaluate((el) => getComputedStyle(el).stroke);
    const stopColour = await stroke('done');
    assert.is.not(stopColour, await stroke('backward.dispatch'));
    await page.selectOption('#rank-pick', '0');
    assert.is(await stroke('backward.dispatch'), stopColour, 'picking rank 0 moves the stop frame to backward.dispatch');
    assert.match((await page.locator('#path-info').textContent())!, /rank 0: \d+ states visited, stopped in backward\.dispatch/);

    await page.locator('#heat-img').hover({ position: { x: 5, y: 5 } });
    assert.match((await page.locator('#heat-read').textContent())!, /rank 0 → EP rank 0: \d+ rows/);

    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, 'report-starve-ep4.png'), fullPage: true });
    // The README's picture (docs/report.png is a copy): ledger, timeline and wait-for graph.
    await page.setViewportSize({ width: 1000, height: 800 });
    await page.selectOption('#rank-pick', '1');
    // A full-page capture stitches viewports; the sticky header would land mid-picture.
    await page.addStyleTag({ content: 'header{position:static}' });
    const pageY = (sel: string) => page.locator(sel).evaluate((el) => {
      const r = (el as unknown as { getBoundingClientRect(): { top: number; bottom: number } }).getBoundingClientRect();
      return { top: r.top + scrollY, bottom: r.bottom + scrollY };
    });
    const [from, to] = [await pageY('#ledger'), await pageY('#waitfor')];
    await page.screenshot({ path: join(artifacts, 'report-summary.png'), fullPage: true, clip: { x: 0, y: from.top - 8, width: 1000, height: to.bottom - from.top + 16 } });
    assert.equal(errors, []);
    assert.equal(requests, []);
  } finally {
    await close();
  }
});

test('ep=64 starve report renders completely: 64 lanes, the diagram, the ledger', async () => {
  const input = reportFromDes(validateScenario({ ep: 64, experts: 128, routing: 'starve:1', variant: 'no-dispatch-edge' }));
  const { page, errors, requests, close } = await open(renderReport(input));
  try {
    assert.is(await page.locator('svg.timeline g.lane').count(), 64);
    assert.is(await page.locator('svg.timeline g.lane rect:not(.bg)').count(), input.trace.length);
    assert.ok((await page.locator('svg.machine g.st').count()) >= machineGraph(rankMachine).states.filter((s) => s.kind === 'atomic' || s.kind === 'final').length);
    assert.is(await page.locator('#ledger table.ledger thead th[data-r]').count(), 64);
    assert.is(await page.locator('#ledger tr.divergence td.missing').count(), 1);
    assert.is(await page.locator('#ledger tbody tr').count(), 6);
    for (const id of ['diagnosis', 'machine', 'ledger', 'timeline', 'waitfor', 'load']) {
      const box = await page.locator(`#${id}`).boundingBox();
      assert.ok(box && box.height > 40 && box.width > 200, `section ${id} is laid out`);
    }
    // The heatmap image decoded: a PNG the browser could not read has no natural size.
    assert.ok(await page.locator('#heat-img').evaluate((el) => (el as unknown as { getBBox(): { width: number } }).getBBox().width > 0));
    assert.match((await page.locator('#diagnosis .cause').textContent())!, /ranks 0, 2–63 wait in bwd\.dispatch/);
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, 'report-starve-ep64.png'), fullPage: true });
    assert.equal(errors, []);
    assert.equal(requests, []);
  } finally {
    await close();
  }
});

test("Mermaid's own parser accepts the export and renders every state", async () => {
  const text = toMermaid(machineGraph(rankMachine));
  const { page, errors, requests, close } = await open('<!DOCTYPE html><html><body><div id="out"></div></body></html>');
  try {
    await page.addScriptTag({ path: join(repoRoot, 'node_modules', 'mermaid', 'dist', 'mermaid.min.js') });
    const result = await page.evaluate(async (src) => {
      const m = (globalThis as unknown as { mermaid: { initialize(o: object): void; parse(t: string): Promise<unknown>; render(id: string, t: string): Promise<{ svg: string }> } }).mermaid;
      m.initialize({ startOnLoad: false, securityLevel: 'strict' });
      const parsed = await m.parse(src);
      let rejected = false;
      try {
        await m.parse('stateDiagram-v2\n  a --> : :');
      } catch {
        rejected = true;
      }
      const { svg } = await m.render('machine', src);
      return { parsed: !!parsed, rejected, svg };
    }, text);
    assert.ok(result.parsed);
    assert.ok(result.rejected, 'the parser rejects a broken diagram, so acceptance means something');
    for (const key of ['dispatchChoice', 'expertIds', 'layerStart', 'aborted']) assert.ok(result.svg.includes(key), key);
    assert.equal(errors, []);
    assert.equal(requests, []);
  } finally {
    await close();
  }
});

test("the browser's DOMParser reads the SCXML and finds every target", async () => {
  const { page, close } = await open('<!DOCTYPE html><html><body></body></html>');
  try {
    const r = await page.evaluate((src) => {
      const doc = new DOMParser().parseFromString(src, 'application/xml');
      const ids = new Set([...doc.querySelectorAll('[id]')].map((e) => e.getAttribute('id')));
      const targets = [...doc.getElementsByTagName('transition')].flatMap((t) => (t.getAttribute('target') ?? '').split(' ').filter(Boolean));
      return { error: doc.getElementsByTagName('parsererror').length, root: doc.documentElement.localName, ns: doc.documentElement.namespaceURI, missing: targets.filter((t) => !ids.has(t)), targets: targets.length };
    }, toScxml(machineGraph(rankMachine)));
    assert.is(r.error, 0);
    assert.is(r.root, 'scxml');
    assert.is(r.ns, 'http://www.w3.org/2005/07/scxml');
    assert.ok(r.targets > 20);
    assert.equal(r.missing, []);
  } finally {
    await close();
  }
});

test.after(async () => {
  await browser?.close();
});

test.run();
