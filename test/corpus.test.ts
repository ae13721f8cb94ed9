import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { CORPUS } from '../sim/corpus/index.js';
import { simulateDes } from '../sim/des.js';
import { runActors } from '../actors/supervisor.js';

// A stall is found by the compute limit: short here, far above the few ms these layers compute.
const LIMITS = { computeTimeoutMs: 8000 };

for (const c of CORPUS) {
  test(`${c.name} (${c.source}): ${c.expected} under ${c.scenario.variant}, ok under seed`, () => {
    assert.is(simulateDes(c.scenario).diagnosis.verdict, c.expected);
    assert.is(simulateDes({ ...c.scenario, variant: 'seed' }).diagnosis.verdict, 'ok');
  });
}

for (const c of CORPUS) {
  test(`${c.name} on the worker-thread runtime: ${c.expected} under ${c.scenario.variant}, ok under seed`, async () => {
    const hang = await runActors(c.scenario, LIMITS);
    assert.is(hang.diagnosis.verdict, c.expected, hang.diagnosis.cause);
    const engine = simulateDes(c.scenario).diagnosis;
    assert.equal([hang.diagnosis.communicator, hang.diagnosis.position, hang.diagnosis.culprits, hang.diagnosis.hangs ?? []], [engine.communicator, engine.position, engine.culprits, engine.hangs ?? []]);
    assert.is((await runActors({ ...c.scenario, variant: 'seed' }, LIMITS)).diagnosis.verdict, 'ok');
  });
}

test('corpus: distinct hang classes, each a hang the engine explains with its variant, a culprit, a cause naming it, its public source and its fix', () => {
  assert.is(new Set(CORPUS.map((c) => c.name)).size, CORPUS.length);
  assert.is(new Set(CORPUS.map((c) => c.scenario.variant)).size, CORPUS.length - 1, 'one variant per class (no-unused-expert-grads reaches two classes)');
  for (const c of CORPUS) {
    const d = simulateDes(c.scenario).diagnosis;
    assert.ok(d.culprits.length > 0, `${c.name}: a culprit`);
    // A stall is in compute: no communicator hung; every other class names the collective.
    if (c.expected === 'stall') assert.equal([d.communicator, d.position], [null, null], `${c.name}: a stall names no collective`);
    else assert.ok(d.communicator !== null && d.position !== null, `${c.name}: a communicator and position`);
    assert.match(d.cause, new RegExp(`variant ${c.scenario.variant}`), `${c.name}: the cause quotes the variant`);
    assert.ok(c.fix.length > 20, `${c.name}: how real code avoids it`);
  }
});

test.run();
