// The report's wait-for graph: who waits on whom when the run stopped. Ranks in the same
// situation are one box, so 63 waiting ranks are one box; a rank that is not in a
// collective is drawn as what it is (finished, still computing, crashed), never as a
// generic blocker. The layout is sized from its boxes, so it fits at any scale.
import { machineGraph } from '../../machines/exporters.js';
import { rankMachine } from '../../machines/rankMachine.js';
import { rankRanges, rankWord } from '../../machines/diagnosis.js';
import type { LedgerEntry } from '../../machines/ledger.js';
import type { ReportInput } from '../../machines/record.js';
import { esc, rd } from './html-util.js';
import { ledgerGrid, signature } from './sections.js';

/**
 * waits: blocked in a collective some members never issued; mismatch: blocked in one whose
 * members issued different things; finished: in a final state; computing: on its own work
 * (routing, expert compute), not blocked; crashed: the rank a crash verdict names.
 */
export type WaitKind = 'waits' | 'mismatch' | 'finished' | 'computing' | 'crashed';

export interface WaitGroup {
  readonly ranks: number[];
  readonly label: string;
  readonly kind: WaitKind;
  /** The ranks its members are stuck on (the same for every member; empty when not stuck). */
  readonly on: readonly number[];
}

const FINAL_STATES = new Set(machineGraph(rankMachine).states.filter((s) => s.kind === 'final').map((s) => s.path));

/**
 * A rank whose last collective never completed waits on every member of that communicator
 * that did not issue the position (AND edges); at a mismatch every member issued, and each
 * is stuck on the members that issued something else (on all the others when only the
 * sizes differ: one box with a loop).
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
    const where = state.get(r) ?? '?';
    const at = w ? `${w.e.op} (${w.e.communicator} #${w.e.position})` : '';
    const [key, kind, label]: [string, WaitKind, string] = w
      ? w.kind === 'waits'
        ? [`waits|${at}|${w.on.join(',')}`, 'waits', `waits in ${at}`]
        : [`mismatch|${at}|${signature(w.e)}`, 'mismatch', `issued ${at}`]
      : d.verdict === 'crash' && d.culprits.includes(r)
        ? [`crashed|${where}`, 'crashed', `crashed in ${where}`]
        : FINAL_STATES.has(where)
          ? [`finished|${where}`, 'finished', `finished: in ${where}`]
          : [`computing|${where}`, 'computing', `${d.verdict === 'stall' && d.culprits.includes(r) ? 'computing, never returns' : 'still computing'}: in ${where}`];
    const g = byKey.get(key) ?? { ranks: [], label, kind, on: w?.on ?? [] };
    g.ranks.push(r);
    byKey.set(key, g);
  }
  const groups = [...byKey.values()];
  const groupOf = new Map(groups.flatMap((g, i) => g.ranks.map((r) => [r, i] as const)));
  const edges = new Set<string>();
  for (const [r, w] of stuck) for (const o of w.on) edges.add(`${groupOf.get(r)}>${groupOf.get(o)}`);
  return { groups, edges: [...edges].map((s) => s.split('>').map(Number) as [number, number]) };
}

const BOX_H = 40;
const MARGIN = 16;
/** Room right of a box for its loop (a group stuck on itself). */
const LOOP_W = 56;
/** Longer rank lists are cut in the box (the full list is its tooltip and in the words above). */
const MAX_RANK_TEXT = 34;

function ranksText(ranks: readonly number[]): string {
  const full = rankWord(ranks);
  if (full.length <= MAX_RANK_TEXT) return full;
  const list = rankRanges(ranks);
  return `${ranks.length} ranks: ${list.slice(0, list.lastIndexOf(', ', MAX_RANK_TEXT - 14))}, …`;
}

const boxW = (g: WaitGroup) => Math.max(ranksText(g.ranks).length * 6.8, g.label.length * 5.9) + 20;

/**
 * Box centres: when the arrows form no cycle, columns by longest path (waiters left of what
 * they wait on); otherwise an ellipse, widened until no two boxes overlap. Then shifted so
 * every box (and loop) lies inside the returned width and height.
 */
