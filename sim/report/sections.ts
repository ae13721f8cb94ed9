// The report's sections, each a function from the report input to an HTML fragment:
// the diagnosis in words, the per-communicator ledger with its first divergence, the
// timeline with a lane per rank, the wait-for graph of a hang, and the expert load.
import { describe, type LedgerEntry } from '../../machines/ledger.js';
import { communicators, type CommunicatorSpec } from '../../machines/mesh.js';
import type { RankReport } from '../../machines/diagnosis.js';
import { encodePng } from './png.js';
import { esc, opClass, OP_LEGEND, shortOp } from './html-util.js';
import { rankRanges, rankWord } from '../../machines/diagnosis.js';
import type { ReportInput } from '../../machines/record.js';

/** Ranks above this many get the compact forms (short op codes, thin lanes). */
const COMPACT_FROM = 16;

const meshOf = (input: ReportInput) => ({ ep: input.scenario.ep, dp: input.scenario.dp, pp: input.scenario.pp });
const signature = (e: LedgerEntry) => `${e.op}|${e.layer}|${e.microBatch}|${e.unit ?? ''}`;
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
  const fsdp = s.fsdp ? `, FSDP ${s.fsdp}` : '';
  return `<section id="diagnosis"><h2>Diagnosis</h2>
<p class="verdict v-${d.verdict}"><span class="badge">${esc(d.verdict.toUpperCase())}</span>${where}</p>
<p class="cause">${esc(capitalize(compressRankLists(d.cause)))}.</p>
${d.culprits.length ? `<p>Culprit: <b>${esc(rankWord(d.culprits))}</b>.</p>` : ''}
<p class="scenario">${input.evidence ? esc(input.evidence) : `Scenario: ep=${s.ep}, dp=${s.dp}${(s.pp ?? 1) > 1 ? `, pp=${s.pp}${s.moeLayers ? ` (MoE layers per stage ${s.moeLayers.join(',')})` : ''}` : ''}${fsdp}, ${s.experts} experts, top-${s.topK}, ${s.tokens} tokens per rank, ${s.layers} layer${s.layers > 1 ? 's' : ''}, ${s.microBatches} micro-batch${s.microBatches > 1 ? 'es' : ''}, routing <code>${esc(s.routing)}</code>, variant <code>${esc(s.variant)}</code>, seed ${s.seed}`}; ${input.ledger.length} collective calls in the ledger.</p>
<details${d.ranks.length <= COMPACT_FROM ? ' open' : ''}><summary>Where every rank stopped (${groups.size} group${groups.size > 1 ? 's' : ''} of ${d.ranks.length} ranks)</summary>
<table class="ranks"><thead><tr><th>ranks</th><th>state</th><th>op</th><th>phase</th><th>layer</th><th>micro-batch</th></tr></thead><tbody>${rows}</tbody></table></details></section>`;
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
  const legend = compact ? `<p class="legend">${OP_LEGEND.map(([op, s]) => `<span class="${opClass(op)}">${esc(s)}</span> ${esc(op)}`).join(' · ')}; the digit is the layer. Hover a cell for its splits and the guards that chose it.</p>` : '<p class="legend">Hover a cell for its splits and the guards that chose it.</p>';
  return `<section id="ledger"><h2>Ledger</h2><p>One column per rank, one row per position of the communicator: NCCL pairs the n-th collective of every member, so a row must read the same across. Cells that differ from their row are marked; the first divergent row is highlighted.</p>${legend}${tables.join('')}</section>`;
}

// ---------------------------------------------------------------- timeline

