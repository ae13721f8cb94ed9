// The HTML report as a reader sees it, in a real browser driven by playwright-core (the
// system's chromium when there is one, else the one npm installed: ./chromium.ts): every waiting rank's pending block drawn and visible, the timeline's
// legend in the timeline's own colours, no wait-for box clipped or overlapping at ep=64,
// the layout in the title, a computing rank drawn as computing. Screenshots go to
// test-artifacts/.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Browser, Locator, Page } from 'playwright-core';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { reportFromDes } from '../sim/report/fromDes.js';
import { renderReport } from '../sim/report/html.js';
import { runActors, reportFromRun } from '../actors/supervisor.js';
import { repoRoot } from './paths.js';
import { launchChromium } from './chromium.js';

// Page-side global used inside evaluate(); the project compiles without the DOM library.
declare const getComputedStyle: (el: unknown) => { fill: string; strokeDasharray: string };

const artifacts = join(repoRoot, 'test-artifacts');
let browser: Browser | null = null;

async function launch(): Promise<Browser> {
  browser ??= await launchChromium();
  return browser;
}

const VIEWPORT = { width: 1400, height: 1000 };

/** Opens `html` and hands the page to `body`; page errors fail the test. */
async function withPage(html: string, shot: string, body: (page: Page) => Promise<void>): Promise<void> {
  const context = await (await launch()).newContext({ viewport: VIEWPORT });
  const page = await context.newPage();
  const errors: string[] = [];
  page.on('pageerror', (e) => errors.push(e.message));
  page.on('console', (m) => m.type() === 'error' && errors.push(m.text()));
  try {
    await page.setContent(html, { waitUntil: 'load' });
    await body(page);
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, `report-${shot}.png`), fullPage: true });
    assert.equal(errors, []);
  } finally {
    await context.close();
  }
}

const des = (s: Partial<Scenario>) => renderReport(reportFromDes(validateScenario(s)));
const box = async (l: Locator) => (await l.boundingBox())!;

/** Ranks whose lane holds a hatched block at least `minPx` wide on screen. */
async function ranksWithVisiblePending(page: Page, minPx: number): Promise<number[]> {
  const out: number[] = [];
  for (const lane of await page.locator('svg.timeline g.lane').all()) {
    const hung = lane.locator('rect.hung');
    if ((await hung.count()) === 0) continue;
    assert.is(await hung.count(), 1, 'one pending block per lane');
    if ((await box(hung)).width >= minPx) out.push(Number(await lane.getAttribute('data-r')));
  }
  return out;
}

const starve4 = validateScenario({ ep: 4, routing: 'starve:1', variant: 'no-dispatch-edge' });
const starve64 = { ep: 64, experts: 128, routing: 'starve:1', variant: 'no-dispatch-edge' } as const;

test('ep=4 starve:1 no-dispatch-edge: ranks 0, 2, 3 each show a visible pending block (engine and worker runtime); start-up folded', async () => {
  await withPage(renderReport(reportFromDes(starve4)), 'pending-ep4-des', async (page) => {
    assert.equal(await ranksWithVisiblePending(page, 20), [0, 2, 3]);
  });
  const run = reportFromRun(starve4, await runActors(starve4));
  await withPage(renderReport(run), 'pending-ep4-runtime', async (page) => {
    assert.equal(await ranksWithVisiblePending(page, 20), [0, 2, 3]);
    // Worker start-up (hundreds of ms against a step of tens) is folded into a narrow band.
    const svg = await box(page.locator('svg.timeline'));
    const fold = page.locator('svg.timeline rect.fold');
    assert.is(await fold.count(), 1, 'the start-up band is drawn');
    assert.ok((await box(fold)).width < 0.1 * svg.width, 'the band is narrow');
    const firstJoin = await box(page.locator('svg.timeline line.join').first());
    assert.ok(firstJoin.x >= (await box(fold)).x + (await box(fold)).width - 1, 'the step starts right of the band');
  });
});

test('ep=64 starve:1: all 63 waiting ranks show a visible pending block, rank 1 none', async () => {
  await withPage(des(starve64), 'pending-ep64', async (page) => {
    assert.equal(await ranksWithVisiblePending(page, 20), Array.from({ length: 64 }, (_, r) => r).filter((r) => r !== 1));
  });
});

