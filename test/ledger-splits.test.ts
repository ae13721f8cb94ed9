// The tracker skips split pairs it already proved (a verified position's splits brought
// again, as they were or swapped; splits that all hold one value): a mismatch must still be
// found at the same issue and named as a tracker with no such history names it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { CollectiveTracker, type Finding } from '../machines/ledger.js';
import type { IssuedCollective } from '../machines/snapshot.js';
import type { CollectiveOp } from '../src/ep/types.js';

const EP = 4;
const mesh = { ep: EP, dp: 1 };

function a2a(op: CollectiveOp, sendSplits: readonly number[], recvSplits: readonly number[]): IssuedCollective {
  return { comm: 'ep', op, issuer: 'layer', unit: null, phase: 'forward', layer: 0, microBatch: 0, sendSplits, recvSplits, size: null, statePath: op, why: [] };
}

/** Row r: what rank r sends each peer; column r: what it receives. */
const routing = [
  [0, 3, 1, 2],
  [2, 0, 4, 1],
  [1, 1, 0, 5],
  [3, 2, 2, 0],
];
const send = (r: number) => routing[r]!;
const recv = (r: number) => routing.map((row) => row[r]!);

/** Issues one position for every rank in order; the first finding, with the rank whose issue produced it. */
function position(t: CollectiveTracker, issued: (r: number) => IssuedCollective): { rank: number; finding: Finding } | null {
  for (let r = 0; r < EP; r++) {
    const { finding } = t.issue(r, issued(r), 'i64');
    if (finding) return { rank: r, finding };
  }
  return null;
}

/** Rank 3 sends one row more to rank 0 and one fewer to rank 1: its total is right, two pairs are not. */
const shifted = (splits: readonly number[]) => splits.map((x, j) => (j === 0 ? x + 1 : j === 1 ? x - 1 : x));

test('a mismatch after a verified position (splits reused as they were) is found and named as without it', () => {
  const verified = new CollectiveTracker(mesh);
  assert.is(position(verified, (r) => a2a('fwd.dispatch', send(r), recv(r))), null);
  const fresh = new CollectiveTracker(mesh);
  assert.is(position(fresh, (r) => a2a('fwd.dispatch', recv(r), send(r))), null); // consistent, other arrays: nothing to reuse
  const next = (r: number) => a2a('fwd.expert_ids', r === 3 ? shifted(send(r)) : send(r), recv(r));
  const a = position(verified, next);
  const b = position(fresh, next);
  assert.ok(a, 'the reused splits hid the mismatch');
  assert.equal(a, b);
  assert.is(a!.finding.kind, 'mismatch');
  assert.match(a!.finding.detail, /rank 3 sends 4 rows to rank 0 but rank 0 expects 3/);
});

test('combine after dispatch (splits swapped): consistent positions complete, a swapped mismatch is still found', () => {
  const t = new CollectiveTracker(mesh);
  assert.is(position(t, (r) => a2a('fwd.dispatch', send(r), recv(r))), null);
  assert.is(position(t, (r) => a2a('fwd.combine', recv(r), send(r))), null);
  assert.equal(t.openPositions(), []);
  const found = position(t, (r) => a2a('bwd.combine', send(r), r === 2 ? shifted(recv(r)) : recv(r)));
  assert.ok(found);
  assert.is(found!.rank, 2);
  assert.is(found!.finding.kind, 'mismatch');
});

test('fwd.counts splits of one value: one shared array completes; a rank with another value is a mismatch', () => {
  const ones = Array.from({ length: EP }, () => 1);
  const t = new CollectiveTracker(mesh);
  assert.is(position(t, () => a2a('fwd.counts', ones, ones)), null);
  const twos = Array.from({ length: EP }, () => 2);
  const found = position(t, (r) => (r === 1 ? a2a('fwd.counts', twos, twos) : a2a('fwd.counts', ones, ones)));
  assert.ok(found);
  assert.is(found!.rank, 1);
  assert.match(found!.finding.detail, /rank 1 sends 2 rows to rank 0 but rank 0 expects 1/);
});

test.run();
