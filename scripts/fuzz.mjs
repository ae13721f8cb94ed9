#!/usr/bin/env node
// The differential check run longer: `npm run fuzz -- --count N --seed S [--engine actors|processes]`.
// Each random scenario runs on the discrete-event engine and on the chosen runtime (worker
// ranks by default); every disagreement is printed with the scenario JSON that replays it.
// Exit 0 when all agree, 2 when some disagree, 1 on bad usage.
import { parseArgs } from 'node:util';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const HELP = `usage: npm run fuzz -- [--count N] [--seed S] [--engine actors|processes]

Random scenarios (every variant, FSDP and its wrap policies, zero-token ranks, several layers
and micro-batches) through the discrete-event engine and a runtime; they must agree on verdict,
communicator, position, culprits and every hung communicator (ok runs: the same ledger).
  --count N     scenarios (default 200)
  --seed S      first seed of the draw (default 1)
  --engine E    actors (worker-thread ranks, default) | processes (one OS process per rank)`;

let v;
try {
  ({ values: v } = parseArgs({ options: { count: { type: 'string' }, seed: { type: 'string' }, engine: { type: 'string' }, help: { type: 'boolean', short: 'h' } } }));
} catch (err) {
  console.error(`fuzz: ${err.message}\n\n${HELP}`);
  process.exit(1);
}
if (v.help) {
  console.log(HELP);
  process.exit(0);
}
const count = Number(v.count ?? 200);
const seed = Number(v.seed ?? 1);
const engine = v.engine ?? 'actors';
if (!Number.isSafeInteger(count) || count < 1) (console.error(`fuzz: --count must be a positive integer, got ${v.count}`), process.exit(1));
if (!Number.isSafeInteger(seed)) (console.error(`fuzz: --seed must be an integer, got ${v.seed}`), process.exit(1));
if (engine !== 'actors' && engine !== 'processes') (console.error(`fuzz: --engine must be actors or processes, got ${engine}`), process.exit(1));
const module = fileURLToPath(new URL('../dist/test/differential.js', import.meta.url));
if (!existsSync(module)) (console.error('fuzz: dist/test/differential.js is missing: run `npm run build` first'), process.exit(1));

const { disagreement, randomScenarios } = await import(module);
const t0 = performance.now();
let bad = 0;
const scenarios = randomScenarios(seed, count);
for (const [i, s] of scenarios.entries()) {
  const d = await disagreement(s, engine);
  if (d) {
    bad++;
    console.log(`scenario ${i} (seed ${seed}):\n${d}\n`);
  }
  if (process.stderr.isTTY) process.stderr.write(`\r${i + 1}/${count} scenarios, ${bad} disagree`);
}
if (process.stderr.isTTY) process.stderr.write('\n');
console.log(`${count - bad} of ${count} agree (des vs ${engine}), ${bad} disagree; ${((performance.now() - t0) / 1000).toFixed(1)} s`);
process.exit(bad > 0 ? 2 : 0);
