// The live view's one page: styles and script inline, nothing fetched but its own event
// stream (a relative URL, so the page names no origin at all). A row per rank is written
// here; the script fills the rows from the server's `ranks` events and, on `verdict`,
// shows the diagnosis and where every rank stopped, then closes the stream.
import { esc } from '../report/html-util.js';
import { layoutWords } from '../report/sections.js';
import { type Scenario } from '../../machines/scenario.js';
import { worldSize } from '../../machines/mesh.js';

const SCRIPT = `(() => {
  const rows = document.querySelectorAll('#ranks tbody tr');
  const status = document.getElementById('status');
  const set = (row, key, text) => { row.querySelector('[data-k="' + key + '"]').textContent = text; };
  const stream = new EventSource('events');
  stream.addEventListener('open', () => { status.textContent = 'running'; });
  stream.addEventListener('error', () => { status.textContent = stream.readyState === EventSource.CLOSED ? 'disconnected' : 'reconnecting…'; });
  stream.addEventListener('ranks', (m) => {
    for (const v of JSON.parse(m.data)) {
      const row = rows[v.rank];
      if (!row) continue;
      set(row, 'state', v.state || '—');
      set(row, 'event', v.event || '—');
      set(row, 'collectives', String(v.collectives));
      set(row, 'events', String(v.events));
      // Restart the highlight animation: the row changed in this flush.
      row.classList.remove('changed');
      void row.offsetWidth;
      row.classList.add('changed');
    }
  });
  stream.addEventListener('verdict', (m) => {
    stream.close();
    const d = JSON.parse(m.data);
    const verdict = document.getElementById('verdict');
    verdict.className = 'verdict v-' + d.verdict;
    verdict.querySelector('.badge').textContent = d.verdict.toUpperCase();
    verdict.querySelector('.where').textContent = d.communicator === null ? '' : 'on ' + d.communicator + ', position ' + d.position;
    document.getElementById('cause').textContent = d.cause;
    status.textContent = 'finished';
    document.title = 'ep-actors live — ' + d.verdict;
    // The diagnosis has each rank's final state; inspection events sent after the verdict was
    // fixed are not forwarded, so the streamed state can be a step behind.
    for (const r of d.ranks) {
      const row = rows[r.rank];
      if (!row) continue;
      const culprit = d.culprits.includes(r.rank);
      set(row, 'state', r.state);
      set(row, 'verdict', [culprit ? 'culprit' : '', r.op ? 'waits in ' + r.op : ''].filter(Boolean).join(', ') || '—');
      if (culprit) row.classList.add('culprit');
    }
  });
})();`;

const CSS = `:root{--ink:#1f2937;--muted:#6b7280;--line:#d1d5db}
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:var(--ink);margin:0;background:#f9fafb}
header{background:#111827;color:#f9fafb;padding:10px 20px;position:sticky;top:0;z-index:2;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:17px;margin:0}#status{color:#93c5fd}
main{padding:4px 20px 40px;max-width:1500px}section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 16px 14px;margin:14px 0}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:700;margin-right:8px;background:#e5e7eb}.v-ok .badge{background:#bbf7d0;color:#14532d}
.v-missing .badge,.v-mismatch .badge,.v-cycle .badge,.v-crash .badge,.v-timeout .badge,.v-violation .badge{background:#fecaca;color:#7f1d1d}
.cause{font-size:15px}.scenario{color:var(--muted)}.scroll{overflow:auto;max-height:75vh}
table{border-collapse:collapse}td,th{padding:2px 8px;border:1px solid #e5e7eb;white-space:nowrap;font-size:12px;text-align:left}
thead th{position:sticky;top:0;background:#f3f4f6}td.n{text-align:right}td code,td[data-k="state"],td[data-k="verdict"]{font:12px ui-monospace,Menlo,Consolas,monospace}
tr.culprit td{background:#fee2e2}tr.changed td{animation:changed .6s ease-out}@keyframes changed{from{background:#fef3c7}}`;

export function livePage(s: Scenario): string {
  const title = `ep-actors live — ${layoutWords(s)}`;
  const rows = Array.from(
    { length: worldSize(s) },
    (_, r) => `<tr><th>${r}</th><td data-k="state">—</td><td data-k="event">—</td><td class="n" data-k="collectives">0</td><td class="n" data-k="events">0</td><td data-k="verdict"></td></tr>`,
  ).join('');
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>${esc(title)}</title><link rel="icon" href="data:,"><style>${CSS}</style></head>
<body><header><h1>${esc(title)}</h1><span id="status">connecting…</span></header>
<main><section><p id="verdict" class="verdict"><span class="badge">RUNNING</span><span class="where"></span></p><p id="cause" class="cause">The verdict appears here when the run ends.</p>
<p class="scenario">${s.experts} experts, top-${s.topK}, ${s.tokens} tokens per rank, ${s.layers} layer${s.layers > 1 ? 's' : ''}, ${s.microBatches} micro-batch${s.microBatches > 1 ? 'es' : ''}, seed ${s.seed}.</p></section>
<section><div class="scroll"><table id="ranks"><thead><tr><th>rank</th><th>state</th><th>last event</th><th>collectives</th><th>events</th><th>at the verdict</th></tr></thead><tbody>${rows}</tbody></table></div></section></main>
<script>${SCRIPT}</script></body></html>
`;
}
