// The report's sections, each a function from the report input to an HTML fragment:
// the diagnosis in words (and how real code avoids the hazard), the per-communicator ledger
// with its first divergence, and the expert load. The timeline and the wait-for graph have
// their own files.
import { describe, type LedgerEntry } from '../../machines/ledger.js';
import { communicators, ppOf, type CommunicatorSpec } from '../../machines/mesh.js';
import type { RankReport, VerdictKind } from '../../machines/diagnosis.js';
import type { Scenario } from '../../machines/scenario.js';
import { CORPUS, type CorpusCase } from '../corpus/index.js';
import { encodePng } from './png.js';
import { COMPACT_FROM, esc, opClass, opOrder, shortOp } from './html-util.js';
import { rankRanges, rankWord } from '../../machines/diagnosis.js';
import type { ReportInput } from '../../machines/record.js';

const meshOf = (input: ReportInput) => ({ ep: input.scenario.ep, dp: input.scenario.dp, pp: input.scenario.pp });
/** What a row of a communicator must agree on (sizes aside). */
export const signature = (e: LedgerEntry) => `${e.op}|${e.layer}|${e.microBatch}|${e.unit ?? ''}`;
const sum = (xs: readonly number[] | null) => (xs ?? []).reduce((a, b) => a + b, 0);

/** Per communicator: for each position, the entry of each member (undefined: not issued). */
export function ledgerGrid(input: ReportInput): Map<string, { spec: CommunicatorSpec; rows: (LedgerEntry | undefined)[][] }> {
  const grid = new Map((input.communicators ?? communicators(meshOf(input))).map((spec) => [spec.id, { spec, rows: [] as (LedgerEntry | undefined)[][] }]));
  for (const e of input.ledger) {
    const g = grid.get(e.communicator);
    if (!g) continue;
    while (g.rows.length <= e.position) g.rows.push(g.spec.members.map(() => undefined));
    g.rows[e.position]![e.member] = e;
  }
  return grid;
}

/**
 * The first position of a communicator where its members disagree: the diagnosis's own
 * position on its communicator, otherwise the first row with a member missing or a
 * different op, layer, micro-batch or unit.
 */
export function firstDivergence(input: ReportInput, comm: string, rows: readonly (LedgerEntry | undefined)[][]): number | null {
  const d = input.diagnosis;
  if (d.verdict !== 'ok' && d.communicator === comm && d.position !== null) return d.position;
  const i = rows.findIndex((row) => row.some((e) => !e) || new Set(row.map((e) => signature(e!))).size > 1);
  return i < 0 ? null : i;
}

/** The most common signature in a row; cells that differ from it are the odd ones. */
function majority(row: readonly (LedgerEntry | undefined)[]): string | null {
  const counts = new Map<string, number>();
  for (const e of row) if (e) counts.set(signature(e), (counts.get(signature(e)) ?? 0) + 1);
  let best: string | null = null;
  for (const [k, v] of counts) if (best === null || v > counts.get(best)!) best = k;
  return best;
}

// ---------------------------------------------------------------- diagnosis

