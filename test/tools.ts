// Programs some tests need from the machine: Chromium (the browser tests) and Graphviz's
// dot (the DOT check). Found on PATH; when one is missing, each test that needs it fails
// with one line naming what to install — never a stack, never a silent pass.
import { existsSync } from 'node:fs';
import { delimiter, join } from 'node:path';

/** The path of `command` on PATH, or null. */
export function onPath(command: string): string | null {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir && existsSync(join(dir, command))) return join(dir, command);
  }
  return null;
}

/** The error a test throws when `command` is missing: uvu prints a stack only when the error's stack has a second line. */
export function missing(command: string, who: string, install: string): Error {
  const err = new Error(`${command} is not installed (not on PATH) and ${who}; install it with \`${install}\``);
  err.stack = err.message;
  return err;
}
