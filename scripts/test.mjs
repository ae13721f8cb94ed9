#!/usr/bin/env node
// Runs the uvu suites compiled to dist/test and ends with the one summary line CI reads:
// "N passed, N failed". uvu's own totals are parsed from its output; a run that dies
// before printing them counts as one failure so it can never read as green.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const testDir = join(root, 'dist', 'test');
if (!existsSync(testDir)) {
  console.error('dist/test is missing: run `npm run build` (npm install does it) first');
  console.log('0 passed, 1 failed');
  process.exit(1);
}
// An optional argument narrows the run to test files whose names match it (a regex).
const pattern = process.argv[2] ? `(${process.argv[2]})[^/]*\\.test\\.js$` : '\\.test\\.js$';
const uvuBin = join(root, 'node_modules', 'uvu', 'bin.js');
const child = spawn(process.execPath, [uvuBin, testDir, pattern], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
let out = '';
child.stdout.on('data', (chunk) => { out += chunk; process.stdout.write(chunk); });
child.on('close', (code) => {
  const plain = out.replace(/\x1b\[[0-9;]*m/g, '');
  const total = Number(/Total:\s+(\d+)/.exec(plain)?.[1] ?? NaN);
  const passed = Number(/Passed:\s+(\d+)/.exec(plain)?.[1] ?? NaN);
  const skipped = Number(/Skipped:\s+(\d+)/.exec(plain)?.[1] ?? 0);
  if (Number.isNaN(total) || Number.isNaN(passed)) {
    console.log(`0 passed, 1 failed`);
    process.exit(1);
  }
  const failed = total - passed - skipped + (code !== 0 && total === passed ? 1 : 0);
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed > 0 ? 1 : 0);
});
