// `ep-actors sweep` end to end: results, and bad usage as one line before any work.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runCli } from './cli.js';

const dir = mkdtempSync(join(tmpdir(), 'ep-sweep-'));
const spec = (name: string, s: object) => {
  const f = join(dir, name);
  writeFileSync(f, JSON.stringify(s));
  return f;
};
const good = spec('good.json', { base: { ep: 4, experts: 8 }, grid: { variant: ['seed', 'no-dispatch-edge'], routing: ['starve:1'] } });

test('sweep --out writes one JSON line per scenario and the summary on stdout', async () => {
  const out = join(dir, 'r.jsonl');
  const r = await runCli(['sweep', '--spec', good, '--out', out, '--workers', '1', '--json']);
  assert.is(r.code, 2, r.stderr);
  const rows = readFileSync(out, 'utf8').trimEnd().split('\n').map((l) => JSON.parse(l));
  assert.equal(rows.map((x) => x.verdict).sort(), ['missing', 'ok']);
  assert.equal(JSON.parse(r.stdout).verdicts, { ok: 1, missing: 1 });
});

test('bad usage is one line, exit 1, and nothing written', async () => {
  const cases: [string[], RegExp][] = [
    [['--spec', good, '--out', '/nonexistent/dir/s.jsonl'], /^ep-actors: --out \/nonexistent\/dir\/s\.jsonl: the folder \/nonexistent\/dir does not exist$/],
    [['--spec', spec('typo.json', { base: { top_k: 4 }, grid: { ep: [4] } }), '--out', join(dir, 'typo.jsonl')], /^ep-actors: sweep spec: base: unknown field 'top_k'; did you mean 'topK'\?$/],
    [['--spec', spec('colour.json', { grid: { ep: [4] }, colour: 'red' }), '--out', join(dir, 'colour.jsonl')], /^ep-actors: sweep spec: unknown field 'colour'/],
  ];
  for (const [args, message] of cases) {
    const r = await runCli(['sweep', ...args]);
    assert.is(r.code, 1, r.stdout);
    assert.is(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
    assert.match(r.stderr.trimEnd(), message);
  }
  assert.not.ok(readdirSync(dir).some((f) => f.endsWith('.jsonl') && f !== 'r.jsonl'), 'no result file was started');
});

test.after(() => rmSync(dir, { recursive: true, force: true }));

test.run();
