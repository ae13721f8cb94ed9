#!/usr/bin/env -S node --initial-old-space-size=64
// ep-actors command line. Each subcommand lives in cli/<name>.ts and exports
// `main(argv): Promise<number>` returning the exit code: 0 ok, 2 a hang or mismatch
// found, 1 bad usage or an error.
import { describeError } from '../src/errors.js';

const COMMANDS: Record<string, { summary: string; load: () => Promise<{ main(argv: string[]): Promise<number> }> }> = {
  demo: { summary: 'the tour: a real EP step, the seed passing, a hazard caught and explained, a report written', load: () => import('./demo.js') },
  sim: { summary: 'run one scenario through the worker-thread runtime and diagnose hangs', load: () => import('./sim.js') },
  run: { summary: 'run the EP layer on a case file, forward and backward, ranks as actors', load: () => import('./run.js') },
  rank: { summary: 'run this process as one EP rank placed by a launcher (torchrun, srun): TCP (shared memory on one host) or NCCL between processes', load: () => import('./rank.js') },
  check: { summary: 'explore every routing class of a layout: prove no hang or give the shortest counterexample', load: () => import('./check.js') },
  sweep: { summary: 'run many scenarios (grids, random samples) over a worker pool; JSON Lines and a verdict table', load: () => import('./sweep.js') },
  diagnose: { summary: 'explain a hung or failed real run from its evidence: PyTorch Flight Recorder dumps or ep-actors rank records', load: () => import('./diagnose.js') },
  viz: { summary: 'export the rank machine (Mermaid, DOT, SCXML, JSON) or write the HTML report of a trace', load: () => import('./viz.js') },
};

function usage(): string {
  const rows = Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(8)} ${c.summary}`);
  return [
    'usage: ep-actors <command> [options]    (ep-actors <command> --help for its options)',
    '',
    'Simulate and run Mixture-of-Experts expert parallelism as an actor system.',
    '',
    'commands:',
    ...rows,
    '',
    'exit codes: 0 ok, 2 a hang or mismatch was found, 1 bad usage or an error',
  ].join('\n');
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    console.log(usage());
    return name === undefined ? 1 : 0;
  }
  const command = COMMANDS[name];
  if (!command) {
    console.error(`ep-actors: unknown command '${name}'\n\n${usage()}`);
    return 1;
  }
  const mod = await command.load();
  return mod.main(rest);
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    console.error(`ep-actors: ${describeError(err)}`);
    if (process.env.EP_ACTORS_DEBUG && err instanceof Error) console.error(err.stack);
    process.exitCode = 1;
  },
);
