// Ranks placed by a launcher (torchrun, Slurm): this process is one rank. launchEnv reads
// where; rendezvous() meets the other ranks through rank 0 at MASTER_ADDR:MASTER_PORT and
// hands every rank the table of the others' data addresses and, for NCCL, rank 0's unique id.
import { connect, createServer, type Socket } from 'node:net';
import { UsageError } from '../src/errors.js';

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
}

/** One JSON object per line on the rendezvous socket; a line longer than this is refused. */
const MAX_LINE = 1 << 20;

function readLine(sock: Socket, what: string): Promise<unknown> {
  return new Promise((resolve, reject) => {
    let text = '';
    const onData = (c: Buffer) => {
      text += c.toString('utf8');
      const nl = text.indexOf('\n');
      if (nl < 0 && text.length <= MAX_LINE) return;
      sock.off('data', onData);
      try {
        if (nl < 0) throw new Error('line too long');
        resolve(JSON.parse(text.slice(0, nl)));
      } catch (err) {
        reject(new RendezvousError(`${what}: not a rendezvous message (${(err as Error).message})`));
      }
    };
    sock.on('data', onData);
    sock.once('error', (err) => reject(new RendezvousError(`${what}: ${err.message}`)));
    sock.once('close', () => reject(new RendezvousError(`${what}: the connection closed before a message arrived`)));
  });
}

/**
 * Rank 0 listens at MASTER_PORT; every other rank connects (retrying until the deadline
 * while rank 0 is not up yet) and says its rank and data port; once all have, rank 0 sends
 * each the table of data addresses (a peer's host as rank 0 saw it) and `newId()`'s bytes.
 */
export async function rendezvous(e: LaunchEnv, dataPort: number, opts: { timeoutMs?: number; newId?: () => Uint8Array } = {}): Promise<Rendezvous> {
  const timeoutMs = opts.timeoutMs ?? 300_000;
  const where = `${e.masterAddr}:${e.masterPort}`;
  if (e.rank === 0) {
    const id = opts.newId?.() ?? null;
    const peers: (PeerAddress | undefined)[] = new Array(e.worldSize).fill(undefined);
    peers[0] = { host: e.masterAddr, port: dataPort };
    if (e.worldSize === 1) return { peers: peers as PeerAddress[], id };
    const joined: Socket[] = [];
    const connections = new Set<Socket>();
    await new Promise<void>((resolve, reject) => {
      const fail = (err: Error) => {
        clearTimeout(timer);
        server.close();
        connections.forEach((s) => s.destroy()); // every joiner hears the rendezvous failed
        reject(err);
      };
      const server = createServer((sock: Socket) => {
        connections.add(sock);
        readLine(sock, `rendezvous at ${where}`).then((m) => {
          const { rank, port } = (m ?? {}) as { rank?: unknown; port?: unknown };
          if (!Number.isSafeInteger(rank) || (rank as number) < 1 || (rank as number) >= e.worldSize || !Number.isSafeInteger(port)) return fail(new RendezvousError(`rendezvous at ${where}: a joiner sent ${JSON.stringify(m)}, not a rank in 1..${e.worldSize - 1} and a port`));
          if (peers[rank as number]) return fail(new RendezvousError(`rendezvous at ${where}: rank ${String(rank)} joined twice (is RANK set the same in two processes?)`));
          peers[rank as number] = { host: sock.remoteAddress ?? e.masterAddr, port: port as number };
          joined.push(sock);
          if (joined.length < e.worldSize - 1) return;
          clearTimeout(timer);
          const reply = `${JSON.stringify({ peers, id: id ? Buffer.from(id).toString('base64') : null })}\n`;
          joined.forEach((s) => s.end(reply));
          server.close(); // stops accepting; the joiners close their ends once they have the table
          resolve();
        }, (err: Error) => sock.destroy(err));
      });
      const timer = setTimeout(() => {
        const missing = peers.flatMap((p, r) => (p ? [] : [r]));
        fail(new RendezvousError(`rendezvous at ${where}: rank${missing.length === 1 ? '' : 's'} ${missing.join(', ')} did not join within ${timeoutMs} ms`));
      }, timeoutMs);
      server.once('error', (err) => fail(new RendezvousError(`rendezvous: rank 0 cannot listen on port ${e.masterPort}: ${err.message}`)));
      server.listen(e.masterPort);
    });
    return { peers: peers as PeerAddress[], id };
  }
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let answered = false;
    try {
      const reply = await new Promise<unknown>((resolve, reject) => {
        const sock = connect(e.masterPort, e.masterAddr, () => {
          sock.write(`${JSON.stringify({ rank: e.rank, port: dataPort })}\n`);
          answered = true; // rank 0 is up: from here on a failure is final, not a retry
          readLine(sock, `rendezvous at ${where}`).then(resolve, reject).finally(() => sock.destroy());
        });
        sock.once('error', reject);
      });
      const { peers, id } = (reply ?? {}) as { peers?: PeerAddress[]; id?: string | null };
      if (!Array.isArray(peers) || peers.length !== e.worldSize || peers.some((p) => !p || typeof p.host !== 'string' || !Number.isSafeInteger(p.port))) {
        throw new RendezvousError(`rendezvous at ${where}: rank 0 answered without a table of ${e.worldSize} addresses`);
      }
      return { peers, id: typeof id === 'string' ? new Uint8Array(Buffer.from(id, 'base64')) : null };
    } catch (err) {
      if (answered || err instanceof RendezvousError) throw err instanceof RendezvousError ? err : new RendezvousError(`rendezvous at ${where}: ${(err as Error).message}`);
      if (Date.now() > deadline) throw new RendezvousError(`rendezvous: rank ${e.rank} could not reach ${where} within ${timeoutMs} ms: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, 200));
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
