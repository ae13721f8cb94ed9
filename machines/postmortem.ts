// Findings only post-mortem evidence gives: a rank that left no evidence at all (no rank
// record, no Flight Recorder dump) died, and its peers wait for it. Engine-neutral, so the
// rank-record merge (actors/) and the dump reader (sim/) name it the same way.
import { rankWord, type Diagnosis, type RankReport } from './diagnosis.js';
import { describe, type LedgerEntry } from './ledger.js';
import type { CommunicatorSpec } from './mesh.js';

/**
 * The diagnosis when `dead` ranks left no evidence: their crash is the headline (everything
 * the others did follows from it), and what the replay of the rest found is kept in the cause.
 */
export function withDeadRanks(found: Diagnosis, dead: readonly number[], ledger: readonly LedgerEntry[], specs: readonly CommunicatorSpec[], evidence: string): Diagnosis {
  if (dead.length === 0) return found;
  const ranks = found.ranks.map((r) => (dead.includes(r.rank) ? { ...r, state: `dead (no ${evidence})`, op: null, phase: null } : r));
  const crash = crashDiagnosis(dead, ledger, specs, ranks, evidence);
  const besides = found.verdict === 'ok' || found.verdict === 'timeout' || found.verdict === 'crash' ? '' : `; besides, a ${found.verdict} on ${found.communicator}, position ${found.position}: ${found.cause}`;
  return { ...crash, cause: crash.cause + besides };
}

/**
 * The `crash` diagnosis for ranks that left no evidence: on the first communicator (in
 * `specs` order) where members issued a position the dead rank never did, the earliest
 * such position, and who waits there.
 */
function crashDiagnosis(dead: readonly number[], ledger: readonly LedgerEntry[], specs: readonly CommunicatorSpec[], ranks: readonly RankReport[], evidence: string): Diagnosis {
  const byPosition = new Map<string, LedgerEntry[]>();
  for (const e of ledger) {
    const k = `${e.communicator}#${e.position}`;
    byPosition.set(k, [...(byPosition.get(k) ?? []), e]);
  }
  let where: { spec: CommunicatorSpec; position: number; waiting: LedgerEntry[] } | null = null;
  for (const spec of specs) {
    if (!spec.members.some((r) => dead.includes(r))) continue;
    for (let p = 0; byPosition.has(`${spec.id}#${p}`); p++) {
      const waiting = byPosition.get(`${spec.id}#${p}`)!;
      if (waiting.some((e) => dead.includes(e.rank)) || waiting.length === spec.members.length) continue;
      where = { spec, position: p, waiting };
      break;
    }
    if (where) break;
  }
  const died = `${rankWord(dead)} left no ${evidence}: ${dead.length > 1 ? 'they' : 'it'} died (killed, out of memory or crashed) before writing one`;
  if (!where) return { verdict: 'crash', communicator: null, position: null, culprits: [...dead], ranks, cause: `${died}; no peer waits for ${dead.length > 1 ? 'them' : 'it'} in the evidence` };
  const w = where.waiting;
  const cause = `${died}; ${rankWord(w.map((e) => e.rank))} ${w.length > 1 ? 'wait' : 'waits'} for ${dead.length > 1 ? 'them' : 'it'} in ${describe(w[0]!)} (${where.spec.id}, position ${where.position})`;
  return { verdict: 'crash', communicator: where.spec.id, position: where.position, culprits: [...dead], ranks, cause };
}
