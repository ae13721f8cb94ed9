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
    assert.is((await runActors({ ...c.scenario, variant: 'seed' })).diagnosis.verdict, 'ok');
  });
}

test('corpus names are unique and cover eight hang classes', () => {
  assert.is(new Set(CORPUS.map((c) => c.name)).size, 8);
});

test.run();
