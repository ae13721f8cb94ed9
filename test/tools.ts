// Programs some tests need from the machine, found on PATH; when one is missing, each test
// that needs it fails with one line naming what to install — never a stack, never a silent pass.
import { existsSync } from 'node:fs';
import { delimiter, join } from 'node:path';

/** The path of `command` on the PATH of `env`, or null. */
export function onPath(command: string, env: NodeJS.ProcessEnv = process.env): string | null {
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    if (dir && existsSync(join(dir, command))) return join(dir, command);
  }
  return null;
}

/** An error uvu prints as its message alone: it prints a stack only when the error's stack has a second line. */
export function oneLine(message: string): Error {
  const err = new Error(message);
  err.stack = message;
  return err;
}

/** The error a test throws when `command` is missing. */
export function missing(command: string, who: string, install: string): Error {
  return oneLine(`${command} is not installed (not on PATH) and ${who}; install it with \`${install}\``);
}
