// Running the built CLI as a child process, as users do.
export { runEpActors as runCli, type CliRun } from '../cli/localRanks.js';
