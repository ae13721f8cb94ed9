// The machine diagram of the report: a layered (Sugiyama-style) layout of the exported
// machine graph, computed here at generation time and written as plain SVG, so the page
// needs no layout library. Leaves are boxes, compound states are frames around their
// leaves, transitions out of a compound state start at an "any state" node inside it.
// Also maps a rank's visited state paths onto the diagram's nodes and edges.
import { entryLeaf, isAncestor, stateIndex, transitionLabel, type GraphTransition, type MachineGraph } from '../../machines/exporters.js';
import { esc } from './html-util.js';

interface Node {
  readonly id: string;
  /** The state path (`forward.counts`), or `*any*` plus the compound path for an any-state node. */
  readonly path: string;
  readonly label: string;
  readonly sub: string | null;
  readonly final: boolean;
  /** Top-level ancestor: keeps a compound state's leaves together in a layer. */
  readonly group: string;
  layer: number;
  x: number;
  readonly w: number;
}

interface Edge {
  readonly t: GraphTransition;
  readonly from: number;
  readonly to: number;
  back: boolean;
}

export interface Diagram {
  readonly svg: string;
  /** Node index per state path, and the candidate edges per (from path, to path) step. */
  readonly nodeOf: ReadonlyMap<string, number>;
  readonly edgesOf: (from: string, to: string) => number[];
  readonly nodeCount: number;
}

const LAYER_H = 54;
const NODE_H = 30;
const CHAR_W = 6.6;
const GAP = 26;
const MARGIN = 20;
/** Room on the left for the labels of edges routed round the left side. */
const LEFT = 150;

