// Which job a launched rank belongs to, and the hello every connection between launched
// ranks opens with (the rendezvous and the data connections alike), so a rank of another
// job that picked the same port, or anyone else on the network, is refused before a frame
// of the run is exchanged. The listener speaks first with its identity and a fresh nonce;
// the dialer answers with its identity and, when the ranks share a secret, an HMAC-SHA256
// over the run id, both ranks, the world size and that nonce (a replayed hello carries a
// MAC over an old nonce); the listener accepts with its own MAC over the dialer's nonce.
// Whichever side finds the other wrong says why in one line and closes.
import { createHmac, randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { Socket } from 'node:net';
import { UsageError } from '../src/errors.js';

export interface RunIdentity {
  /** The job's run id; null on a rank that learns it from rank 0 in the rendezvous. */
  readonly runId: string | null;
  /** Where the run id came from, for messages. */
  readonly source: string;
  /** Shared by every rank of the job when set: hellos then carry a MAC. */
  readonly secret: Buffer | null;
}

/** A run id goes into one-line messages and MACs: printable, short. */
const RUN_ID = /^[\w.:@+-]{1,128}$/;

/**
 * The run id from `--run-id`, else TORCHELASTIC_RUN_ID (torchrun's --rdzv-id, unless its default 'none'), else SLURM_JOB_ID and
 * SLURM_STEP_ID (srun), else none (rank 0 makes one up); the secret from `--secret-file`,
 * else EP_ACTORS_SECRET.
 */
export function runIdentity(flags: { runId?: string; secretFile?: string }, env: NodeJS.ProcessEnv = process.env): RunIdentity {
  let runId: string | null = null;
  let source = 'rank 0';
  if (flags.runId !== undefined) [runId, source] = [flags.runId, '--run-id'];
  // torchrun's default --rdzv-id is 'none': every job would share it, so it names nothing.
  else if (env.TORCHELASTIC_RUN_ID && env.TORCHELASTIC_RUN_ID !== 'none') [runId, source] = [env.TORCHELASTIC_RUN_ID, 'TORCHELASTIC_RUN_ID'];
  else if (env.SLURM_JOB_ID) [runId, source] = [`slurm-${env.SLURM_JOB_ID}.${env.SLURM_STEP_ID ?? '0'}`, 'SLURM_JOB_ID.SLURM_STEP_ID'];
  if (runId !== null && !RUN_ID.test(runId)) throw new UsageError(`the run id from ${source} must be 1 to 128 letters, digits or . _ : @ + -, got '${runId}'`);
  let secret: Buffer | null = null;
  if (flags.secretFile !== undefined) {
    try {
      secret = readFileSync(flags.secretFile);
    } catch (err) {
      throw new UsageError(`--secret-file: cannot read ${flags.secretFile}: ${(err as Error).message}`);
    }
  } else if (env.EP_ACTORS_SECRET !== undefined) secret = Buffer.from(env.EP_ACTORS_SECRET);
  // A trailing newline is how editors and `echo` leave a file; it is not part of the secret.
  if (secret) secret = secret.subarray(0, secret.length - (/\r?\n$/.exec(secret.toString('latin1'))?.[0].length ?? 0));
  if (secret && secret.length === 0) throw new UsageError(`the secret from ${flags.secretFile !== undefined ? '--secret-file' : 'EP_ACTORS_SECRET'} is empty`);
  return { runId, source, secret };
}

/** What rank 0 hands out when no launcher named the run. */
export const madeUpRunId = (): string => `ep-${randomUUID()}`;

/** Who is at one end of a connection, as its hello says. */
export interface Hello {
  readonly run: string | null;
  readonly rank: number;
  readonly world: number;
}

export const describeHello = (h: Hello): string => `rank ${h.rank} of ${h.world} in run ${h.run === null ? '(not yet named)' : `'${h.run}'`}`;

/** A connection one side refused: `line` names both identities (or what arrived instead of a hello). */
export class RefusedConnection extends Error {
  override name = 'RefusedConnection';
  constructor(
    readonly line: string,
    /** The other end's address. */
    readonly from: string,
  ) {
    super(line);
  }
}

/** The longest handshake line: a hello is a few hundred bytes; anything longer is not one. */
const MAX_HELLO = 4096;
const PROTOCOL = 'ep-actors/1';

/** A line of JSON read off the socket, and what came after it in the same reads. */
export interface Line {
  readonly value: unknown;
  readonly rest: Buffer;
}

/**
 * Reads one newline-terminated JSON value from `sock`, starting with `pending`; fails on a
 * line over `max` bytes, bytes that are not JSON, a closed or failed socket, or `timeoutMs`.
 */
export function readLine(sock: Socket, opts: { timeoutMs: number; max: number; pending?: Buffer }): Promise<Line> {
  return new Promise((resolve, reject) => {
    let buf = opts.pending ?? Buffer.alloc(0);
    const done = (err: Error | null, line?: Line) => {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('error', onError);
      sock.off('close', onClose);
      if (err) reject(err);
      else resolve(line!);
    };
    const onData = (c: Buffer) => {
      buf = buf.length ? Buffer.concat([buf, c]) : c;
      scan();
    };
    const scan = () => {
      const nl = buf.indexOf(0x0a);
      if (nl < 0) {
        if (buf.length > opts.max) done(new Error(`no line within ${opts.max} bytes`));
        return;
      }
      if (nl > opts.max) return done(new Error(`a line of ${nl} bytes, over ${opts.max}`));
      try {
        done(null, { value: JSON.parse(buf.subarray(0, nl).toString('utf8')), rest: buf.subarray(nl + 1) });
      } catch {
        done(new Error('not JSON')); // the parser's message would quote the stranger's bytes
      }
    };
    const onError = (err: Error) => done(err);
    const onClose = () => done(new Error('the connection closed before a message arrived'));
    const timer = setTimeout(() => done(new Error(`nothing arrived within ${opts.timeoutMs} ms`)), opts.timeoutMs);
    sock.on('data', onData);
    sock.on('error', onError);
    sock.on('close', onClose);
    scan();
  });
}

/** One end's view of a handshake: who it is, its secret, and how long it waits for each line. */
export interface Side {
  readonly me: Hello;
  readonly secret: Buffer | null;
  readonly timeoutMs: number;
}

function mac(secret: Buffer, role: 'dial' | 'listen', run: string | null, dialer: number, listener: number, world: number, nonce: string): string {
  return createHmac('sha256', secret).update(`${PROTOCOL}\n${role}\n${run ?? ''}\n${dialer}\n${listener}\n${world}\n${nonce}`).digest('base64');
}

function macMatches(want: string, got: unknown): boolean {
  if (typeof got !== 'string') return false;
  const a = Buffer.from(want);
  const b = Buffer.from(got);
  return a.length === b.length && timingSafeEqual(a, b);
}

/** A hello's fields, checked: the wire came from anyone. */
function helloOf(v: unknown): (Hello & { nonce: string; mac?: unknown }) | null {
  const h = v as Record<string, unknown> | null;
  if (!h || typeof h !== 'object' || h.protocol !== PROTOCOL) return null;
  const run = h.run === null || (typeof h.run === 'string' && RUN_ID.test(h.run)) ? (h.run as string | null) : undefined;
  if (run === undefined || !Number.isSafeInteger(h.rank) || !Number.isSafeInteger(h.world) || typeof h.nonce !== 'string' || h.nonce.length > 64) return null;
  return { run, rank: h.rank as number, world: h.world as number, nonce: h.nonce, mac: h.mac };
}

const send = (sock: Socket, v: unknown) => sock.write(`${JSON.stringify(v)}\n`);
/** host:port of the other end (an IPv4 peer of a dual-stack listener without its ::ffff: prefix). */
const addressOf = (sock: Socket) => `${sock.remoteAddress?.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/, '') ?? '?'}:${sock.remotePort ?? '?'}`;

/** Says why, closes, and gives the error for this side. */
function refuse(sock: Socket, from: string, line: string): RefusedConnection {
  send(sock, { protocol: PROTOCOL, refused: line });
  sock.end();
  setTimeout(() => sock.destroy(), 1000).unref(); // a peer that keeps it open does not keep this rank
  return new RefusedConnection(line, from);
}

/** The other side refused us: its line (it came from anyone: one line, bounded), else null. */
const theirRefusal = (v: unknown): string | null => {
  const r = v as { protocol?: unknown; refused?: unknown } | null;
  return r && r.protocol === PROTOCOL && typeof r.refused === 'string' ? r.refused.slice(0, 1000).replace(/[\x00-\x1f\x7f]/g, ' ') : null;
};

/** What this side holds against the other's hello, or null when it is a rank of this job. */
function mismatch(side: Side, them: Hello & { mac?: unknown }, expectedMac: string | null): string | null {
  if (side.me.run !== null && them.run !== null && side.me.run !== them.run) return 'the run ids differ';
  if (them.world !== side.me.world) return 'the world sizes differ';
  if (expectedMac === null && them.mac !== undefined) return 'it carries a MAC and this rank has no secret (set EP_ACTORS_SECRET or --secret-file on every rank)';
  if (expectedMac !== null && them.mac === undefined) return 'it carries no MAC and this rank requires one (EP_ACTORS_SECRET or --secret-file)';
  if (expectedMac !== null && !macMatches(expectedMac, them.mac)) return 'its MAC does not match (another secret, or a replayed hello)';
  return null;
}

/**
 * The listening end: sends its identity and a fresh nonce, reads the dialer's hello,
 * checks it (the run, world size, MAC, and `expect` on the dialer's rank) and accepts or
 * refuses. Resolves with the dialer's hello and the bytes that followed it.
 */
export async function helloAsListener(sock: Socket, side: Side, expect: (dialer: Hello) => string | null): Promise<{ peer: Hello; rest: Buffer }> {
  const from = addressOf(sock);
  const nonce = randomBytes(18).toString('base64');
  send(sock, { protocol: PROTOCOL, ...side.me, nonce });
  const who = `${describeHello(side.me)} refused a connection from ${from}`;
  let line: Line;
  try {
    line = await readLine(sock, { timeoutMs: side.timeoutMs, max: MAX_HELLO });
  } catch (err) {
    throw refuse(sock, from, `${who}: not an ep-actors hello (${(err as Error).message})`);
  }
  const refusal = theirRefusal(line.value);
  if (refusal !== null) {
    sock.destroy();
    throw new RefusedConnection(refusal, from);
  }
  const them = helloOf(line.value);
  if (!them) throw refuse(sock, from, `${who}: not an ep-actors hello`);
  const expected = side.secret ? mac(side.secret, 'dial', them.run, them.rank, side.me.rank, side.me.world, nonce) : null;
  const why = mismatch(side, them, expected) ?? expect(them);
  if (why !== null) throw refuse(sock, from, `${who}, which says it is ${describeHello(them)}: ${why}`);
  send(sock, { protocol: PROTOCOL, ok: true, ...(side.secret ? { mac: mac(side.secret, 'listen', them.run, them.rank, side.me.rank, side.me.world, them.nonce) } : {}) });
  return { peer: { run: them.run, rank: them.rank, world: them.world }, rest: line.rest };
}

/**
 * The dialling end: reads the listener's identity and nonce, checks it (`expect` on its
 * rank; a dialer that does not know the run id yet takes the listener's), sends its hello
 * and reads the answer. Resolves with the listener's hello and the bytes after the answer.
 */
export async function helloAsDialer(sock: Socket, side: Side, expect: (listener: Hello) => string | null): Promise<{ peer: Hello; rest: Buffer }> {
  const from = addressOf(sock);
  const who = (them: string) => `${describeHello(side.me)} refused ${from}${them}`;
  let line: Line;
  try {
    line = await readLine(sock, { timeoutMs: side.timeoutMs, max: MAX_HELLO });
  } catch (err) {
    sock.destroy(); // nothing came from the listener: a failed connection, not a refusal
    throw new Error(`no hello from ${from}: ${(err as Error).message}`);
  }
  const them = helloOf(line.value);
  if (!them) throw refuse(sock, from, `${who('')}: not an ep-actors rank`);
  const me = { ...side.me, run: side.me.run ?? them.run };
  const why = mismatch(side, them, null) ?? expect(them);
  if (why !== null) throw refuse(sock, from, `${who(`, which says it is ${describeHello(them)}`)}: ${why}`);
  const nonce = randomBytes(18).toString('base64');
  send(sock, { protocol: PROTOCOL, ...me, nonce, ...(side.secret ? { mac: mac(side.secret, 'dial', me.run, me.rank, them.rank, me.world, them.nonce) } : {}) });
  let answer: Line;
  try {
    answer = await readLine(sock, { timeoutMs: side.timeoutMs, max: MAX_HELLO, pending: line.rest });
  } catch (err) {
    sock.destroy();
    throw new Error(`no answer from ${describeHello(them)} at ${from} to this rank's hello: ${(err as Error).message}`);
  }
  const refusal = theirRefusal(answer.value);
  if (refusal !== null) {
    sock.destroy();
    throw new RefusedConnection(refusal, from);
  }
  const ok = answer.value as { protocol?: unknown; ok?: unknown; mac?: unknown } | null;
  if (!ok || ok.protocol !== PROTOCOL || ok.ok !== true) throw refuse(sock, from, `${who(`, ${describeHello(them)}`)}: its answer is not an ep-actors acceptance`);
  if (side.secret && !macMatches(mac(side.secret, 'listen', me.run, me.rank, them.rank, me.world, nonce), ok.mac)) {
    throw refuse(sock, from, `${who(`, which says it is ${describeHello(them)}`)}: its MAC does not match (another secret, or a replayed answer)`);
  }
  return { peer: { run: them.run, rank: them.rank, world: them.world }, rest: answer.rest };
}
