// Ranks placed by a launcher (torchrun, Slurm): this process is one rank. launchEnv reads
// where; rendezvous() meets the other ranks through rank 0 at MASTER_ADDR:MASTER_PORT and
// hands every rank the table of the others' data addresses, the run id and, for NCCL, rank
// 0's unique id. Every connection opens with the hello of actors/runIdentity.ts.
import { lookup } from 'node:dns/promises';
import { connect, createServer, type Socket } from 'node:net';
import { UsageError } from '../src/errors.js';
import { helloAsDialer, helloAsListener, madeUpRunId, readLine, RefusedConnection, type RunIdentity, type Side } from './runIdentity.js';

export class RendezvousError extends Error {
  override name = 'RendezvousError';
}

export interface LaunchEnv {
  rank: number;
  worldSize: number;
  localRank: number;
  masterAddr: string;
  masterPort: number;
}

/**
 * RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them, else SLURM_PROCID, SLURM_NTASKS,
 * SLURM_LOCALID as srun does; MASTER_ADDR (default 127.0.0.1) and the rendezvous port:
 * EP_ACTORS_PORT, else MASTER_PORT (default 29500), else MASTER_PORT + 1 under torchrun's
 * agent, which already serves its own store at MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE).
 */
export function launchEnv(env: NodeJS.ProcessEnv = process.env): LaunchEnv {
  const int = (names: readonly string[], dflt?: number): number => {
    const name = names.find((k) => env[k] !== undefined);
    const v = name === undefined ? (dflt === undefined ? undefined : String(dflt)) : env[name];
    if (v === undefined || !/^\d+$/.test(v)) throw new UsageError(`${name ?? names.join(' or ')} must be set to a non-negative integer (got ${v ?? 'nothing'})`);
    return Number(v);
  };
  const worldSize = int(['WORLD_SIZE', 'SLURM_NTASKS']);
  const rank = int(['RANK', 'SLURM_PROCID']);
  if (rank >= worldSize) throw new UsageError(`RANK ${rank} must be below WORLD_SIZE ${worldSize}`);
  if (worldSize === 0) throw new UsageError('WORLD_SIZE must be at least 1');
  const agentStore = env.TORCHELASTIC_USE_AGENT_STORE?.toLowerCase() === 'true';
  const masterPort = env.EP_ACTORS_PORT !== undefined ? int(['EP_ACTORS_PORT']) : int(['MASTER_PORT'], 29500) + (agentStore ? 1 : 0);
  if (masterPort < 1 || masterPort > 65535) throw new UsageError(`the rendezvous port ${masterPort} (${env.EP_ACTORS_PORT !== undefined ? 'EP_ACTORS_PORT' : agentStore ? 'MASTER_PORT + 1' : 'MASTER_PORT'}) is not a TCP port (1..65535)`);
  return { rank, worldSize, localRank: int(['LOCAL_RANK', 'SLURM_LOCALID'], 0), masterAddr: env.MASTER_ADDR ?? '127.0.0.1', masterPort };
}

export interface PeerAddress {
  readonly host: string;
  readonly port: number;
}

export interface Rendezvous {
  /** Every rank's data listener, by rank (this rank's too). */
  readonly peers: readonly PeerAddress[];
  /** Rank 0's NCCL unique id when it made one, else null. */
  readonly id: Uint8Array | null;
  /** The job's run id: this rank's own, or the one rank 0 handed out. */
  readonly runId: string;
}

export interface RendezvousOptions {
  /** The whole rendezvous, connecting and accepting included, gives up after this long (ms). */
  readonly timeoutMs: number;
  readonly identity: RunIdentity;
  /** Rank 0 makes the NCCL unique id with it. */
  readonly newId?: () => Uint8Array;
  /** Hears each connection refused (a stranger, another job's rank), as it happens. */
  readonly refused?: (r: RefusedConnection) => void;
}

/** The rendezvous reply carries the address table and a 128-byte NCCL id: well under this. */
const MAX_REPLY = 1 << 20;
/** How long one side waits for the other's hello line (a rank sends it at once). */
export const HELLO_TIMEOUT_MS = 10_000;

