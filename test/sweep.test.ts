import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { expandSweep, inShard, parseShard, runSweep } from '../sim/sweep.js';

const spec = {
  base: { ep: 4, experts: 8 },
  grid: { variant: ['seed', 'no-dispatch-edge'], routing: ['uniform', 'starve:1'] },
  samples: { count: 5, seed: 3, fields: { tokens: [0, 4, 16], variant: ['seed', 'skip-empty-sends'] } },
};

test('grid is the cartesian product, samples are reproducible', () => {
  const all = expandSweep(spec);
  assert.is(all.length, 4 + 5);
  assert.equal(all.slice(0, 4).map((s) => `${s.variant}/${s.routing}`), ['seed/uniform', 'seed/starve:1', 'no-dispatch-edge/uniform', 'no-dispatch-edge/starve:1']);
  assert.equal(expandSweep(spec), all);
});

test('shards partition the sweep: each scenario in exactly one shard', () => {
  const n = expandSweep(spec).length;
  for (const count of [1, 2, 3, 4]) {
    const seen = new Array<number>(n).fill(0);
    for (let i = 0; i < count; i++) for (let k = 0; k < n; k++) if (inShard(k, parseShard(`${i}/${count}`))) seen[k]!++;
    assert.ok(seen.every((x) => x === 1));
  }
  assert.throws(() => parseShard('4/4'), /0 <= I < N/);
  assert.throws(() => parseShard('x'), /--shard/);
});

test('bad spec fields name the scenario and the field', () => {
  assert.throws(() => expandSweep({ grid: { ep: [3] }, base: { experts: 8 } }), /scenario 0.*divisible/);
  assert.throws(() => expandSweep({}), /grid.*samples/);
});

test('a sweep over the pool gives each scenario its verdict', async () => {
  const jobs = expandSweep({ base: { ep: 4, experts: 8 }, grid: { variant: ['seed', 'no-dispatch-edge'], routing: ['starve:1'] } }).map((scenario, index) => ({ index, scenario }));
  const results = (await runSweep(jobs, { workers: 2 })).sort((a, b) => a.index - b.index);
  assert.equal(results.map((r) => r.verdict), ['ok', 'missing']);
  assert.equal(results[1]!.culprits, [1]);
});

test.run();
