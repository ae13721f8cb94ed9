import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { expandSweep, inShard, parseShard, runSweep, type SweepSpec } from '../sim/sweep.js';
import { progressBar } from '../cli/progress.js';

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
  assert.throws(() => expandSweep({ grid: { activation: ['tanh'] } }), /scenario 0.*activation must be one of silu, gelu, relu, got 'tanh'/);
});

test('unknown spec keys are refused by name, with the near one suggested, instead of running on defaults', () => {
  const cases: [unknown, RegExp][] = [
    [{ base: { top_k: 4 }, grid: { ep: [4] } }, /^sweep spec: base: unknown field 'top_k'; did you mean 'topK'\?$/],
    [{ grid: { ep: [4], 'micro-batches': [2] } }, /^sweep spec: grid: unknown field 'micro-batches'; did you mean 'microBatches'\?$/],
    [{ samples: { count: 2, fields: { tokns: [1] } } }, /^sweep spec: samples\.fields: unknown field 'tokns'; did you mean 'tokens'\?$/],
    [{ samples: { count: 2, feilds: { tokens: [1] } } }, /^sweep spec: samples: unknown field 'feilds'; did you mean 'fields'\?$/],
    [{ grid: { ep: [4] }, colour: 'red' }, /^sweep spec: unknown field 'colour' \(one of base, grid, samples\)$/],
    [{ base: { colour: 'red' }, grid: { ep: [4] } }, /^sweep spec: base: unknown field 'colour' \(one of ep, dp, .*firstReady\)$/],
  ];
  for (const [bad, message] of cases) assert.throws(() => expandSweep(bad as SweepSpec), (e: Error) => message.test(e.message), JSON.stringify(bad));
  // A replay's completion order (check --replay) is a scenario field.
  assert.is(expandSweep({ base: { ep: 2, experts: 4, firstReady: [['bwd.dispatch'], ['fsdp.reduce_scatter']] }, grid: { seed: [1] } }).length, 1);
});

test('the progress bar draws only on a terminal, ends at the total and erases itself', () => {
  const written: string[] = [];
  const terminal = { isTTY: true, write: (s: string) => written.push(s) > 0 };
  const bar = progressBar(4, 'scenarios', terminal);
  for (let done = 1; done <= 4; done++) bar.update(done);
  bar.clear();
  assert.match(written[0]!, /^\r\[#{8}\.{22}\] 1\/4 scenarios$/, 'the first update draws');
  assert.match(written.at(-2)!, /^\r\[#{30}\] 4\/4 scenarios$/, 'the last update always draws');
  assert.is(written.at(-1), '\r\x1b[K');
  const piped: string[] = [];
  const quiet = progressBar(4, 'scenarios', { isTTY: false, write: (s: string) => piped.push(s) > 0 });
  quiet.update(4);
  quiet.clear();
  assert.equal(piped, []);
});

test('a sweep over the pool gives each scenario its verdict', async () => {
  const jobs = expandSweep({ base: { ep: 4, experts: 8 }, grid: { variant: ['seed', 'no-dispatch-edge'], routing: ['starve:1'] } }).map((scenario, index) => ({ index, scenario }));
  const results = (await runSweep(jobs, { workers: 2 })).sort((a, b) => a.index - b.index);
  assert.equal(results.map((r) => r.verdict), ['ok', 'missing']);
  assert.equal(results[1]!.culprits, [1]);
});

test.run();