test("the timeline's legend is shown and its swatches have the timeline's colours", async () => {
  await withPage(des({ ep: 4, dp: 2, fsdp: 'split', layers: 2, routing: 'starve:1', variant: 'no-unused-expert-grads', packed: false }), 'legend-dp2', async (page) => {
    const legend = page.locator('#timeline #timeline-legend');
    assert.ok(await legend.isVisible());
    const fill = (l: Locator) => l.evaluate((el) => getComputedStyle(el).fill);
    const ops = await legend.locator('[data-legend]').evaluateAll((els) => els.map((e) => (e as unknown as { getAttribute(n: string): string }).getAttribute('data-legend')));
    assert.ok(ops.includes('fsdp.all_gather') && ops.includes('pending') && ops.includes('join'));
    for (const op of ops.filter((o) => o.includes('.'))) {
      const swatch = await fill(legend.locator(`[data-legend="${op}"] rect`));
      const block = page.locator(`svg.timeline g.lane rect:not(.bg):not(.hung)`).filter({ has: page.locator(`title:text-matches("${op.replace('.', '\\.')} layer")`) }).first();
      assert.is(swatch, await fill(block), `${op}: the swatch is the block's colour`);
    }
    const hatch = await fill(legend.locator('[data-legend="pending"] rect'));
    assert.match(hatch, /url\(.*#hatch/);
    assert.is(hatch, await fill(page.locator('svg.timeline rect.hung').first()));
  });
});

test('no wait-for box is clipped or overlaps another at ep=64 (and ep=32 × dp=2 with 20 boxes)', async () => {
  const cases: Partial<Scenario>[] = [
    starve64,
    { ep: 64, experts: 128, routing: 'starve:1', variant: 'kernel-hang' },
    { ep: 64, experts: 128, layers: 2, routing: 'empty:2', variant: 'layer-metric' },
    { ep: 32, dp: 2, experts: 64, fsdp: 'experts', variant: 'completion-order' },
  ];
  for (const s of cases) {
    await withPage(des(s), `waitfor-${s.variant}`, async (page) => {
      const svg = await box(page.locator('svg.waitfor'));
      const section = await box(page.locator('#waitfor'));
      assert.ok(svg.x >= section.x && svg.x + svg.width <= section.x + section.width + 0.5, `${s.variant}: the graph fits its section`);
      assert.ok(svg.x + svg.width <= VIEWPORT.width, `${s.variant}: and the window`);
      const rects = await Promise.all((await page.locator('svg.waitfor g.wf rect').all()).map(box));
      assert.ok(rects.length > 0);
      for (const r of rects) {
        assert.ok(r.x >= svg.x - 0.5 && r.y >= svg.y - 0.5 && r.x + r.width <= svg.x + svg.width + 0.5 && r.y + r.height <= svg.y + svg.height + 0.5, `${s.variant}: box at ${JSON.stringify(r)} lies inside the graph ${JSON.stringify(svg)}`);
      }
      for (let i = 0; i < rects.length; i++)
        for (let j = i + 1; j < rects.length; j++) {
          const [a, b] = [rects[i]!, rects[j]!];
          assert.ok(a.x + a.width <= b.x || b.x + b.width <= a.x || a.y + a.height <= b.y || b.y + b.height <= a.y, `${s.variant}: boxes ${i} and ${j} do not overlap`);
        }
      // Every box's text fits inside its box.
      for (const g of await page.locator('svg.waitfor g.wf').all()) {
        const r = await box(g.locator('rect'));
        for (const t of await g.locator('text').all()) {
          const tb = await box(t);
          assert.ok(tb.x >= r.x && tb.x + tb.width <= r.x + r.width, `${s.variant}: "${await t.textContent()}" fits its box`);
        }
      }
    });
  }
});

test('the title of a dp=2 run names dp and the rest of the layout', async () => {
  await withPage(des({ ep: 4, dp: 2, fsdp: 'split', layers: 2, microBatches: 2, routing: 'starve:1', variant: 'no-unused-expert-grads', packed: false }), 'title-dp2', async (page) => {
    const title = await page.title();
    for (const part of ['dp=2', 'ep=4', 'FSDP wrap split', '2 layers', '2 micro-batches', 'variant no-unused-expert-grads']) assert.ok(title.includes(part), `"${title}" names ${part}`);
    assert.is(await page.locator('header h1').textContent(), title);
    assert.ok(await page.locator('#diagnosis p.fix').isVisible(), 'the diagnosis says how real code avoids it');
  });
});

test('a rank still computing is drawn as computing, not as a blocker (kernel-hang, ep=4)', async () => {
  await withPage(des({ ep: 4, routing: 'starve:1', variant: 'kernel-hang' }), 'computing-ep4', async (page) => {
    const rank1 = page.locator('svg.waitfor g.wf[data-ranks="1"]');
    assert.is(await rank1.count(), 1);
    assert.match((await rank1.getAttribute('class'))!, /\bcomputing\b/);
    assert.match((await rank1.textContent())!, /computing, never returns/);
    for (const part of ['svg.waitfor', '#waitfor ul']) assert.not.match((await page.locator(part).textContent())!, /not blocked|finished/, `${part} calls no rank a finished blocker`);
    const dash = await rank1.locator('rect').evaluate((el) => getComputedStyle(el).strokeDasharray);
    assert.is.not(dash, 'none', 'a computing box is dashed');
    assert.is(await page.locator('svg.waitfor path.wfe.arrives').count(), 1, 'the arrow to it says it has not arrived, not that it blocks');
    assert.is(await page.locator('svg.waitfor g.wf.finished').count(), 0);
  });
});

test.after(async () => {
  await browser?.close();
});

test.run();
