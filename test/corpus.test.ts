import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { CORPUS } from '../sim/corpus/index.js';
import { simulateDes } from '../sim/des.js';
import { runActors } from '../actors/supervisor.js';

for (const c of CORPUS) {
  test(`${c.name} (${c.source}): ${c.expected} under ${c.scenario.variant}, ok under seed`, () => {
    assert.is(simulateDes(c.scenario).diagnosis.verdict, c.expected);
    assert.is(simulateDes({ ...c.scenario, variant: 'seed' }).diagnosis.verdict, 'ok');
  });
}

for (const c of CORPUS) {
  test(`${c.name} on the worker-thread runtime: ${c.expected} under ${c.scenario.variant}, ok under seed`, async () => {
    const hang = await runActors(c.scenario);
    assert.is(hang.diagnosis.verdict, c.expected, hang.diagnosis.cause);
    const engine = simulateDes(c.scenario).diagnosis;
    assert.equal([hang.diagnosis.communicator, hang.diagnosis.position, hang.diagnosis.culprits, hang.diagnosis.hangs], [engine.communicator, engine.position, engine.culprits, engine.hangs]);
    assert.is((await runActors({ ...c.scenario, variant: 'seed' })).diagnosis.verdict, 'ok');
  });
}

test('corpus: eight distinct hang classes, each a hang the engine explains with its variant, a culprit, and a cause naming it', () => {
  assert.is(new Set(CORPUS.map((c) => c.name)).size, 8);
  assert.is(new Set(CORPUS.map((c) => c.scenario.variant)).size, CORPUS.length - 1, 'seven variants (no-unused-expert-grads reaches two classes)');
  for (const c of CORPUS) {
    const d = simulateDes(c.scenario).diagnosis;
    assert.ok(d.culprits.length > 0, `${c.name}: a culprit`);
    assert.ok(d.communicator !== null && d.position !== null, `${c.name}: a communicator and position`);
    assert.match(d.cause, new RegExp(`variant ${c.scenario.variant}`), `${c.name}: the cause quotes the variant`);
  }
});

test.run();
