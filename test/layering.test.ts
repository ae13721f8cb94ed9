// The house's import directions (DESIGN.md, "Layout"): src ← machines ← actors | sim ← cli,
// actors and sim never import each other, the public barrel at the root, and no cycles.
// Read from the sources' own import statements, type-only imports included.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';
import { repoRoot } from './paths.js';

const ALLOWED: Record<string, readonly string[]> = {
  src: ['src'],
  machines: ['src', 'machines'],
  actors: ['src', 'machines', 'actors'],
  sim: ['src', 'machines', 'sim'],
  cli: ['src', 'machines', 'actors', 'sim', 'cli'],
};

function sources(dir: string): string[] {
  return readdirSync(join(repoRoot, dir)).flatMap((name) => {
    const path = join(dir, name);
    if (statSync(join(repoRoot, path)).isDirectory()) return sources(path);
    return name.endsWith('.ts') && !name.endsWith('.d.ts') ? [path] : [];
  });
}

/** Every file's relative imports (static, dynamic and `export … from`), as repo paths of .ts sources. */
function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const file of [...Object.keys(ALLOWED).flatMap(sources), 'index.ts']) {
    const text = readFileSync(join(repoRoot, file), 'utf8');
    const targets = [...text.matchAll(/(?:from|import)\s*\(?\s*'(\.{1,2}\/[^']+)\.js'/g)].map((m) => normalize(join(dirname(file), m[1]!)) + '.ts');
    graph.set(file, targets);
  }
  return graph;
}

const graph = importGraph();
const folderOf = (file: string) => file.split('/')[0]!;

test('the folders import one way: src ← machines ← actors | sim ← cli', () => {
  assert.ok(graph.size > 60, `read ${graph.size} files`);
  const wrong: string[] = [];
  for (const [file, targets] of graph) {
    if (file === 'index.ts') continue;
    for (const t of targets) {
      if (!(ALLOWED[folderOf(file)] ?? []).includes(folderOf(t))) wrong.push(`${file} imports ${t}`);
    }
  }
  assert.equal(wrong, []);
});

test('every import names a source that exists', () => {
  const missing = [...graph].flatMap(([file, targets]) => targets.filter((t) => !graph.has(t)).map((t) => `${file} imports ${relative('.', t)}`));
  assert.equal(missing, []);
});

test('no import cycles', () => {
  const state = new Map<string, 'open' | 'done'>();
  const cycles: string[] = [];
  const visit = (file: string, stack: string[]) => {
    state.set(file, 'open');
    for (const t of graph.get(file) ?? []) {
      if (state.get(t) === 'open') cycles.push([...stack.slice(stack.indexOf(t)), t].join(' → '));
      else if (!state.has(t)) visit(t, [...stack, t]);
    }
    state.set(file, 'done');
  };
  for (const file of graph.keys()) if (!state.has(file)) visit(file, [file]);
  assert.equal(cycles, []);
});

test.run();
