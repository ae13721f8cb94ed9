// `npm start` (ep-actors demo), the main job, end to end: exit 0, every part says what it
// should, the report is written, and the hang is caught on real processes too.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli } from './cli.js';

test('demo: a real step, the seed passing, the hazard caught in simulation and on 4 processes, a report', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-demo-test-'));
  try {
    const report = join(dir, 'report.html');
    const r = await runCli(['demo', '--report', report]);
    assert.is(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /2\. The seed on a zero-token rank[\s\S]*verdict: ok/);
    assert.match(r.stdout, /verdict: MISSING on ep, position 5/);
    // Every waiting rank names the missing collective: found itself, or passed on by the rank that found it first.
    for (const rank of [0, 2, 3]) assert.match(r.stdout, new RegExp(`rank ${rank}: exit 2  (rank \\d stopped: )?missing collective: rank \\d waits in bwd\\.dispatch \\(layer 0, ep position 5\\) but rank 1 finished`));
    assert.match(r.stdout, /rank 1: exit 0 /);
    // "as simulated": verdict, communicator, position and culprits all equal the simulation's (else the demo exits 1).
    assert.match(r.stdout, /their records merged \(viz report --ranks\): MISSING on ep, position 5, culprit rank 1, as simulated/);
    assert.match(r.stdout, /demo ok\.$/m);
    assert.match(readFileSync(report, 'utf8'), /^<!doctype html>/i);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