function layout(groups: readonly WaitGroup[], edges: readonly [number, number][]): { pos: { x: number; y: number }[]; width: number; height: number } {
  const w = groups.map(boxW);
  const n = groups.length;
  const links = edges.filter(([a, b]) => a !== b);
  const column = new Array<number>(n).fill(0);
  const indeg = column.map((_, i) => links.filter(([, b]) => b === i).length);
  const queue = indeg.flatMap((k, i) => (k === 0 ? [i] : []));
  let seen = 0;
  while (queue.length) {
    const i = queue.shift()!;
    seen++;
    for (const [a, b] of links) if (a === i) {
      column[b] = Math.max(column[b]!, column[i]! + 1);
      if (--indeg[b]! === 0) queue.push(b);
    }
  }
  let pos: { x: number; y: number }[];
  if (seen === n) {
    const cols = Math.max(...column) + 1;
    const colW = Array.from({ length: cols }, (_, c) => Math.max(...w.filter((_, i) => column[i] === c)));
    const rows = Array.from({ length: cols }, (_, c) => column.filter((k) => k === c).length);
    const tallest = Math.max(...rows);
    const next = new Array<number>(cols).fill(0);
    pos = groups.map((_, i) => {
      const c = column[i]!;
      const x = colW.slice(0, c).reduce((a, cw) => a + cw + 140, 0) + colW[c]! / 2;
      const y = ((tallest - rows[c]!) / 2 + next[c]!++) * (BOX_H + 28);
      return { x, y };
    });
  } else {
    const overlaps = (p: { x: number; y: number }[]) => p.some((a, i) => p.some((b, j) => j > i && Math.abs(a.x - b.x) < (w[i]! + w[j]!) / 2 + 24 && Math.abs(a.y - b.y) < BOX_H + 24));
    let [rx, ry] = [Math.max(...w) / 2 + 60, BOX_H + 30];
    const at = () => groups.map((_, i) => ({ x: rx * Math.cos(Math.PI + (2 * Math.PI * i) / n), y: ry * Math.sin(Math.PI + (2 * Math.PI * i) / n) }));
    for (pos = at(); overlaps(pos); pos = at()) [rx, ry] = [rx * 1.1, ry * 1.1];
  }
  const loops = new Set(edges.filter(([a, b]) => a === b).map(([a]) => a));
  const left = Math.min(...pos.map((p, i) => p.x - w[i]! / 2));
  const right = Math.max(...pos.map((p, i) => p.x + w[i]! / 2 + (loops.has(i) ? LOOP_W : 0)));
  const topY = Math.min(...pos.map((p) => p.y - BOX_H / 2 - (loops.size ? 20 : 0)));
  const bottomY = Math.max(...pos.map((p) => p.y + BOX_H / 2 + (loops.size ? 20 : 0)));
  // Curved arrows bow out up to about 24 px beside the straight line.
  const pad = MARGIN + 24;
  return { pos: pos.map((p) => ({ x: p.x - left + pad, y: p.y - topY + pad })), width: Math.ceil(right - left + 2 * pad), height: Math.ceil(bottomY - topY + 2 * pad) };
}

