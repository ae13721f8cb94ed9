// Paths tests share: the repository root and the project's own copy of the golden cases.
import { fileURLToPath } from 'node:url';
import { dirname, join } from 'node:path';

/** Repository root (tests run compiled from dist/test). */
export const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const goldenDir = join(repoRoot, 'test', 'fixtures', 'golden');
/** The built `ep-actors` command. */
export const cliPath = join(repoRoot, 'dist', 'cli', 'main.js');
