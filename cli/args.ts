// Small helpers over node:util parseArgs so every subcommand parses and validates the same way.
import { accessSync, constants, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { UsageError } from '../src/errors.js';

export type Options = NonNullable<ParseArgsConfig['options']>;

/** Parse argv strictly; unknown flags and missing values become a UsageError naming them. */
export interface Parsed {
  values: Record<string, string | boolean | (string | boolean)[] | undefined>;
  positionals: string[];
}

export function parse(argv: string[], options: Options, help: string): Parsed {
  let parsed: Parsed;
  try {
    parsed = parseArgs({ args: withNegativeValues(argv, options), options: { ...options, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: true });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${help}`);
  }
  return parsed;
}

/**
 * `--ep -1` as `--ep=-1`: parseArgs takes a value starting with '-' for a flag and refuses
 * it as ambiguous, so a negative number would never reach the range check that names it.
 */
function withNegativeValues(argv: string[], options: Options): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const next = argv[i + 1];
    if (a.startsWith('--') && options[a.slice(2)]?.type === 'string' && next !== undefined && /^-\d/.test(next)) out.push(`${a}=${argv[++i]}`);
    else out.push(a);
  }
  return out;
}

/** An integer option within [min, max], with the flag's name in the error. */
export function intOption(value: unknown, flag: string, fallback: number | undefined, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined) {
    if (fallback === undefined) throw new UsageError(`--${flag} is required`);
    return fallback;
  }
  const n = Number(value);
  if (typeof value !== 'string' || !/^-?\d+$/.test(value) || !Number.isSafeInteger(n)) throw new UsageError(`--${flag} must be an integer, got '${String(value)}'`);
  if (n < min || n > max) throw new UsageError(`--${flag} must be ${max === Number.MAX_SAFE_INTEGER ? `at least ${min}` : `in [${min}, ${max}]`}, got ${n}`);
  return n;
}

/** Refuses positional arguments a command does not take. */
export function noPositionals(positionals: readonly string[], help: string): void {
  if (positionals.length > 0) throw new UsageError(`unexpected argument '${positionals[0]}'\n\n${help}`);
}

/** A string option the command cannot run without. */
export function requiredString(values: Parsed['values'], flag: string, help: string): string {
  const v = values[flag];
  if (typeof v !== 'string') throw new UsageError(`--${flag} is required\n\n${help}`);
  return v;
}

/** Prints the command's help when --help was given; the command then exits 0. */
export function helpAsked(values: Parsed['values'], help: string): boolean {
  if (!values.help) return false;
  console.log(help);
  return true;
}

/**
 * An output file's path (resolved), or undefined when the flag is absent. Checked before
 * any work starts: a folder that does not exist or cannot be written must not cost a run.
 */
export function outputFile(values: Parsed['values'], flag: string): string | undefined {
  const given = values[flag];
  if (given === undefined) return undefined;
  if (typeof given !== 'string' || given === '') throw new UsageError(`--${flag} needs a file name`);
  const path = resolve(given);
  const dir = dirname(path);
  let isDir: boolean;
  try {
    isDir = statSync(dir).isDirectory();
  } catch {
    throw new UsageError(`--${flag} ${given}: the folder ${dir} does not exist`);
  }
  if (!isDir) throw new UsageError(`--${flag} ${given}: ${dir} is not a folder`);
  try {
    accessSync(dir, constants.W_OK);
  } catch {
    throw new UsageError(`--${flag} ${given}: the folder ${dir} is not writable`);
  }
  if (statSync(path, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`--${flag} ${given} is a folder, not a file`);
  return path;
}
