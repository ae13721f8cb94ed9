// Turning a tracker finding plus every rank's machine snapshot into the diagnosis users
// read: communicator, position, each rank's op and state, the culprits, and the cause in
// the user's terms, quoting the guard decisions that took a rank off its peers' path.
import type { CollectiveOp } from '../src/ep/types.js';
import type { CollectiveTracker, Finding } from './ledger.js';
import { expertsWithGrads } from './rankMachine.js';
import { issuedCollective, statePath, type RankSnapshot } from './snapshot.js';

/** stall: a rank's compute (routing, expert forward or backward) never returned; the others only wait for it. */
export type VerdictKind = 'ok' | 'mismatch' | 'missing' | 'cycle' | 'crash' | 'timeout' | 'stall' | 'violation';

export interface RankReport {
  readonly rank: number;
  readonly state: string;
  readonly op: CollectiveOp | null;
  readonly phase: 'forward' | 'backward' | null;
  readonly layer: number;
  readonly microBatch: number;
}

export interface Diagnosis {
  readonly verdict: VerdictKind;
  readonly communicator: string | null;
  readonly position: number | null;
  readonly culprits: readonly number[];
  readonly ranks: readonly RankReport[];
  readonly cause: string;
  /** Every hung communicator at quiescence, in canonical order (the headline first); absent when none hung. */
  readonly hangs?: readonly HangSummary[];
  /** From the event that made the verdict certain to the verdict (actor runtime). */
  detectedAfterMs?: number;
}

export function rankReports(snapshots: readonly RankSnapshot[], tracker: CollectiveTracker): RankReport[] {
  return snapshots.map((s, rank) => {
    const path = statePath(s);
    const blocked = tracker.blockedOn(rank);
    const issued = blocked ?? issuedCollective(s);
    return {
      rank,
      state: path,
      op: issued?.op ?? null,
      phase: issued?.phase ?? (s.matches('forward') ? 'forward' : s.matches('backward') ? 'backward' : null),
      layer: s.context.layer,
      microBatch: s.context.microBatch,
    };
  });
}

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

/** One hung communicator of a run, as the JSON lists them (the first is the headline). */
export interface HangSummary {
  readonly verdict: Finding['kind'];
  readonly communicator: string;
  readonly position: number;
  readonly culprits: readonly number[];
  readonly detail: string;
}

/** The tracker's hangs (machines/ledger.ts hangs()) as the JSON lists them. */
export const hangSummaries = (hangs: readonly Finding[]): HangSummary[] => hangs.map((h) => ({ verdict: h.kind, communicator: h.communicator, position: h.position, culprits: h.culprits, detail: h.detail }));

/** The diagnosis of a hung run: the first hang (canonical order, machines/ledger.ts hangs()) as the headline, every hang listed. */
export function diagnoseHangs(hangs: readonly Finding[], snapshots: readonly RankSnapshot[], tracker: CollectiveTracker): Diagnosis {
  const headline = hangs[0];
  if (!headline) throw new Error('diagnoseHangs: no hang to diagnose');
  return { ...diagnose(headline, snapshots, tracker), hangs: hangSummaries(hangs) };
}

/**
 * The diagnosis of one finding. Culprits come from the ledger (the finding's); the machine's
 * skip decisions explain why they departed. Where the ledger cannot tell the departing
 * member (two members, two different collectives) the ones whose guards skipped something
 * are named; where the machine's decisions point elsewhere, the cause says so.
 */
