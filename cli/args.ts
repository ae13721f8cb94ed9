// Small helpers over node:util parseArgs so every subcommand parses and validates the same way.
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
    parsed = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, strict: true, allowPositionals: true });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n\n${help}`);
  }
  return parsed;
}

/** An integer option within [min, max], with the flag's name in the error. */
export function intOption(value: unknown, flag: string, fallback: number | undefined, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined) {
    if (fallback === undefined) throw new UsageError(`--${flag} is required`);
    return fallback;
  }
  const n = Number(value);
  if (typeof value !== 'string' || !/^-?\d+$/.test(value) || !Number.isSafeInteger(n)) throw new UsageError(`--${flag} must be an integer, got '${String(value)}'`);
  if (n < min || n > max) throw new UsageError(`--${flag} must be in [${min}, ${max}], got ${n}`);
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
