// Comparing ledgers from different runs: what each rank issued where, order-free.
import type { LedgerEntry } from '../machines/ledger.js';

export const canonicalLedger = (ledger: readonly LedgerEntry[]): string[] =>
  ledger.map((e) => JSON.stringify([e.communicator, e.position, e.rank, e.op, e.layer, e.microBatch, e.unit, e.sendSplits, e.recvSplits, e.size, e.dtype, e.statePath])).sort();