export function diagnosisSection(input: ReportInput): string {
  const d = input.diagnosis;
  const s = input.scenario;
  const groups = new Map<string, RankReport[]>();
  for (const r of d.ranks) {
    const key = `${r.state}|${r.op ?? ''}|${r.layer}|${r.microBatch}`;
    groups.set(key, [...(groups.get(key) ?? []), r]);
  }
  const rows = [...groups.values()]
    .map((rs) => {
      const r = rs[0]!;
      const culprit = rs.some((x) => d.culprits.includes(x.rank));
      return `<tr${culprit ? ' class="culprit"' : ''}><td>${esc(rankWord(rs.map((x) => x.rank)))}</td><td><code>${esc(r.state)}</code></td><td>${esc(r.op ?? '—')}</td><td>${r.phase ?? '—'}</td><td>${r.layer}</td><td>${r.microBatch}</td></tr>`;
    })
    .join('');
  const where = d.communicator !== null ? ` on <b>${esc(d.communicator)}</b>, position <b>${d.position}</b> (<a href="#first-divergence">ledger row</a>)` : '';
  const fix = input.evidence || d.verdict === 'ok' ? undefined : avoidance(s, d.verdict);
  return `<section id="diagnosis"><h2>Diagnosis</h2>
<p class="verdict v-${d.verdict}"><span class="badge">${esc(d.verdict.toUpperCase())}</span>${where}</p>
<p class="cause">${esc(capitalize(compressRankLists(d.cause)))}.</p>
${d.culprits.length ? `<p>Culprit: <b>${esc(rankWord(d.culprits))}</b>.</p>` : ''}
${fix ? `<p class="fix"><b>How real code avoids it:</b> ${esc(fix.fix)}. <span class="source">Seen in ${esc(fix.source)}.</span></p>` : ''}
<p class="scenario">${input.evidence ? esc(input.evidence) : `Scenario: ${esc(layoutWords(s))}; ${s.experts} experts, top-${s.topK}, ${s.tokens} tokens per rank, seed ${s.seed}`}; ${input.ledger.length} collective calls in the ledger.</p>
<details${d.ranks.length <= COMPACT_FROM ? ' open' : ''}><summary>Where every rank stopped (${groups.size} group${groups.size > 1 ? 's' : ''} of ${d.ranks.length} ranks)</summary>
<table class="ranks"><thead><tr><th>ranks</th><th>state</th><th>op</th><th>phase</th><th>layer</th><th>micro-batch</th></tr></thead><tbody>${rows}</tbody></table></details></section>`;
}

/** The whole layout in one line (pp and each stage's MoE layers when pipelined): the page's title and its diagnosis say it alike. */
export function layoutWords(s: Scenario): string {
  const count = (k: number, one: string, many: string) => `${k} ${k === 1 ? one : many}`;
  return [`ep=${s.ep}`, `dp=${s.dp}`, ...(ppOf(s) > 1 ? [`pp=${ppOf(s)}${s.moeLayers ? ` (MoE layers per stage ${s.moeLayers.join(',')})` : ''}`] : []), s.fsdp ? `FSDP wrap ${s.fsdp}` : 'no FSDP', count(s.layers, 'layer', 'layers'), count(s.microBatches, 'micro-batch', 'micro-batches'), `routing ${s.routing}`, `variant ${s.variant}`].join(', ');
}

/**
 * How real code avoids the hazard the run's variant reproduces: the corpus's line for its
 * class (sim/corpus keeps one per class). A variant that reaches two classes picks the one
 * with the run's verdict, then its FSDP wrap.
 */
export function avoidance(s: Scenario, verdict: VerdictKind): CorpusCase | undefined {
  const score = (c: CorpusCase) => (c.expected === verdict ? 2 : 0) + (c.scenario.fsdp === s.fsdp ? 1 : 0);
  return CORPUS.filter((c) => c.scenario.variant === s.variant).sort((a, b) => score(b) - score(a))[0];
}

const capitalize = (s: string) => s.charAt(0).toUpperCase() + s.slice(1);
/** `ranks 0, 2, 3, 4, …, 63` as `ranks 0, 2–63`. */
const compressRankLists = (s: string) => s.replace(/\branks ((?:\d+, )+\d+)/g, (_, list: string) => `ranks ${rankRanges(list.split(', ').map(Number))}`);

// ---------------------------------------------------------------- ledger