export function timelineSection(input: ReportInput): string {
  const n = input.paths.length;
  const laneH = n <= COMPACT_FROM ? 20 : n <= 64 ? 10 : 6;
  const labelW = 52;
  const plotW = 1000;
  const sizes = new Map(communicators(meshOf(input)).map((c) => [c.id, c.members.length]));
  const slots = new Map<string, { ts: number; end: number; lanes: number[] }>();
  const slotKey = (comm: string, pos: number) => `${comm}#${pos}`;
  for (const e of input.trace) {
    const k = slotKey(e.args.communicator, e.args.position);
    const s = slots.get(k) ?? { ts: -Infinity, end: Infinity, lanes: [] };
    s.ts = Math.max(s.ts, e.ts);
    s.end = Math.min(s.end, e.ts + e.dur);
    s.lanes.push(e.tid);
    slots.set(k, s);
  }
  const complete = (comm: string, pos: number) => slots.get(slotKey(comm, pos))!.lanes.length === sizes.get(comm);
  const t0 = Math.min(0, ...input.trace.map((e) => e.ts));
  const t1 = Math.max(t0 + 1, ...input.trace.map((e) => e.ts + e.dur));
  const x = (t: number) => labelW + ((t - t0) / (t1 - t0)) * plotW;
  const top = 22;
  const lanes: string[] = [];
  const byLane = new Map<number, typeof input.trace>();
  for (const e of input.trace) byLane.set(e.tid, [...(byLane.get(e.tid) ?? []), e]);
  for (let r = 0; r < n; r++) {
    const y = top + r * laneH;
    const rects = (byLane.get(r) ?? [])
      .map((e) => {
        const hung = !complete(e.args.communicator, e.args.position);
        const cls = `${opClass(e.name)}${hung ? ' hung' : ''}`;
        const title = `rank ${r}: ${e.name} layer ${e.args.layer}${e.args.microBatch ? ` mb ${e.args.microBatch}` : ''} · ${e.args.communicator} #${e.args.position} · ${fmtUs(e.ts)}${hung ? ', never completes' : ` + ${fmtUs(e.dur)}`}`;
        return `<rect class="${cls}" x="${rd(x(e.ts))}" y="${y + 1}" width="${rd(Math.max(1, x(e.ts + e.dur) - x(e.ts)))}" height="${laneH - 2}"><title>${esc(title)}</title></rect>`;
      })
      .join('');
    lanes.push(`<g class="lane" data-r="${r}"><rect class="bg" x="0" y="${y}" width="${labelW + plotW}" height="${laneH}"/><text x="4" y="${y + laneH - (laneH > 10 ? 6 : 1)}">r${r}</text>${rects}</g>`);
  }
  // A matched collective is one vertical line across its members' lanes, in the window
  // where all of them are inside it (from the last arrival to the first departure).
  const joins = [...slots.entries()]
    .filter(([k]) => {
      const [comm, pos] = splitKey(k);
      return complete(comm, pos);
    })
    .map(([, s]) => {
      const jx = rd(x(s.end > s.ts ? (s.ts + s.end) / 2 : s.ts));
      return `<line class="join" x1="${jx}" x2="${jx}" y1="${top + Math.min(...s.lanes) * laneH + 1}" y2="${top + (Math.max(...s.lanes) + 1) * laneH - 1}"/>`;
    })
    .join('');
  const ticks = niceTicks(t0, t1, 8)
    .map((t) => `<line class="tick" x1="${rd(x(t))}" x2="${rd(x(t))}" y1="${top - 4}" y2="${top + n * laneH}"/><text class="tick" x="${rd(x(t))}" y="${top - 8}">${fmtUs(t)}</text>`)
    .join('');
  const h = top + n * laneH + 6;
  const clock = input.clock === 'real' ? 'wall-clock time of the run' : "the engine's simulated time (its cost model: expert FLOPs over a compute rate, collectives as latency plus bytes over link bandwidth)";
  return `<section id="timeline"><h2>Timeline</h2><p>One lane per rank, ${clock}. A vertical line joins the members of each matched collective; a collective drawn hatched never completed.</p><div class="scroll tall"><svg xmlns="http://www.w3.org/2000/svg" class="timeline" viewBox="0 0 ${labelW + plotW + 10} ${h}">${ticks}${lanes.join('')}${joins}</svg></div></section>`;
}

