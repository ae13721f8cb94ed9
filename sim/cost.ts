// The discrete-event engine's cost model: how long a collective or a compute step takes in
// simulated time. Collectives cost latency + bytes / bandwidth on the link class they
// cross (intra-node: NVLink-like; inter-node: InfiniBand-like), with ranks packed onto
// nodes of `ranksPerNode` consecutive global ranks as launchers place them; compute costs
// FLOPs / rate. Defaults are H100-node-like, bf16.
import { collectiveDtype } from '../machines/snapshot.js';
import { UsageError } from '../src/errors.js';
import type { LedgerEntry } from '../machines/ledger.js';
import type { Scenario } from '../machines/scenario.js';

export interface LinkClass {
  /** Per-message latency, microseconds. */
  readonly latencyUs: number;
  /** Achieved bandwidth per rank and direction, GB/s. */
  readonly gbPerS: number;
}

export interface CostModel {
  readonly ranksPerNode: number;
  readonly intraNode: LinkClass;
  readonly interNode: LinkClass;
  /** Achieved dense TFLOP/s per rank. */
  readonly tflops: number;
  /** Bytes per activation or parameter element (2 for bf16). */
  readonly bytesPerElement: number;
}

export const DEFAULT_COST: CostModel = {
  ranksPerNode: 8,
  intraNode: { latencyUs: 3, gbPerS: 150 },
  interNode: { latencyUs: 10, gbPerS: 25 },
  tflops: 400,
  bytesPerElement: 2,
};

/** Fill defaults and check every field, naming it and the constraint. */
export function costModel(partial: Partial<CostModel> = {}): CostModel {
  const c: CostModel = { ...DEFAULT_COST, ...partial };
  const positive = (v: number, what: string) => {
    if (!(Number.isFinite(v) && v > 0)) throw new UsageError(`cost model: ${what} must be a positive number, got ${v}`);
  };
  if (!Number.isSafeInteger(c.ranksPerNode) || c.ranksPerNode < 1) throw new UsageError(`cost model: ranksPerNode must be a positive integer, got ${c.ranksPerNode}`);
  positive(c.intraNode.gbPerS, 'intraNode.gbPerS');
  positive(c.interNode.gbPerS, 'interNode.gbPerS');
  positive(c.tflops, 'tflops');
  positive(c.bytesPerElement, 'bytesPerElement');
  if (!(c.intraNode.latencyUs >= 0 && c.interNode.latencyUs >= 0)) throw new UsageError('cost model: latencies must be >= 0');
  return c;
}

const INDEX_BYTES = 8; // counts and expert ids travel as int64

const linkMs = (link: LinkClass, bytes: number) => link.latencyUs / 1e3 + bytes / (link.gbPerS * 1e6);

/**
 * Simulated duration of one completed collective position, `entries` in member order.
 * All-to-all: every rank moves its rows to each peer over the link class between them;
 * NVLink and the NIC run concurrently, so a rank takes the longer of the two, and the
 * collective takes as long as its slowest member. Ring collectives: (n-1) steps of
 * latency plus (n-1)/n of the payload (twice for an all-reduce).
 */
export function collectiveMs(c: CostModel, s: Scenario, entries: readonly LedgerEntry[]): number {
  const node = (rank: number) => Math.floor(rank / c.ranksPerNode);
  const first = entries[0]!;
  if (first.sendSplits) {
    const rowBytes = collectiveDtype(first.op) === 'i64' ? INDEX_BYTES : s.dim * c.bytesPerElement;
    let slowest = 0;
    // Once per position, not per pair: O(n²) lookups through the entries at thousands of ranks.
    const nodes = entries.map((e) => node(e.rank));
    for (const e of entries) {
      let intra = 0;
      let inter = 0;
      let crossesNodes = false;
      const home = nodes[e.member]!;
      const send = e.sendSplits!;
      const recv = e.recvSplits!;
      for (let j = 0; j < entries.length; j++) {
        if (j === e.member) continue;
        const rows = Math.max(send[j]!, recv[j]!);
        if (nodes[j] === home) intra += rows;
        else {
          inter += rows;
          crossesNodes = true;
        }
      }
      const t = Math.max(linkMs(c.intraNode, intra * rowBytes), crossesNodes ? linkMs(c.interNode, inter * rowBytes) : 0);
      slowest = Math.max(slowest, t);
    }
    return slowest;
  }
  const n = entries.length;
  const link = entries.some((e) => node(e.rank) !== node(first.rank)) ? c.interNode : c.intraNode;
  const elementBytes = first.op === 'metric.all_reduce' ? 4 : c.bytesPerElement;
  const passes = first.op === 'metric.all_reduce' ? 2 : 1;
  const bytes = (passes * (n - 1) * (first.size ?? 0) * elementBytes) / n;
  return (passes * (n - 1) * link.latencyUs) / 1e3 + bytes / (link.gbPerS * 1e6);
}

/** Expert FLOPs for `rows` rows: up (and gate for SwiGLU) and down projections. */
export function expertFlops(s: Scenario, rows: number): number {
  return 2 * rows * s.dim * s.hidden * (s.activation === 'silu' ? 3 : 2);
}

export const computeMs = (c: CostModel, flops: number) => flops / (c.tflops * 1e9);

/** Router FLOPs for `tokens` tokens: the [D, E] gate projection. */
export const routerFlops = (s: Scenario, tokens: number) => 2 * tokens * s.dim * s.experts;
