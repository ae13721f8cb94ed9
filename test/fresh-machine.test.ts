// A fresh machine, with no chromium and no Graphviz installed: the browser tests run on the
// Chromium npm installed and the DOT check on Graphviz compiled to WebAssembly. Each test file
// is run by uvu as a child with nothing on PATH. Where the browser cannot be had, every browser
// test fails with one line saying why — never a stack trace, never a silent pass.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CHROMIUM_ENV, findChromium } from './chromium.js';
import { repoRoot } from './paths.js';

function withoutPath(file: string, env: NodeJS.ProcessEnv = {}): { total: number; passed: number; failures: { name: string; lines: string[] }[]; out: string } {
  const r = spawnSync(process.execPath, [join(repoRoot, 'node_modules/uvu/bin.js'), join(repoRoot, 'dist/test'), `^${file.replace('.', '\\.')}$`], {
    cwd: repoRoot,
    env: { PATH: '', ...env },
    encoding: 'utf8',
    timeout: 300_000,
  });
  const out = r.stdout.replace(/\x1b\[[0-9;]*m/g, '');
  // uvu: "FAIL "name"", the message, then a blank line and stack lines (if any), up to the next failure or the totals.
  const failures = [...out.matchAll(/FAIL\s+"([^"\n]+)"\n([\s\S]*?)(?=\s+FAIL\s|\s+Total:)/g)].map((m) => ({ name: m[1]!, lines: m[2]!.split('\n').filter((l) => l.trim()) }));
  return { total: Number(/Total:\s+(\d+)/.exec(out)?.[1]), passed: Number(/Passed:\s+(\d+)/.exec(out)?.[1]), failures, out };
}

/** How many tests a file declares, so a child run that ran fewer cannot read as green. */
const declared = (file: string) => readFileSync(join(repoRoot, 'test', file), 'utf8').match(/^test\(/gm)!.length;

test('with no chromium on PATH every browser test passes on the bundled one', () => {
  const r = withoutPath('browser.test.js');
  assert.is(r.total, declared('browser.test.ts'), r.out);
  assert.is(r.passed, r.total, r.out);
});

test('with no Graphviz on PATH every exporters test passes, the DOT check among them', () => {
  const r = withoutPath('exporters.test.js');
  assert.is(r.total, declared('exporters.test.ts'), r.out);
  assert.is(r.passed, r.total, r.out);
});

test(`${CHROMIUM_ENV}=system with no chromium: every browser test fails with one line saying how to get one`, () => {
  const r = withoutPath('browser.test.js', { [CHROMIUM_ENV]: 'system' });
  assert.is(r.total, declared('browser.test.ts'), r.out);
  assert.is(r.passed, 0, 'no browser test passes without a browser');
  assert.is(r.failures.length, r.total, r.out);
  for (const f of r.failures) {
    assert.is(f.lines.length, 1, `${f.name}: ${f.lines.join(' / ')}`);
    assert.match(f.lines[0]!, /EP_ACTORS_CHROMIUM=system but chromium is not on PATH: install it \(`apt-get install chromium`\) or unset EP_ACTORS_CHROMIUM/);
  }
});

test('the system chromium is preferred when on PATH, the bundled one when asked for or when there is none', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-chromium-'));
  try {
    const system = join(dir, 'chromium');
    writeFileSync(system, '#!/bin/sh\n');
    chmodSync(system, 0o755);
    assert.equal(await findChromium({ PATH: dir }), { source: 'system', executablePath: system, env: { PATH: dir } });
    assert.is((await findChromium({ PATH: dir, [CHROMIUM_ENV]: 'auto' })).source, 'system');
    const bundled = await findChromium({ PATH: dir, [CHROMIUM_ENV]: 'bundled' });
    assert.is(bundled.source, 'bundled');
    assert.is.not(bundled.executablePath, system);
    // The libraries it links against come with it, for a machine that has none.
    assert.match(bundled.env.LD_LIBRARY_PATH!, /al2023[/\\]lib/);
    assert.is((await findChromium({ PATH: '' })).executablePath, bundled.executablePath);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a bundled binary of another version, or one that does not start, is refused in one line', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'ep-chromium-tmp-'));
  try {
    // The package reuses whatever TMPDIR/chromium holds; a child with its own TMPDIR finds these.
    const find = (script: string) => {
      writeFileSync(join(tmp, 'chromium'), `#!/bin/sh\n${script}\n`);
      chmodSync(join(tmp, 'chromium'), 0o755);
      const probe = `import(${JSON.stringify(join(repoRoot, 'dist/test/chromium.js'))}).then((m) => m.findChromium()).then(() => console.log('found'), (e) => console.log(e.stack))`;
      return spawnSync(process.execPath, ['-e', probe], { env: { PATH: process.env.PATH, TMPDIR: tmp, [CHROMIUM_ENV]: 'bundled' }, encoding: 'utf8', timeout: 60_000 }).stdout.trim();
    };
    const major = Number((JSON.parse(readFileSync(join(repoRoot, 'node_modules/@sparticuz/chromium/package.json'), 'utf8')) as { version: string }).version.split('.')[0]);
    assert.is(find(`echo "Chromium ${major - 1}.0.7600.0"`), `${join(tmp, 'chromium')} is "Chromium ${major - 1}.0.7600.0" but @sparticuz/chromium is ${major}: remove ${join(tmp, 'chromium')} (left by another version) and run again`);
    assert.is(find('echo "chromium: error while loading shared libraries: libnss3.so" >&2; exit 127'), `the bundled chromium (${join(tmp, 'chromium')}, from @sparticuz/chromium) does not start: chromium: error while loading shared libraries: libnss3.so`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test(`an unknown ${CHROMIUM_ENV} is refused, naming the choices`, async () => {
  try {
    await findChromium({ PATH: '', [CHROMIUM_ENV]: 'chrome' });
    assert.unreachable('chrome is not a choice');
  } catch (e) {
    assert.is((e as Error).message, 'EP_ACTORS_CHROMIUM=chrome is not a choice: use auto (the default), system or bundled');
  }
});

test.run();
