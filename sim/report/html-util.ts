// Small helpers the report's sections share: HTML escaping and op abbreviations.

export const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/** The seed's letters for the EP exchanges (A–D forward, D′ B′ backward) and FSDP's. */
const SHORT: Record<string, string> = {
  'fwd.counts': 'A',
  'fwd.dispatch': 'B',
  'fwd.expert_ids': 'C',
  'fwd.combine': 'D',
  'bwd.combine': 'D′',
  'bwd.dispatch': 'B′',
  'fsdp.all_gather': 'AG',
  'fsdp.reduce_scatter': 'RS',
};
export const shortOp = (op: string) => SHORT[op] ?? op;
/** A CSS class per op, for its colour. */
export const opClass = (op: string) => `op-${(SHORT[op] ?? 'x').replace('′', 'p')}`;
export const OP_LEGEND = Object.entries(SHORT);