export function diagnose(finding: Finding, snapshots: readonly RankSnapshot[], tracker: CollectiveTracker): Diagnosis {
  const ranks = rankReports(snapshots, tracker);
  const waiting = ranks.filter((r) => {
    const b = tracker.blockedOn(r.rank);
    return b && b.communicator === finding.communicator && b.position === finding.position;
  });
  const skipped = (rank: number) => snapshots[rank]!.context.skips.length > 0;
  const skippersAmong = finding.culprits.filter(skipped);
  const culprits = finding.kind === 'mismatch' && skippersAmong.length > 0 ? skippersAmong : finding.culprits;
  const parts: string[] = [];
  const skipsOf = culprits.flatMap((rank) => {
    const ctx = snapshots[rank]!.context;
    const skip = ctx.skips[ctx.skips.length - 1];
    return skip ? [{ rank, skip, rule: ctx.cfg.variant.rule }] : [];
  });
  if (skipsOf.length > 0) {
    // Facts per rank, the variant's rule once, then what each rank consequently skipped.
    const skippedOps = [...new Set(skipsOf.map((x) => x.skip.skipped.join(' and ')))];
    const who = skippedOps.map((ops) => `${rankWord(skipsOf.filter((x) => x.skip.skipped.join(' and ') === ops).map((x) => x.rank))} skipped ${ops}`);
    parts.push(`${skipsOf.map((x) => x.skip.fact).join('; ')}; ${skipsOf[0]!.rule}, so ${who.join(' and ')}`);
  } else {
    parts.push(finding.detail);
    // The decisions that shaped what the culprits issued at that position, in their words.
    const why = tracker.entries.filter((e) => e.communicator === finding.communicator && e.position === finding.position && culprits.includes(e.rank)).flatMap((e) => e.why.map((d) => d.fact));
    if (why.length > 0) parts.push(`${[...new Set(why)].join('; ')} (${snapshots[culprits[0]!]!.context.cfg.variant.rule})`);
    const elsewhere = snapshots.flatMap((s, rank) => (skipped(rank) ? [rank] : []));
    if (finding.kind !== 'cycle' && elsewhere.length > 0) parts.push(`the machines' skip decisions name ${rankWord(elsewhere)}, not the ledger's culprit${culprits.length > 1 ? 's' : ''}`);
  }
  const variant = snapshots[0]?.context.cfg.variant;
  if (variant?.localCapacity && finding.kind === 'mismatch') {
    parts.push(`${variant.rule}: ${culprits.map((r) => `rank ${r} holds ${snapshots[r]!.context.facts[snapshots[r]!.context.layer]?.tokens ?? 0} tokens`).join(', ')}`);
  }
  const blockedEntry = tracker.blockedOn(waiting[0]?.rank ?? -1);
  if (blockedEntry?.op === 'fsdp.reduce_scatter' && finding.kind === 'mismatch' && skippersAmong.length === 0) {
    parts.push(
      `${snapshots[0]!.context.cfg.variant.rule}: ${finding.culprits
        .map((r) => `rank ${r} has gradients for ${expertsWithGrads(snapshots[r]!.context)} of ${snapshots[r]!.context.cfg.numExperts / snapshots[r]!.context.cfg.ep} local experts`)
        .join(', ')}`,
    );
  }
  const waiters = waiting.filter((w) => !culprits.includes(w.rank));
  if (waiters.length > 0 && finding.kind !== 'cycle') {
    parts.push(`${rankWord(waiters.map((w) => w.rank))} ${waiters.length === 1 ? 'waits' : 'wait'} in ${waiters[0]!.op} (${finding.communicator}, position ${finding.position})`);
  }
  if (finding.kind === 'cycle') parts.push(`a wait-for cycle across communicators: ${finding.detail}`);
  return { verdict: finding.kind === 'blocked' ? 'timeout' : finding.kind, communicator: finding.communicator, position: finding.position, culprits, ranks, cause: parts.join('; ') };
}

/**
 * A stall: ranks whose own work (routing, expert compute) never returned, each with what it
 * was doing (and, on a wall clock, for how long past which limit). The ranks blocked in
 * collectives only wait for them: no collective finding is named.
 */
export function stallDiagnosis(stalled: readonly { rank: number; what: string; forMs?: number }[], snapshots: readonly RankSnapshot[], tracker: CollectiveTracker, limitMs?: number): Diagnosis {
  const waiters = snapshots.flatMap((_, r) => (tracker.blockedOn(r) ? [r] : []));
  const what = stalled.map((x) => `rank ${x.rank} has not returned from ${x.what}${x.forMs !== undefined ? ` for ${Math.round(x.forMs)} ms` : ''}`).join('; ');
  const limit = limitMs !== undefined ? ` (compute limit ${limitMs} ms)` : '';
  const wait = waiters.length ? `; ${rankWord(waiters)} wait for it in their collectives, which is not a hang of theirs` : '';
  return { verdict: 'stall', communicator: null, position: null, culprits: stalled.map((x) => x.rank), ranks: rankReports(snapshots, tracker), cause: `${what}${limit}${wait}` };
}

export function okDiagnosis(snapshots: readonly RankSnapshot[], tracker: CollectiveTracker): Diagnosis {
  const n = tracker.entries.length;
  return { verdict: 'ok', communicator: null, position: null, culprits: [], ranks: rankReports(snapshots, tracker), cause: `every rank finished the step; ${n} collective calls matched` };
}

/** A readable, multi-line form of a diagnosis for the terminal. */
export function formatDiagnosis(d: Diagnosis): string {
  const head = d.verdict === 'ok' ? 'ok' : `${d.verdict.toUpperCase()}${d.communicator ? ` on ${d.communicator}, position ${d.position}` : ''}`;
  const lines = [`verdict: ${head}`, `cause:   ${d.cause}`];
  if (d.culprits.length) lines.push(`culprit: ${rankWord(d.culprits)}`);
  for (const h of d.hangs?.slice(1) ?? []) lines.push(`also:    ${h.verdict} on ${h.communicator}, position ${h.position} (${rankWord(h.culprits)}): ${h.detail}`);
  if (d.detectedAfterMs !== undefined) lines.push(`detected ${d.detectedAfterMs.toFixed(1)} ms after the deciding event`);
  if (d.verdict !== 'ok') {
    lines.push('ranks:');
    for (const r of d.ranks) {
      lines.push(`  rank ${String(r.rank).padEnd(3)} ${r.state.padEnd(28)} ${(r.op ?? '-').padEnd(20)} layer ${r.layer}${r.microBatch ? ` mb ${r.microBatch}` : ''}`);
    }
  }
  return lines.join('\n');
}
