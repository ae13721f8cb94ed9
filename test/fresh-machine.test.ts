// A fresh machine without chromium or Graphviz: the tests that need them fail, each with
// one line naming what to install — never a stack trace, never a silent pass. Each test
// file is run by uvu as a child with nothing on PATH.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { repoRoot } from './paths.js';

function withoutPath(file: string): { total: number; passed: number; failures: { name: string; lines: string[] }[]; out: string } {
  const r = spawnSync(process.execPath, [join(repoRoot, 'node_modules/uvu/bin.js'), join(repoRoot, 'dist/test'), `^${file.replace('.', '\\.')}$`], {
    cwd: repoRoot,
    env: { PATH: '' },
    encoding: 'utf8',
    timeout: 120_000,
  });
  const out = r.stdout.replace(/\x1b\[[0-9;]*m/g, '');
  // uvu: "FAIL "name"", the message, then a blank line and stack lines (if any), up to the next failure or the totals.
  const failures = [...out.matchAll(/FAIL\s+"([^"\n]+)"\n([\s\S]*?)(?=\s+FAIL\s|\s+Total:)/g)].map((m) => ({ name: m[1]!, lines: m[2]!.split('\n').filter((l) => l.trim()) }));
  return { total: Number(/Total:\s+(\d+)/.exec(out)?.[1]), passed: Number(/Passed:\s+(\d+)/.exec(out)?.[1]), failures, out };
}

test('without chromium every browser test fails with one line: apt-get install chromium', () => {
  const r = withoutPath('browser.test.js');
  assert.ok(r.total >= 4, r.out);
  assert.is(r.passed, 0, 'no browser test passes without a browser');
  assert.is(r.failures.length, r.total, r.out);
  for (const f of r.failures) {
    assert.is(f.lines.length, 1, `${f.name}: ${f.lines.join(' / ')}`);
    assert.match(f.lines[0]!, /chromium is not installed .*`apt-get install chromium`/);
  }
});

test("without Graphviz the DOT check fails with one line: apt-get install graphviz", () => {
  const r = withoutPath('exporters.test.js');
  const dot = r.failures.filter((f) => /Graphviz dot/.test(f.name));
  assert.is(dot.length, 1, r.out);
  assert.equal(dot[0]!.lines.length, 1, dot[0]!.lines.join(' / '));
  assert.match(dot[0]!.lines[0]!, /dot is not installed .*`apt-get install graphviz`/);
  assert.ok(r.passed > 0, 'the exporters tests that need no dot still run');
});

test.run();
