// The self-contained HTML report: every section rendered here at generation time (SVG,
// tables, one PNG as a data: URL), styles and the small script inline, nothing fetched at
// view time. The page reads without its script too (mail clients strip scripts): the
// script only switches which rank's path is highlighted and reads out heatmap cells.
import { rankMachine } from '../../machines/rankMachine.js';
import { liveUnder, machineGraph, rankContexts } from '../../machines/exporters.js';
import { rankConfig } from '../../machines/scenario.js';
import { renderDiagram, type Diagram } from './diagram.js';
import { esc, OP_CSS } from './html-util.js';
import type { ReportInput } from '../../machines/record.js';
import { diagnosisSection, layoutWords, ledgerSection, loadSection } from './sections.js';
import { timelineSection } from './timeline.js';
import { waitForSection } from './waitfor.js';

/** A rank's highlight: visited nodes and edges (shared between ranks that took the same path) and where it stopped. */
interface PathData {
  /** Distinct [nodes, edges] sets; ranks with the same path share one. */
  readonly sets: [number[], number[]][];
  readonly of: number[];
  readonly stop: number[];
  readonly stopName: string[];
  readonly steps: number[];
}

function pathData(input: ReportInput, d: Diagram): PathData {
  const sets: [number[], number[]][] = [];
  const seen = new Map<string, number>();
  const of: number[] = [];
  const stop: number[] = [];
  for (const path of input.paths) {
    const nodes = new Set<number>();
    const edges = new Set<number>();
    path.forEach((p, i) => {
      const n = d.nodeOf.get(p);
      if (n !== undefined) nodes.add(n);
      if (i > 0 && p !== path[i - 1]) for (const e of d.edgesOf(path[i - 1]!, p)) edges.add(e);
    });
    const set: [number[], number[]] = [[...nodes].sort((a, b) => a - b), [...edges].sort((a, b) => a - b)];
    const key = JSON.stringify(set);
    if (!seen.has(key)) seen.set(key, sets.push(set) - 1);
    of.push(seen.get(key)!);
    stop.push(d.nodeOf.get(path[path.length - 1] ?? '') ?? -1);
  }
  return { sets, of, stop, stopName: input.paths.map((p) => p[p.length - 1] ?? '?'), steps: input.paths.map((p) => p.length) };
}

/**
 * The stylesheet that highlights rank `r`. The page's script embeds this very function
 * (its compiled source), so the default rank written here and a rank picked in the browser
 * are highlighted the same way; it must stay plain JavaScript once types are erased.
 */