/** MASTER_ADDR must name a host: an unresolvable one is a usage error at once, not a retry until the deadline. */
async function resolvable(e: LaunchEnv): Promise<void> {
  try {
    await lookup(e.masterAddr);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTFOUND' || code === 'EAI_NONAME') throw new UsageError(`MASTER_ADDR '${e.masterAddr}' does not resolve to an address (${code})`);
    throw new RendezvousError(`rendezvous: cannot resolve MASTER_ADDR '${e.masterAddr}': ${(err as Error).message}`);
  }
}

/**
 * Rank 0 listens at MASTER_PORT; every other rank connects (retrying while rank 0 is not
 * up yet) and, once the hello has shown it a rank of this run, says its data port; when
 * all have, rank 0 sends each the table of data addresses (a peer's host as rank 0 saw
 * it), the run id and `newId()`'s bytes. Connections the hello refuses do not count and
 * do not stop the rendezvous; the whole of it gives up after `timeoutMs`.
 */
export async function rendezvous(e: LaunchEnv, dataPort: number, opts: RendezvousOptions): Promise<Rendezvous> {
  const { timeoutMs } = opts;
  const where = `${e.masterAddr}:${e.masterPort}`;
  await resolvable(e);
  const helloMs = Math.min(timeoutMs, HELLO_TIMEOUT_MS);
  if (e.rank === 0) {
    const runId = opts.identity.runId ?? madeUpRunId();
    const id = opts.newId?.() ?? null;
    const peers: (PeerAddress | undefined)[] = new Array(e.worldSize).fill(undefined);
    peers[0] = { host: e.masterAddr, port: dataPort };
    if (e.worldSize === 1) return { peers: peers as PeerAddress[], id, runId };
    const side: Side = { me: { run: runId, rank: 0, world: e.worldSize }, secret: opts.identity.secret, timeoutMs: helloMs };
    /** Ranks whose hello was accepted (until their connection fails): a second hello for one is refused. */
    const claimed = new Set<number>();
    const joined: Socket[] = [];
    const connections = new Set<Socket>();
    await new Promise<void>((resolve, reject) => {
      let over = false;
      const fail = (err: Error) => {
        over = true;
        clearTimeout(timer);
        server.close();
        connections.forEach((s) => s.destroy()); // every joiner hears the rendezvous failed
        reject(err);
      };
      const join = async (sock: Socket) => {
        let rank: number | null = null;
        try {
          const hello = await helloAsListener(sock, side, (d) =>
            d.rank < 1 || d.rank >= e.worldSize ? `rank ${d.rank} cannot join (ranks 1..${e.worldSize - 1} join rank 0)` : claimed.has(d.rank) ? `rank ${d.rank} has already joined (is RANK set the same in two processes?)` : null,
          );
          rank = hello.peer.rank;
          claimed.add(rank);
          const { value } = await readLine(sock, { timeoutMs: helloMs, max: MAX_REPLY, pending: hello.rest });
          const port = (value as { port?: unknown } | null)?.port;
          if (!Number.isSafeInteger(port) || (port as number) < 1 || (port as number) > 65535) throw new Error(`rank ${rank} sent ${JSON.stringify(value)}, not its data port`);
          if (over) return;
          peers[rank] = { host: sock.remoteAddress ?? e.masterAddr, port: port as number };
          joined.push(sock);
          if (joined.length < e.worldSize - 1) return;
          over = true;
          clearTimeout(timer);
          // Only connections the hello accepted get the table and the NCCL id.
          const reply = `${JSON.stringify({ peers, id: id ? Buffer.from(id).toString('base64') : null, run: runId })}\n`;
          joined.forEach((s) => s.end(reply));
          server.close(); // stops accepting; the joiners close their ends once they have the table
          resolve();
        } catch (err) {
          if (rank !== null && !peers[rank]) claimed.delete(rank);
          sock.destroy();
          if (err instanceof RefusedConnection) opts.refused?.(err);
        }
      };
      const server = createServer((sock: Socket) => {
        connections.add(sock);
        sock.on('error', () => {}); // a joiner's failure is handled where its lines are read
        void join(sock);
      });
      const timer = setTimeout(() => {
        const missing = peers.flatMap((p, r) => (p ? [] : [r]));
        fail(new RendezvousError(`rendezvous at ${where}: rank${missing.length === 1 ? '' : 's'} ${missing.join(', ')} did not join within ${timeoutMs} ms`));
      }, timeoutMs);
      server.once('error', (err: NodeJS.ErrnoException) =>
        fail(
          err.code === 'EADDRINUSE' || err.code === 'EACCES'
            ? new UsageError(`rank 0 cannot listen for the rendezvous on port ${e.masterPort}: ${err.code === 'EADDRINUSE' ? 'another process holds it (another job? set MASTER_PORT or EP_ACTORS_PORT)' : 'permission denied'}`)
            : new RendezvousError(`rendezvous: rank 0 cannot listen on port ${e.masterPort}: ${err.message}`),
        ),
      );
      server.listen(e.masterPort);
    });
    return { peers: peers as PeerAddress[], id, runId };
  }
  const deadline = Date.now() + timeoutMs;
  const side: Side = { me: { run: opts.identity.runId, rank: e.rank, world: e.worldSize }, secret: opts.identity.secret, timeoutMs: helloMs };
  for (;;) {
    const sock = connect(e.masterPort, e.masterAddr);
    // The deadline bounds every wait: a connect that hangs, a rank 0 that never answers.
    const timer = setTimeout(() => sock.destroy(new Error('timed out')), Math.max(0, deadline - Date.now()));
    let connected = false;
    try {
      await new Promise<void>((resolve, reject) => {
        sock.once('connect', resolve);
        sock.once('error', reject);
      });
      connected = true; // rank 0 is up: from here on a failure is final, not a retry
      const hello = await helloAsDialer(sock, side, (l) => (l.rank === 0 ? null : 'it is not rank 0'));
      sock.write(`${JSON.stringify({ port: dataPort })}\n`);
      const { value } = await readLine(sock, { timeoutMs: Math.max(1, deadline - Date.now()), max: MAX_REPLY, pending: hello.rest }).catch((err: Error) => {
        throw new RendezvousError(`rendezvous at ${where}: rank 0 did not hand out the address table within ${timeoutMs} ms (${err.message}); rank 0 says which ranks did not join`);
      });
      const { peers, id, run } = (value ?? {}) as { peers?: PeerAddress[]; id?: string | null; run?: unknown };
      if (!Array.isArray(peers) || peers.length !== e.worldSize || peers.some((p) => !p || typeof p.host !== 'string' || !Number.isSafeInteger(p.port))) {
        throw new RendezvousError(`rendezvous at ${where}: rank 0 answered without a table of ${e.worldSize} addresses`);
      }
      if (run !== hello.peer.run) throw new RendezvousError(`rendezvous at ${where}: rank 0 answered for run ${JSON.stringify(run)}, not the one it said hello for`);
      return { peers, id: typeof id === 'string' ? new Uint8Array(Buffer.from(id, 'base64')) : null, runId: run as string };
    } catch (err) {
      if (err instanceof RefusedConnection) {
        opts.refused?.(err);
        throw new UsageError(`rendezvous at ${where}: ${err.line}`);
      }
      if (connected || err instanceof RendezvousError) throw err instanceof RendezvousError ? err : new RendezvousError(`rendezvous at ${where}: ${(err as Error).message}`);
      if (Date.now() >= deadline) throw new RendezvousError(`rendezvous: rank ${e.rank} could not reach ${where} within ${timeoutMs} ms: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, Math.min(200, Math.max(0, deadline - Date.now()))));
    } finally {
      clearTimeout(timer);
      sock.destroy();
    }
  }
}

/** A TCP port free on this machine right now (for a rendezvous of ranks started together here). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}