const splitKey = (k: string): [string, number] => {
  const i = k.lastIndexOf('#');
  return [k.slice(0, i), Number(k.slice(i + 1))];
};
const rd = (v: number) => Math.round(v * 10) / 10;
const fmtUs = (us: number) => (Math.abs(us) >= 1e6 ? `${(us / 1e6).toPrecision(3)} s` : Math.abs(us) >= 1e3 ? `${(us / 1e3).toPrecision(3)} ms` : `${Math.round(us)} µs`);

function niceTicks(a: number, b: number, count: number): number[] {
  const raw = (b - a) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw)!;
  const out: number[] = [];
  for (let t = Math.ceil(a / step) * step; t <= b; t += step) out.push(t);
  return out;
}

// ---------------------------------------------------------------- wait-for graph

interface WaitGroup {
  ranks: number[];
  label: string;
  kind: 'waits' | 'mismatch' | 'free';
}

/**
 * Who waits on whom when the run stopped: a rank whose last collective never completed
 * waits on every member of that communicator that did not issue the position (AND edges);
 * at a mismatch every member issued, and each is stuck on the members that issued
 * something else. Ranks in the same situation are one node, so 63 waiting ranks are one box.
 */
export function waitForGraph(input: ReportInput): { groups: WaitGroup[]; edges: [number, number][] } {
  const d = input.diagnosis;
  const grid = ledgerGrid(input);
  const last = new Map<number, LedgerEntry>();
  for (const e of input.ledger) last.set(e.rank, e);
  const stuck = new Map<number, { e: LedgerEntry; on: number[]; kind: 'waits' | 'mismatch' }>();
  for (const [rank, e] of last) {
    const g = grid.get(e.communicator)!;
    const row = g.rows[e.position]!;
    const missing = g.spec.members.filter((_, m) => !row[m]);
    if (missing.length) stuck.set(rank, { e, on: missing, kind: 'waits' });
    else if (d.verdict === 'mismatch' && d.communicator === e.communicator && d.position === e.position) {
      const others = row.filter((o) => o!.rank !== rank);
      const differ = others.filter((o) => signature(o!) !== signature(e));
      stuck.set(rank, { e, on: (differ.length ? differ : others).map((o) => o!.rank), kind: 'mismatch' });
    }
  }
  const state = new Map(d.ranks.map((r) => [r.rank, r.state]));
  const involved = new Set<number>([...stuck.keys(), ...[...stuck.values()].flatMap((w) => w.on)]);
  const byKey = new Map<string, WaitGroup>();
  for (const r of [...involved].sort((a, b) => a - b)) {
    const w = stuck.get(r);
    const k = w ? `${w.kind}|${w.e.communicator}|${w.e.position}|${w.e.op}|${w.on.join(',')}` : `free|${state.get(r) ?? '?'}`;
    const label = !w ? `not blocked: in ${state.get(r) ?? '?'}` : w.kind === 'waits' ? `waits in ${w.e.op} (${w.e.communicator} #${w.e.position})` : `issued ${w.e.op} (${w.e.communicator} #${w.e.position})`;
    const g = byKey.get(k) ?? { ranks: [], label, kind: w?.kind ?? 'free' };
    g.ranks.push(r);
    byKey.set(k, g);
  }
  const groups = [...byKey.values()];
  const groupOf = new Map(groups.flatMap((g, i) => g.ranks.map((r) => [r, i] as const)));
  const edges = new Set<string>();
  for (const [r, w] of stuck) for (const o of w.on) edges.add(`${groupOf.get(r)}>${groupOf.get(o)}`);
  return { groups, edges: [...edges].map((s) => s.split('>').map(Number) as [number, number]) };
}

