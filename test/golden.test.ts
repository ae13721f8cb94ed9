import { test } from 'uvu';
import { inProcessRanks } from '../actors/inprocess.js';
import * as assert from 'uvu/assert';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { readSafetensorsFile } from '../src/codec/safetensors.js';
import { parseCase, resultTensors, runCase } from '../src/case.js';
import { relativeError } from '../src/tensor.js';
import { goldenDir } from './paths.js';

const cases = readdirSync(goldenDir).filter((f) => f.endsWith('.safetensors')).sort();

test('the golden directory holds cases', () => {
  assert.ok(cases.length >= 6, `found ${cases.length} cases`);
});

for (const name of cases) {
  test(`golden ${name}: every expected tensor within 1e-5 relative`, async () => {
    const file = await readSafetensorsFile(join(goldenDir, name));
    const got = resultTensors(await runCase(parseCase(file), { runRanks: inProcessRanks }));
    const expected = [...file.tensors.keys()].filter((k) => k.startsWith('expected.'));
    assert.ok(expected.length > 0, 'no expected.* tensors');
    for (const key of expected) {
      const have = got.get(key.slice('expected.'.length));
      assert.ok(have, `${name}: no result for ${key}`);
      const err = relativeError(have!, file.tensors.get(key)!);
      assert.ok(err <= 1e-5, `${name}: ${key} relative error ${err.toExponential(3)}`);
    }
    // Every result has an expected counterpart: nothing is produced that the seed did not.
    for (const key of got.keys()) assert.ok(file.tensors.has(`expected.${key}`), `${name}: unexpected result ${key}`);
  });
}

test.run();