export function ledgerSection(input: ReportInput): string {
  const compact = input.paths.length > COMPACT_FROM;
  const state = new Map(input.diagnosis.ranks.map((r) => [r.rank, r.state]));
  const grid = [...ledgerGrid(input).values()].filter((g) => g.rows.length > 0);
  let anchored = false;
  const tables = grid.map(({ spec, rows }) => {
    const div = firstDivergence(input, spec.id, rows);
    const open = grid.length <= 4 || div !== null || spec.id === input.diagnosis.communicator;
    const head = `<tr><th>pos</th>${spec.members.map((r) => `<th data-r="${r}">r${r}</th>`).join('')}</tr>`;
    const body = rows
      .map((row, p) => {
        const maj = majority(row);
        const cells = row
          .map((e, m) => {
            const r = spec.members[m]!;
            if (!e) return `<td data-r="${r}" class="missing" title="rank ${r} never issued position ${p} (it stopped in ${esc(state.get(r) ?? '?')})">—</td>`;
            const text = compact ? `${shortOp(e.op)}${e.layer}` : `${e.op} L${e.layer}${e.microBatch ? ` m${e.microBatch}` : ''}`;
            const rowsMoved = e.sendSplits ? `sends ${sum(e.sendSplits)} rows, receives ${sum(e.recvSplits)}` : `${e.size} elements`;
            const splits = !compact && e.sendSplits ? ` send [${e.sendSplits.join(',')}] recv [${e.recvSplits!.join(',')}]` : '';
            const why = e.why.length ? `; why: ${e.why.map((w) => `${w.guard}=${w.held}`).join(', ')}` : '';
            const title = `rank ${r} · ${describe(e)} · ${rowsMoved}${splits} · state ${e.statePath}${why}`;
            const cls = [opClass(e.op), signature(e) !== maj ? 'odd' : ''].filter(Boolean).join(' ');
            return `<td data-r="${r}" class="${cls}" title="${esc(title)}">${esc(text)}</td>`;
          })
          .join('');
        const isDiv = p === div;
        // The page's one #first-divergence is the diagnosis's communicator, or the first divergence found.
        const anchor = isDiv && !anchored && (spec.id === input.diagnosis.communicator || input.diagnosis.communicator === null) ? ((anchored = true), ' id="first-divergence"') : '';
        return `<tr${isDiv ? ` class="divergence"${anchor}` : ''}><th>${p}</th>${cells}</tr>`;
      })
      .join('');
    const note = div === null ? 'every position matched' : `first divergence at position ${div}`;
    return `<details class="comm"${open ? ' open' : ''} data-comm="${esc(spec.id)}"><summary><b>${esc(spec.id)}</b> — ${spec.members.length} ranks, ${rows.length} positions, ${note}</summary><div class="scroll"><table class="ledger${compact ? ' compact' : ''}"><thead>${head}</thead><tbody>${body}</tbody></table></div></details>`;
  });
  const legend = compact ? `<p class="legend">${opOrder(input.ledger.map((e) => e.op)).map((op) => `<span class="${opClass(op)}">${esc(shortOp(op))}</span> ${esc(op)}`).join(' · ')}; the digit is the layer. Hover a cell for its splits and the guards that chose it.</p>` : '<p class="legend">Hover a cell for its splits and the guards that chose it.</p>';
  return `<section id="ledger"><h2>Ledger</h2><p>One column per rank, one row per position of the communicator: NCCL pairs the n-th collective of every member, so a row must read the same across. Cells that differ from their row are marked; the first divergent row is highlighted.</p>${legend}${tables.join('')}</section>`;
}

// ---------------------------------------------------------------- expert load