export function waitForSection(input: ReportInput): string {
  const { groups, edges } = waitForGraph(input);
  if (groups.length === 0) return `<section id="waitfor"><h2>Wait-for graph</h2><p>Nothing waits: every collective issued was matched by all members of its communicator.</p></section>`;
  const boxW = (g: WaitGroup) => Math.max(rankWord(g.ranks).length, g.label.length) * 6.4 + 20;
  const W = 760;
  const H = groups.length <= 2 ? 130 : 360;
  const pos = groups.map((_, i) => {
    if (groups.length <= 2) return { x: groups.length === 1 ? W / 2 : W * (0.27 + 0.46 * i), y: H / 2 };
    const a = -Math.PI / 2 + (2 * Math.PI * i) / groups.length;
    return { x: W / 2 + (W / 2 - 140) * Math.cos(a), y: H / 2 + (H / 2 - 40) * Math.sin(a) };
  });
  const boxes = groups
    .map((g, i) => {
      const w = boxW(g);
      const { x, y } = pos[i]!;
      return `<g class="wf ${g.kind}"><rect x="${rd(x - w / 2)}" y="${rd(y - 20)}" width="${rd(w)}" height="40" rx="6"/><text x="${rd(x)}" y="${rd(y - 4)}">${esc(rankWord(g.ranks))}</text><text class="sub" x="${rd(x)}" y="${rd(y + 12)}">${esc(g.label)}</text></g>`;
    })
    .join('');
  const arrows = edges
    .map(([a, b]) => {
      const p = pos[a]!;
      const q = pos[b]!;
      const cls = `wfe ${groups[a]!.kind}`;
      if (a === b) {
        const w = boxW(groups[a]!);
        return `<path class="${cls}" d="M${rd(p.x + w / 2)},${rd(p.y - 8)} C${rd(p.x + w / 2 + 50)},${rd(p.y - 40)} ${rd(p.x + w / 2 + 50)},${rd(p.y + 40)} ${rd(p.x + w / 2)},${rd(p.y + 8)}"/>`;
      }
      // Curve to one side so a pair stuck on each other shows two arrows.
      const [dx, dy] = [q.x - p.x, q.y - p.y];
      const len = Math.hypot(dx, dy);
      const [ux, uy] = [dx / len, dy / len];
      const clip = (g: WaitGroup, sign: number, o: { x: number; y: number }) => {
        const t = Math.min(boxW(g) / 2 / Math.max(Math.abs(ux), 1e-6), 20 / Math.max(Math.abs(uy), 1e-6)) + 4;
        return { x: o.x + sign * ux * t, y: o.y + sign * uy * t };
      };
      const s = clip(groups[a]!, 1, p);
      const e = clip(groups[b]!, -1, q);
      const c = { x: (s.x + e.x) / 2 - uy * 24, y: (s.y + e.y) / 2 + ux * 24 };
      return `<path class="${cls}" d="M${rd(s.x)},${rd(s.y)} Q${rd(c.x)},${rd(c.y)} ${rd(e.x)},${rd(e.y)}"/>`;
    })
    .join('');
  const words = groups
    .flatMap((g, i) => {
      if (g.kind === 'free') return [];
      const on = edges.filter(([a]) => a === i).map(([, b]) => groups[b]!);
      const them = on.map((o) => `${rankWord(o.ranks)} (${o.label.replace(/^not blocked: /, '')})`).join(' and ');
      const verb = g.kind === 'waits' ? g.label.replace(/^waits/, g.ranks.length > 1 ? 'wait' : 'waits') + ' for' : `${g.label}, which does not match`;
      return [`<li>${esc(`${rankWord(g.ranks)} ${verb} ${them}`)}</li>`];
    })
    .join('');
  return `<section id="waitfor"><h2>Wait-for graph</h2><p>An arrow from a box to another: those ranks are stuck in a collective until the other ranks issue it (solid) or because the other ranks issued a different one at the same position (dashed). A cycle of blocked ranks is a deadlock; an arrow to ranks that are not blocked means they moved on or finished without it.</p><ul>${words}</ul><svg xmlns="http://www.w3.org/2000/svg" class="waitfor" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}"><defs><marker id="wfarr" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L8,4L0,8z"/></marker></defs>${arrows}${boxes}</svg></section>`;
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

