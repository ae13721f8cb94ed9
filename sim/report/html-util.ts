// Small helpers the report's sections share: HTML escaping, rank lists, op abbreviations.

export const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/** `0, 2–5, 9`: ranks as ranges, so 63 waiting ranks read as one line. */
export function rankRanges(ranks: readonly number[]): string {
  const sorted = [...ranks].sort((a, b) => a - b);
  const out: string[] = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j]! + 1) j++;
    out.push(j === i ? `${sorted[i]}` : j === i + 1 ? `${sorted[i]}, ${sorted[j]}` : `${sorted[i]}–${sorted[j]}`);
    i = j + 1;
  }
  return out.join(', ');
}

export const rankWord = (ranks: readonly number[]) => (ranks.length === 1 ? `rank ${ranks[0]}` : `ranks ${rankRanges(ranks)}`);

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