export function loadSection(input: ReportInput): string {
  const { sendRows, rowsPerExpert } = input.routing;
  const src = sendRows.length;
  const dst = sendRows[0]?.length ?? 0;
  const max = Math.max(1, ...sendRows.flat());
  const rgb = new Uint8Array(src * dst * 3);
  sendRows.forEach((row, i) =>
    row.forEach((v, j) => {
      const c: [number, number, number] = v === 0 ? [243, 244, 246] : ramp(v / max);
      rgb.set(c, (i * dst + j) * 3);
    }),
  );
  const cell = Math.max(4, Math.min(28, Math.floor(512 / Math.max(src, dst))));
  const png = encodePng(dst, src, rgb).toString('base64');
  const [ox, oy] = [44, 30];
  const every = (k: number) => Math.max(1, Math.ceil(k / 16));
  // A rank that receives (column) or sends (row) nothing at all is labelled and marked red.
  const perRank = Array.from({ length: dst }, (_, j) => sendRows.reduce((a, row) => a + (row[j] ?? 0), 0));
  const starved = perRank.flatMap((v, j) => (v === 0 ? [j] : []));
  const silent = sendRows.flatMap((row, i) => (sum(row) === 0 ? [i] : []));
  const colLabels = Array.from({ length: dst }, (_, j) => j)
    .filter((j) => j % every(dst) === 0 || starved.includes(j))
    .map((j) => `<text${starved.includes(j) ? ' class="none"' : ''} x="${ox + j * cell + cell / 2}" y="${oy - 6}">${j}</text>`)
    .join('');
  const rowLabels = Array.from({ length: src }, (_, i) => i)
    .filter((i) => i % every(src) === 0 || silent.includes(i))
    .map((i) => `<text class="rl${silent.includes(i) ? ' none' : ''}" x="${ox - 4}" y="${oy + i * cell + cell / 2 + 4}">${i}</text>`)
    .join('');
  const marks = [
    ...starved.map((j) => `<rect class="none" x="${ox + j * cell}" y="${oy + src * cell + 2}" width="${cell}" height="4"/>`),
    ...silent.map((i) => `<rect class="none" x="${ox - 3}" y="${oy + i * cell}" width="2" height="${cell}"/>`),
  ].join('');
  const hw = ox + dst * cell + 10;
  const hh = oy + src * cell + 10;
  const heat = `<svg xmlns="http://www.w3.org/2000/svg" class="heat" width="${hw}" height="${hh}" viewBox="0 0 ${hw} ${hh}"><text x="${ox}" y="12" class="axis">destination EP rank →</text>${colLabels}${rowLabels}${marks}<image id="heat-img" x="${ox}" y="${oy}" width="${dst * cell}" height="${src * cell}" preserveAspectRatio="none" href="data:image/png;base64,${png}"/></svg>`;

  const E = rowsPerExpert.length;
  const nLocal = E / input.scenario.ep;
  const bw = Math.max(2, Math.min(16, Math.floor(960 / Math.max(1, E))));
  const bh = 120;
  const emax = Math.max(1, ...rowsPerExpert);
  const bands = Array.from({ length: input.scenario.ep }, (_, r) => (r % 2 ? `<rect class="band" x="${r * nLocal * bw}" y="0" width="${nLocal * bw}" height="${bh}"/>` : '')).join('');
  const bars = rowsPerExpert
    .map((v, e) => {
      const h = Math.round((v / emax) * (bh - 4));
      const owner = Math.floor(e / nLocal);
      return `<rect class="${v === 0 ? 'zero' : 'bar'}" x="${e * bw}" y="${v === 0 ? bh - 3 : bh - h}" width="${Math.max(1, bw - 1)}" height="${v === 0 ? 3 : h}"><title>expert ${e} (rank ${owner}): ${v} rows</title></rect>`;
    })
    .join('');
  const mean = perRank.reduce((a, b) => a + b, 0) / Math.max(1, perRank.length);
  const summary = `Rows received per EP rank: min ${Math.min(...perRank)}, mean ${mean.toFixed(1)}, max ${Math.max(...perRank)} (max/mean ${(Math.max(...perRank) / Math.max(mean, 1e-9)).toFixed(2)})${starved.length ? `; <b>${esc(rankWord(starved))} received nothing</b>` : ''}.`;
  return `<section id="load"><h2>Expert load</h2><p>${summary} Summed over ${input.scenario.layers} layer(s) and ${input.scenario.microBatches} micro-batch(es).</p>
<div class="load"><figure><figcaption>Rows sent, source rank (rows) → destination EP rank (columns); darker is more, grey is none; red marks a rank that receives or sends nothing. <span id="heat-read" class="readout"></span></figcaption><div class="scroll">${heat}</div></figure>
<figure><figcaption>Rows per expert (bands: the owning EP rank; red ticks: no rows)</figcaption><div class="scroll"><svg xmlns="http://www.w3.org/2000/svg" class="bars" width="${E * bw}" height="${bh}" viewBox="0 0 ${E * bw} ${bh}">${bands}${bars}</svg></div></figure></div>
<script type="application/json" id="heat-data">${JSON.stringify({ rows: sendRows, cell, ox, oy })}</script></section>`;
}

/** White to deep blue. */
function ramp(t: number): [number, number, number] {
  const a = [239, 246, 255];
  const b = [29, 78, 216];
  return [0, 1, 2].map((i) => Math.round(a[i]! + (b[i]! - a[i]!) * Math.sqrt(t))) as [number, number, number];
}

