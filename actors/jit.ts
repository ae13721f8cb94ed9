// How V8 compiles the JavaScript of a process that hosts ranks.
import { setFlagsFromString } from 'node:v8';

/**
 * Compile each function to baseline machine code (V8's Sparkplug) on its first call, instead
 * of interpreting it until it has run often enough. Most of a step's JavaScript (routing,
 * the rank machine, the transport) runs a handful of times per step, so without this it
 * stays in the interpreter for many steps: the EP step on 4 worker ranks took about 8%
 * longer, its first ten steps most (docs/BENCHMARKS.md). V8's flags belong to the process,
 * so call this before the first worker is created (its isolate compiles with them from the
 * start); it holds for the rest of the process.
 */
export function compileOnFirstCall(): void {
  setFlagsFromString('--always-sparkplug');
}
