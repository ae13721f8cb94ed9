// Launching rank processes on this machine, as torchrun --nproc-per-node would: `ep-actors`
// as a child process, n of them placed by RANK / WORLD_SIZE / LOCAL_RANK around a free
// MASTER_PORT, and a scenario run that way with the ranks' records merged (`sim --engine
// processes`, the demo, the tests).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { caseMetadata, caseTensors, type CaseData } from '../src/case.js';
import { writeSafetensorsFileAtomic } from '../src/codec/safetensors.js';
import type { ReportInput } from '../machines/record.js';
import { worldSize } from '../machines/mesh.js';
import type { Scenario } from '../machines/scenario.js';
import { freePort } from '../actors/rendezvous.js';
import { mergeRankRecordsIn } from '../actors/rankRecord.js';

export interface CliRun {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

export interface SpawnOptions {
  readonly env?: NodeJS.ProcessEnv;
  /** Killed (SIGKILL: nothing it does can delay it) after this long; its code is then null. */
  readonly timeoutMs?: number;
  /** Hears each process as it starts (to signal it, say). */
  readonly started?: (child: ChildProcess) => void;
  /** Node's own flags, before the script. */
  readonly nodeFlags?: readonly string[];
}

/**
 * A rank process starts with room for 64 MB of old generation before its first full GC.
 * Node's default starts small, and the chunks a rank reads (external memory, about 6 MB
 * per EP step at the default bench size) pushed a blocking full GC on every rank every few
 * steps (10–60 ms each, and every peer waits for the rank that collects): 50 full GCs in
 * 40 steps on 4 ranks, 8 with this flag (docs/BENCHMARKS.md). Node accepts it only on
 * its command line, not in NODE_OPTIONS, so the `ep-actors` command's shebang (cli/main.ts)
 * carries the same flag for ranks a launcher such as torchrun starts.
 */
export const RANK_NODE_FLAGS = ['--initial-old-space-size=64'] as const;

/** `ep-actors ...args` as a child process of this Node, with its exit code and output. */
export function runEpActors(args: readonly string[], opts: SpawnOptions = {}): Promise<CliRun> {
  const cli = fileURLToPath(new URL('./main.js', import.meta.url));
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...(opts.nodeFlags ?? []), cli, ...args], { env: opts.env ?? process.env, timeout: opts.timeoutMs ?? 600_000, killSignal: 'SIGKILL' });
    opts.started?.(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/**
 * Starts `n` processes of `ep-actors rank ...rankArgs` on this machine, placed as
 * `torchrun --nproc-per-node n` would place them (RANK, WORLD_SIZE, LOCAL_RANK and a free
 * MASTER_PORT on 127.0.0.1, or `port`), and waits for all of them; `ranks` starts only those.
 */
export async function launchLocally(n: number, rankArgs: readonly string[], opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number; port?: number; ranks?: readonly number[]; started?: (child: ChildProcess, rank: number) => void } = {}): Promise<CliRun[]> {
  const port = opts.port ?? (await freePort());
  return Promise.all(
    (opts.ranks ?? Array.from({ length: n }, (_, rank) => rank)).map((rank) =>
      runEpActors(['rank', ...rankArgs], {
        env: { ...(opts.env ?? process.env), RANK: String(rank), WORLD_SIZE: String(n), LOCAL_RANK: String(rank), MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(port) },
        timeoutMs: opts.timeoutMs,
        nodeFlags: RANK_NODE_FLAGS,
        started: (child) => opts.started?.(child, rank),
      }),
    ),
  );
}

/**
 * Runs `n` = the work's world size of `ep-actors rank` processes here on a case or a
 * scenario written to a temporary folder (their --out-dir), hands `use` the runs and the
 * folder, and removes the folder afterwards.
 */
export async function withLaunchedRanks<T>(
  work: { readonly case: CaseData } | { readonly scenario: Scenario },
  rankArgs: readonly string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number },
  use: (runs: CliRun[], dir: string) => Promise<T>,
): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'ep-actors-ranks-'));
  try {
    let input: string[];
    let n: number;
    if ('case' in work) {
      const path = join(dir, 'case.safetensors');
      await writeSafetensorsFileAtomic(path, caseTensors(work.case), caseMetadata(work.case.meta));
      [input, n] = [['--case', path], work.case.meta.ep];
    } else {
      const path = join(dir, 'scenario.json');
      await writeFile(path, JSON.stringify(work.scenario));
      [input, n] = [['--scenario', path], worldSize(work.scenario)];
    }
    return await use(await launchLocally(n, [...input, '--out-dir', dir, ...rankArgs], opts), dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A scenario as one `ep-actors rank` process per rank, their records merged (`sim --engine processes`). */
export function runScenarioOnProcesses(scenario: Scenario, rankArgs: readonly string[] = []): Promise<ReportInput> {
  return withLaunchedRanks({ scenario }, rankArgs, {}, async (runs, dir) => {
    // Exit 2 is a rank that stopped on what it saw (the records say what); anything else is a failure to run.
    const failed = runs.findIndex((r) => r.code !== 0 && r.code !== 2);
    if (failed >= 0) throw new Error(`rank ${failed} could not run (exit ${runs[failed]!.code}): ${runs[failed]!.stderr.trim()}`);
    return mergeRankRecordsIn(dir);
  });
}