export function waitForSection(input: ReportInput): string {
  const { groups, edges } = waitForGraph(input);
  if (groups.length === 0) return `<section id="waitfor"><h2>Wait-for graph</h2><p>Nothing waits: every collective issued was matched by all members of its communicator.</p></section>`;
  const culprits = new Set(input.diagnosis.culprits);
  const { pos, width, height } = layout(groups, edges);
  const boxes = groups
    .map((g, i) => {
      const w = boxW(g);
      const { x, y } = pos[i]!;
      const cls = `wf ${g.kind}${g.ranks.some((r) => culprits.has(r)) ? ' culprit' : ''}`;
      return `<g class="${cls}" data-ranks="${esc(rankRanges(g.ranks))}"><title>${esc(`${rankWord(g.ranks)}: ${g.label}`)}</title><rect x="${rd(x - w / 2)}" y="${rd(y - BOX_H / 2)}" width="${rd(w)}" height="${BOX_H}" rx="6"/><text x="${rd(x)}" y="${rd(y - 4)}">${esc(ranksText(g.ranks))}</text><text class="sub" x="${rd(x)}" y="${rd(y + 12)}">${esc(g.label)}</text></g>`;
    })
    .join('');
  const arrows = edges
    .map(([a, b]) => {
      const p = pos[a]!;
      const q = pos[b]!;
      // An arrow to ranks still computing is not a block: they have not issued it yet.
      const cls = `wfe ${groups[b]!.kind === 'computing' ? 'arrives' : groups[a]!.kind}`;
      if (a === b) {
        const w = boxW(groups[a]!);
        return `<path class="${cls}" d="M${rd(p.x + w / 2)},${rd(p.y - 8)} C${rd(p.x + w / 2 + 50)},${rd(p.y - 40)} ${rd(p.x + w / 2 + 50)},${rd(p.y + 40)} ${rd(p.x + w / 2)},${rd(p.y + 8)}"/>`;
      }
      // Curve to one side so a pair stuck on each other shows two arrows.
      const [dx, dy] = [q.x - p.x, q.y - p.y];
      const len = Math.hypot(dx, dy);
      const [ux, uy] = [dx / len, dy / len];
      const clip = (g: WaitGroup, sign: number, o: { x: number; y: number }) => {
        const t = Math.min(boxW(g) / 2 / Math.max(Math.abs(ux), 1e-6), BOX_H / 2 / Math.max(Math.abs(uy), 1e-6)) + 4;
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
      if (g.kind !== 'waits' && g.kind !== 'mismatch') return [];
      // The ranks this box is stuck on, by the box each is drawn in (a box may hold others too).
      const them = edges
        .filter(([a]) => a === i)
        .map(([, b]) => groups[b]!)
        .map((o) => `${rankWord(o.ranks.filter((r) => g.on.includes(r)))} (${o.kind === 'waits' || o.kind === 'mismatch' ? o.label : o.label.replace(/: in /, ', in ')})`)
        .join(' and ');
      // A box stuck only on itself: its ranks issued the same op with sizes that disagree.
      if (edges.every(([a, b]) => a !== i || b === i)) return [`<li>${esc(`${rankWord(g.ranks)} ${g.label}, with sizes that do not match one another`)}</li>`];
      const verb = g.kind === 'waits' ? g.label.replace(/^waits/, g.ranks.length > 1 ? 'wait' : 'waits') + ' for' : `${g.label}, which does not match`;
      return [`<li>${esc(`${rankWord(g.ranks)} ${verb} ${them}`)}</li>`];
    })
    .join('');
  const kinds = new Set(groups.map((g) => g.kind));
  const key = [
    ['waits', 'blocked in a collective'],
    ['mismatch', 'blocked in a collective its peers issued differently'],
    ['finished', 'finished or left without it'],
    ['computing', 'not blocked: still on its own work (routing, expert compute), it has not issued the collective yet'],
    ['crashed', 'crashed'],
  ]
    .filter(([k]) => kinds.has(k as WaitKind))
    .map(([k, what]) => `<span><i class="wf-key ${k}"></i>${what}</span>`)
    .join('');
  return `<section id="waitfor"><h2>Wait-for graph</h2><p>An arrow from a box to another: those ranks are stuck in a collective until the other ranks issue it (solid), because the other ranks issued a different one at the same position (dashed), or they wait for ranks still computing (dotted: not a block by itself). A cycle of blocked ranks is a deadlock; an arrow to ranks that finished means they moved on without it. A thick border marks the culprit.</p><p class="key">${key}</p><ul>${words}</ul><svg xmlns="http://www.w3.org/2000/svg" class="waitfor" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}"><defs><marker id="wfarr" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L8,4L0,8z"/></marker></defs>${arrows}${boxes}</svg></section>`;
}