export function renderDiagram(g: MachineGraph): Diagram {
  const byId = stateIndex(g);
  const topOf = (id: string) => {
    let s = byId.get(id)!;
    while (s.parent && s.parent !== g.root) s = byId.get(s.parent)!;
    return s.id;
  };
  const nodes: Node[] = [];
  const nodeOf = new Map<string, number>();
  const add = (id: string, path: string, label: string, sub: string | null, final: boolean) => {
    nodeOf.set(path, nodes.length);
    nodes.push({ id, path, label, sub, final, group: topOf(id), layer: 0, x: 0, w: Math.max(label.length, sub?.length ?? 0) * CHAR_W + 18 });
  };
  for (const s of g.states) {
    if (s.children.length === 0) {
      const c = (s.meta?.collective ?? null) as { op?: string; comm?: string } | null;
      add(s.id, s.path, s.key, c?.op ? `${c.op} · ${c.comm}` : null, s.kind === 'final');
    } else if (g.transitions.some((t) => t.source === s.id)) {
      add(s.id, `*any*${s.path}`, s.id === g.root ? 'any state' : `any state in ${s.key}`, null, false);
    }
  }
  const nodeFor = (id: string) => {
    const s = byId.get(id)!;
    return nodeOf.get(s.children.length ? `*any*${s.path}` : s.path)!;
  };
  const edges: Edge[] = g.transitions.flatMap((t) =>
    (t.targets.length ? t.targets : [t.source]).map((tgt) => ({ t, from: nodeFor(t.source), to: nodeOf.get(byId.get(entryLeaf(g, tgt))!.path)!, back: false })),
  );

  // Back edges: those closing a cycle in a depth-first walk from the initial leaf, in
  // document order, so loops (next layer, next micro-batch) point back up.
  const out = nodes.map((_, i) => edges.filter((e) => e.from === i));
  const state = new Array<0 | 1 | 2>(nodes.length).fill(0);
  const dfs = (i: number) => {
    state[i] = 1;
    for (const e of out[i]!) {
      if (state[e.to] === 1 || e.to === i) e.back = true;
      else if (state[e.to] === 0) dfs(e.to);
    }
    state[i] = 2;
  };
  dfs(nodeOf.get(byId.get(entryLeaf(g, g.root))!.path)!);
  nodes.forEach((_, i) => state[i] === 0 && dfs(i));

  // Longest-path layering over the forward edges.
  const order = topo(nodes.length, edges.filter((e) => !e.back));
  for (const i of order) for (const e of out[i]!) if (!e.back) nodes[e.to]!.layer = Math.max(nodes[e.to]!.layer, nodes[i]!.layer + 1);

  // Order within layers: group, then the mean x of predecessors; pack left to right.
  const layers: number[][] = [];
  nodes.forEach((n, i) => (layers[n.layer] ??= []).push(i));
  const groups = [...new Set(nodes.map((n) => n.group))];
  let xcur = LEFT;
  for (const layer of layers) {
    if (!layer) continue;
    const want = (i: number) => {
      const preds = edges.filter((e) => e.to === i && !e.back && nodes[e.from]!.layer < nodes[i]!.layer);
      return preds.length ? preds.reduce((a, e) => a + nodes[e.from]!.x, 0) / preds.length : LEFT + nodes[i]!.w / 2;
    };
    layer.sort((a, b) => groups.indexOf(nodes[a]!.group) - groups.indexOf(nodes[b]!.group) || want(a) - want(b));
    xcur = LEFT;
    let prevGroup: string | null = null;
    for (const i of layer) {
      const n = nodes[i]!;
      const gap = prevGroup !== null && prevGroup !== n.group ? GAP * 2 : GAP;
      n.x = Math.max(want(i), xcur + (prevGroup === null ? 0 : gap) + n.w / 2);
      xcur = n.x + n.w / 2;
      prevGroup = n.group;
    }
  }

  const y = (n: Node) => MARGIN + 18 + n.layer * LAYER_H;
  const width = Math.ceil(Math.max(...nodes.map((n) => n.x + n.w / 2)) + MARGIN + 120);
  const height = Math.ceil(Math.max(...nodes.map((n) => y(n) + NODE_H)) + MARGIN);
  const parts: string[] = [];

  // Frames for compound states below the root, from their leaves' extent.
  for (const s of g.states) {
    if (s.id === g.root || s.children.length === 0) continue;
    const inside = nodes.filter((n) => (n.id !== s.id && isAncestor(g, s.id, n.id)) || n.path === `*any*${s.path}`);
    if (!inside.length) continue;
    const x0 = Math.min(...inside.map((n) => n.x - n.w / 2)) - 10;
    const x1 = Math.max(...inside.map((n) => n.x + n.w / 2)) + 10;
    const y0 = Math.min(...inside.map(y)) - 16;
    const y1 = Math.max(...inside.map((n) => y(n) + NODE_H)) + 8;
    parts.push(`<g class="frame"><rect x="${r(x0)}" y="${r(y0)}" width="${r(x1 - x0)}" height="${r(y1 - y0)}" rx="8"/><text x="${r(x0 + 8)}" y="${r(y0 + 12)}">${esc(s.key)}</text></g>`);
  }

  edges.forEach((e, k) => {
    const a = nodes[e.from]!;
    const b = nodes[e.to]!;
    let d: string;
    let lx: number;
    let ly: number;
    let anchorEnd = false;
    if (e.back || e.from === e.to) {
      // Loops run up the right-hand side of both nodes, wider for longer spans.
      const bulge = 30 + 6 * Math.abs(a.layer - b.layer);
      const [sx, sy, tx, ty] = [a.x + a.w / 2, y(a) + NODE_H / 2, b.x + b.w / 2, y(b) + NODE_H / 2];
      const cx = Math.max(sx, tx) + bulge;
      d = `M${r(sx)},${r(sy)} C${r(cx)},${r(sy)} ${r(cx)},${r(ty)} ${r(tx)},${r(ty)}`;
      lx = cx - 0.25 * bulge;
      ly = (sy + ty) / 2;
    } else if (b.layer - a.layer > 1 && Math.abs(a.x - b.x) < (a.w + b.w) / 2) {
      // An edge skipping layers in the same column would cross the boxes between: go round the left.
      const bulge = 24 + 4 * (b.layer - a.layer);
      const [sx, sy, tx, ty] = [a.x - a.w / 2, y(a) + NODE_H / 2, b.x - b.w / 2, y(b) + NODE_H / 2];
      const cx = Math.min(sx, tx) - bulge;
      d = `M${r(sx)},${r(sy)} C${r(cx)},${r(sy)} ${r(cx)},${r(ty)} ${r(tx)},${r(ty)}`;
      lx = cx + 0.25 * bulge;
      ly = (sy + ty) / 2;
      anchorEnd = true;
    } else {
      const [sx, sy, tx, ty] = [a.x, y(a) + NODE_H, b.x, y(b)];
      const my = (sy + ty) / 2;
      d = `M${r(sx)},${r(sy)} C${r(sx)},${r(my)} ${r(tx)},${r(my)} ${r(tx)},${r(ty)}`;
      lx = (sx + tx) / 2 + 4;
      ly = my;
    }
    const cls = ['tr', e.t.event === null ? 'always' : '', e.t.live === false ? 'dead' : ''].filter(Boolean).join(' ');
    const label = e.t.guard ? `<text x="${r(lx)}" y="${r(ly)}"${anchorEnd ? ' text-anchor="end"' : ''}>${esc(e.t.live === false ? `${e.t.guard} ✗` : e.t.guard)}</text>` : '';
    parts.push(`<g class="${cls}" id="tr-${k}"><title>${esc(transitionLabel(e.t))}${e.t.live === false ? ` (no guard can take it under ${esc(g.variant ?? '')})` : ''}</title><path d="${d}"/>${label}</g>`);
  });

  nodes.forEach((n, i) => {
    const cls = ['st', n.final ? 'final' : '', n.path.startsWith('*any*') ? 'any' : ''].filter(Boolean).join(' ');
    const x0 = n.x - n.w / 2;
    const text = n.sub
      ? `<text x="${r(n.x)}" y="${r(y(n) + 12)}">${esc(n.label)}</text><text class="sub" x="${r(n.x)}" y="${r(y(n) + 24)}">${esc(n.sub)}</text>`
      : `<text x="${r(n.x)}" y="${r(y(n) + 19)}">${esc(n.label)}</text>`;
    parts.push(`<g class="${cls}" id="st-${i}" data-path="${esc(n.path)}"><rect x="${r(x0)}" y="${y(n)}" width="${r(n.w)}" height="${NODE_H}" rx="${n.final ? 15 : 6}"/>${text}</g>`);
  });

  const svg =
    `<svg xmlns="http://www.w3.org/2000/svg" class="machine" viewBox="0 0 ${width} ${height}" width="${width}" height="${height}" role="img" aria-label="${esc(g.id)} state machine">` +
    `<defs><marker id="arr" viewBox="0 0 8 8" refX="7" refY="4" markerUnits="userSpaceOnUse" markerWidth="8" markerHeight="8" orient="auto-start-reverse"><path d="M0,0L8,4L0,8z"/></marker></defs>` +
    parts.join('') +
    '</svg>';

  const edgesOf = (from: string, to: string): number[] => {
    const fromId = `${g.id}.${from}`;
    const toNode = nodeOf.get(to);
    if (toNode === undefined || !byId.has(fromId)) return [];
    const cands = edges.flatMap((e, k) => (e.to === toNode && isAncestor(g, e.t.source, fromId) ? [k] : []));
    // Prefer transitions the variant's guards can take, then the innermost source (xstate's priority).
    const live = cands.filter((k) => edges[k]!.t.live !== false);
    const pool = live.length ? live : cands;
    const depth = (k: number) => byId.get(edges[k]!.t.source)!.path.split('.').filter(Boolean).length;
    const deepest = Math.max(...pool.map(depth));
    return pool.filter((k) => depth(k) === deepest);
  };
  return { svg, nodeOf, edgesOf, nodeCount: nodes.length };
}

/** Kahn's algorithm; the graph has no cycles once back edges are set aside. */
function topo(n: number, edges: readonly Edge[]): number[] {
  const indeg = new Array<number>(n).fill(0);
  for (const e of edges) indeg[e.to]!++;
  const queue = indeg.flatMap((d, i) => (d === 0 ? [i] : []));
  const order: number[] = [];
  while (queue.length) {
    const i = queue.shift()!;
    order.push(i);
    for (const e of edges) if (e.from === i && --indeg[e.to]! === 0) queue.push(e.to);
  }
  return order;
}

const r = (v: number) => Math.round(v * 10) / 10;
