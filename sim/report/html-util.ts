// Small helpers the report's sections share: HTML escaping, and each collective's short
// code and colours (one table: the ledger's cells, the timeline's blocks and both legends).

/** Ranks above this many get the compact forms (short op codes, thin lanes). */
export const COMPACT_FROM = 16;

export const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/** Per op: the seed's letters for the EP exchanges (A–D forward, D′ B′ backward) or another short code, a ledger-cell tint and a timeline fill. */
const OPS: readonly (readonly [op: string, short: string, tint: string, fill: string])[] = [
  ['fwd.counts', 'A', '#dbeafe', '#93c5fd'],
  ['fwd.dispatch', 'B', '#bfdbfe', '#60a5fa'],
  ['fwd.expert_ids', 'C', '#c7d2fe', '#818cf8'],
  ['fwd.combine', 'D', '#a5f3fc', '#22d3ee'],
  ['bwd.combine', 'D′', '#bbf7d0', '#4ade80'],
  ['bwd.dispatch', 'B′', '#86efac', '#16a34a'],
  ['fsdp.all_gather', 'AG', '#e9d5ff', '#c084fc'],
  ['fsdp.reduce_scatter', 'RS', '#f5d0fe', '#e879f9'],
  ['metric.all_reduce', 'MR', '#fed7aa', '#fb923c'],
  ['shared.all_gather', 'SG', '#fef08a', '#eab308'],
  ['grad.all_gather', 'GG', '#e7e5e4', '#a8a29e'],
];
const OTHER = { tint: '#e5e7eb', fill: '#9ca3af' };
const SHORT = new Map(OPS.map(([op, short]) => [op, short]));

export const shortOp = (op: string) => SHORT.get(op) ?? op;
/** A CSS class per op, for its colour; ops outside the table share one. */
export const opClass = (op: string) => `op-${(SHORT.get(op) ?? 'x').replace('′', 'p')}`;
/** The ops in the table's order, then any others by name: the order legends list them in. */
export const opOrder = (ops: Iterable<string>): string[] => {
  const rank = (op: string) => OPS.findIndex(([o]) => o === op);
  return [...new Set(ops)].sort((a, b) => (rank(a) < 0 ? OPS.length : rank(a)) - (rank(b) < 0 ? OPS.length : rank(b)) || a.localeCompare(b));
};
/** Tints for HTML (ledger cells, legend chips), fills for SVG (timeline blocks, legend swatches). */
export const OP_CSS = [...OPS.map(([op, , tint, fill]) => [opClass(op), tint, fill] as const), ['op-x', OTHER.tint, OTHER.fill] as const]
  .map(([cls, tint, fill]) => `.${cls}{background:${tint}}svg .${cls}{fill:${fill}}`)
  .join('');

/** SVG coordinates to a tenth of a pixel. */
export const rd = (v: number) => Math.round(v * 10) / 10;