function selectionCss(p: PathData, r: number): string {
  const [nodes, edges] = p.sets[p.of[r]!]!;
  const rules = [`#ledger [data-r="${r}"]{box-shadow:inset 0 0 0 2px var(--sel)}`, `svg.timeline .lane[data-r="${r}"] .bg{fill:var(--sel-bg)}`];
  if (nodes.length) rules.push(`${nodes.map((i) => `#st-${i} rect`).join(',')}{fill:var(--on-fill);stroke:var(--on)}`);
  if (edges.length) rules.push(`${edges.map((i) => `#tr-${i} path`).join(',')}{stroke:var(--on);stroke-width:2.5;opacity:1}`);
  if (p.stop[r]! >= 0) rules.push(`#st-${p.stop[r]} rect{stroke:var(--stop);stroke-width:3.5}`);
  return rules.join('\n');
}

const SCRIPT = `(() => {
  const P = JSON.parse(document.getElementById('path-data').textContent);
  const style = document.getElementById('sel-style');
  const pick = document.getElementById('rank-pick');
  const info = document.getElementById('path-info');
  const selectionCss = ${selectionCss.toString()};
  const select = (r) => {
    style.textContent = selectionCss(P, r);
    pick.value = String(r);
    info.textContent = 'rank ' + r + ': ' + P.steps[r] + ' states visited, stopped in ' + P.stopName[r];
  };
  pick.addEventListener('change', () => select(Number(pick.value)));
  document.addEventListener('click', (e) => {
    const el = e.target.closest && e.target.closest('[data-r]');
    if (el) select(Number(el.getAttribute('data-r')));
  });
  const heat = document.getElementById('heat-img');
  if (heat) {
    const H = JSON.parse(document.getElementById('heat-data').textContent);
    const out = document.getElementById('heat-read');
    heat.addEventListener('mousemove', (e) => {
      const b = heat.getBoundingClientRect();
      const i = Math.floor((e.clientY - b.top) / H.cell), j = Math.floor((e.clientX - b.left) / H.cell);
      const row = H.rows[i];
      if (row && row[j] !== undefined) out.textContent = 'rank ' + i + ' → EP rank ' + j + ': ' + row[j] + ' rows';
    });
  }
})();`;

const CSS = `:root{--on:#b45309;--on-fill:#fde68a;--stop:#dc2626;--sel:#f59e0b;--sel-bg:#fef3c7;--ink:#1f2937;--muted:#6b7280;--line:#d1d5db}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--ink);margin:0;background:#f9fafb}
header{background:#111827;color:#f9fafb;padding:10px 20px;position:sticky;top:0;z-index:2;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:17px;margin:0}header nav a{color:#93c5fd;margin-right:12px;text-decoration:none}
main{padding:4px 20px 40px;max-width:1500px}section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 16px 14px;margin:14px 0}
h2{font-size:16px;margin:6px 0 8px}code{font:12px ui-monospace,Menlo,Consolas,monospace}.scroll{overflow:auto;max-width:100%}.scroll.tall{max-height:75vh}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:700;margin-right:8px;background:#e5e7eb}.v-ok .badge{background:#bbf7d0;color:#14532d}
.v-missing .badge,.v-mismatch .badge,.v-cycle .badge,.v-crash .badge,.v-timeout .badge,.v-violation .badge{background:#fecaca;color:#7f1d1d}
.cause{font-size:15px}.fix{border-left:3px solid #16a34a;padding-left:8px}.fix .source{color:var(--muted)}.scenario{color:var(--muted)}table{border-collapse:collapse}td,th{padding:2px 6px;border:1px solid #e5e7eb;white-space:nowrap;font-size:12px}
table.ranks tr.culprit td{background:#fee2e2}
table.ledger td{font:11px ui-monospace,Menlo,Consolas,monospace;text-align:center}table.ledger.compact td,table.ledger.compact th{padding:1px 2px;font-size:10px}
table.ledger thead th{position:sticky;top:0;background:#f3f4f6;cursor:pointer}table.ledger tbody th{background:#f9fafb}
table.ledger td.odd{background:#fde68a;font-weight:700}table.ledger td.missing{background:#fecaca;color:#991b1b;font-weight:700}
table.ledger tr.divergence th,table.ledger tr.divergence td{border-top:2px solid #dc2626;border-bottom:2px solid #dc2626}table.ledger tr.divergence{background:#fff1f2}
details.comm{margin:6px 0}details.comm>summary{cursor:pointer}.legend span{font:11px ui-monospace,monospace;padding:0 4px;border-radius:3px}
${OP_CSS}
svg text{font:11px system-ui,Helvetica,Arial,sans-serif}
svg.machine .st rect{fill:#fff;stroke:#6b7280;stroke-width:1.2}svg.machine .st text{text-anchor:middle;fill:var(--ink)}svg.machine .st text.sub{font-size:9.5px;fill:#4b5563}
svg.machine .st.final rect{stroke-width:2.2}svg.machine .st.any rect{stroke-dasharray:3 2;fill:#f9fafb}
svg.machine .frame rect{fill:#f8fafc;stroke:#cbd5e1}svg.machine .frame text{font-weight:700;fill:#475569}
svg.machine .tr path{fill:none;stroke:#6b7280;stroke-width:1.1;marker-end:url(#arr);opacity:.85}svg.machine .tr.always path{stroke-dasharray:2 2}
svg.machine .tr text{font-size:9.5px;fill:#374151}svg.machine .tr.dead path{stroke:#d1d5db;stroke-dasharray:5 3}svg.machine .tr.dead text{fill:#9ca3af}
svg.machine marker path{fill:#6b7280}.controls{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin-bottom:6px}
.key i{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:middle;margin:0 4px 0 8px}.k-on{background:var(--on-fill);border:1px solid var(--on)}.k-stop{border:2px solid var(--stop)}
svg.timeline{width:100%;min-width:760px;height:auto}svg.timeline .bg{fill:transparent}svg.timeline .lane:nth-child(even) .bg{fill:#f9fafb}svg.timeline .lane text{font-size:9px;fill:var(--muted);cursor:pointer}
svg.timeline .lane rect:not(.bg),svg.swatch rect{stroke:#475569;stroke-width:.5}
svg rect.hung{fill:url(#hatch);stroke:#dc2626;stroke-width:1}svg .join{stroke:#0f172a;stroke-width:1.5}svg rect.work{fill:#fff}svg rect.fold{fill:rgba(100,116,139,.18);stroke:none}svg.swatch rect.fold{stroke:none}svg.timeline text.fold{font-size:9px;fill:var(--muted)}svg.timeline line.end{stroke:#dc2626;stroke-dasharray:3 2}
.tl-legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin:4px 0 8px}.tl-legend span{font:12px system-ui,Helvetica,Arial,sans-serif;padding:0;white-space:nowrap}.tl-legend b{font-weight:600;margin-right:3px}svg.swatch{vertical-align:middle;margin-right:4px}
svg.timeline line.tick{stroke:#e5e7eb}svg.timeline text.tick{font-size:9px;fill:var(--muted);text-anchor:middle}
svg.waitfor{max-width:100%;height:auto}svg.waitfor .wf rect{stroke-width:1.5}svg.waitfor .wf.culprit rect{stroke-width:3.5}.waits,.mismatch{--wf-fill:#fee2e2;--wf-line:#dc2626}.finished{--wf-fill:#e0f2fe;--wf-line:#0369a1}.computing{--wf-fill:#fef3c7;--wf-line:#b45309}.crashed{--wf-fill:#e5e7eb;--wf-line:#111827}
svg.waitfor .wf rect{fill:var(--wf-fill);stroke:var(--wf-line)}svg.waitfor .computing rect{stroke-dasharray:6 3}.key i.wf-key{background:var(--wf-fill);border:1.5px solid var(--wf-line)}.key i.wf-key.computing{border-style:dashed}
svg.waitfor text{text-anchor:middle;font-weight:600}svg.waitfor text.sub{font-weight:400;font-size:10px}svg.waitfor .wfe{fill:none;stroke:#7f1d1d;stroke-width:1.6;marker-end:url(#wfarr)}svg.waitfor .wfe.mismatch{stroke-dasharray:5 3}svg.waitfor .wfe.arrives{stroke:#b45309;stroke-dasharray:2 3}svg.waitfor marker path{fill:#7f1d1d}
.load{display:flex;gap:24px;flex-wrap:wrap}figure{margin:0}figcaption{color:var(--muted);font-size:12px;margin-bottom:4px}.readout{color:var(--ink);font-weight:600}
svg.heat text{font-size:9px;fill:var(--muted);text-anchor:middle}svg.heat text.rl{text-anchor:end}svg.heat text.axis{text-anchor:start}svg.heat image{image-rendering:pixelated}svg.heat .none{fill:#dc2626;font-weight:700}
svg.bars .bar{fill:#3b82f6}svg.bars .zero{fill:#dc2626}svg.bars .band{fill:#f1f5f9}`;

export function renderReport(input: ReportInput): string {
  const s = input.scenario;
  const graph = liveUnder(machineGraph(rankMachine), rankMachine, rankContexts(rankConfig(s, 0).variant), s.variant);
  const diagram = renderDiagram(graph);
  const paths = pathData(input, diagram);
  const d = input.diagnosis;
  const first = d.culprits[0] ?? 0;
  const state = new Map(d.ranks.map((r) => [r.rank, r.state]));
  const options = input.paths
    .map((_, r) => `<option value="${r}"${r === first ? ' selected' : ''}>rank ${r}${d.culprits.includes(r) ? ' (culprit)' : ''} — ${esc(state.get(r) ?? paths.stopName[r]!)}</option>`)
    .join('');
  const machine = `<section id="machine"><h2>Rank machine</h2><p>Generated from the machine definition: boxes are states (a collective state names its op and communicator), dotted arrows are eventless choices, arrow labels are guards. Greyed arrows marked ✗ are transitions that no guard can take under variant <code>${esc(s.variant)}</code>. The picked rank's path is highlighted; a red frame marks the state it stopped in.</p>
<div class="controls"><label>Rank <select id="rank-pick">${options}</select></label><span id="path-info">rank ${first}: ${paths.steps[first]} states visited, stopped in ${esc(paths.stopName[first] ?? '?')}</span><span class="key"><i class="k-on"></i>visited<i class="k-stop"></i>stopped here</span></div>
<div class="scroll tall">${diagram.svg}</div></section>`;
  const title = `ep-actors report — ${d.verdict}${d.communicator ? ` on ${d.communicator} #${d.position}` : ''} (${input.evidence ? 'post-mortem' : layoutWords(s)})`;
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>${esc(title)}</title><style>${CSS}</style><style id="sel-style">${selectionCss(paths, first)}</style></head>
<body><header><h1>${esc(title)}</h1><nav><a href="#diagnosis">diagnosis</a><a href="#machine">machine</a><a href="#ledger">ledger</a><a href="#timeline">timeline</a><a href="#waitfor">wait-for</a>${input.routing.sendRows.length ? '<a href="#load">load</a>' : ''}</nav></header>
<main>${diagnosisSection(input)}${machine}${ledgerSection(input)}${timelineSection(input)}${waitForSection(input)}${input.routing.sendRows.length ? loadSection(input) : ''}</main>
<script type="application/json" id="path-data">${jsonForScript(paths)}</script>
<script>${SCRIPT}</script></body></html>
`;
}

/** JSON inside <script> must not contain `</` (it would end the element). */
const jsonForScript = (v: unknown) => JSON.stringify(v).replace(/<\//g, '<\\/');
