// Ranks placed by a launcher (`ep-actors rank`): the launcher's environment, the rendezvous,
// TCP framing, golden cases computed by four processes, and what a rank reports when a
// peer skips a collective, crashes or stalls.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { EventEmitter } from 'node:events';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import type { ChildProcess } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, launchEnv, rendezvous, RendezvousError, type LaunchEnv, type Rendezvous } from '../actors/rendezvous.js';
import { acceptEarly, socketMesh, SocketPort, type Goodbye, type PeerReport } from '../actors/socketPort.js';
import type { IssuedCollective } from '../machines/snapshot.js';
import { LANE_KNOCK, type SegmentHello } from '../actors/lane.js';
import { helloAsListener, type RunIdentity } from '../actors/runIdentity.js';
import { LaunchedRankError, runLaunchedRank } from '../actors/launch.js';
import { launchLocally, runScenarioOnProcesses } from '../cli/localRanks.js';
import { checkRankRecords, mergeRankRecords, RankRecordError } from '../actors/rankRecord.js';
import { simulateDes } from '../sim/des.js';
import type { Diagnosis } from '../machines/diagnosis.js';
import { validateScenario, type Scenario } from '../machines/scenario.js';
import { casePayloads } from '../actors/caseRanks.js';
import { caseScenario } from '../machines/scenario.js';
import { runActors } from '../actors/supervisor.js';
import { canonicalLedger } from './ledger.js';
import { loadCase } from '../src/case.js';
import { readSafetensors, readSafetensorsFile } from '../src/codec/safetensors.js';
import { Tensor, relativeError } from '../src/tensor.js';
import { seededRng } from '../src/moe/random.js';
import { goldenDir } from './paths.js';
import { within } from './within.js';
import { runCli } from './cli.js';
import { UsageError } from '../src/errors.js';

/** No run id from a launcher, no secret: rank 0 makes the run id up. */
const anon: RunIdentity = { runId: null, source: 'rank 0', secret: null };

test('launchEnv reads torchrun\'s variables, falls back to Slurm\'s, and rejects bad ones in one line', () => {
  assert.equal(launchEnv({ RANK: '1', WORLD_SIZE: '4', LOCAL_RANK: '1', MASTER_ADDR: 'node0', MASTER_PORT: '29400' }), { rank: 1, worldSize: 4, localRank: 1, masterAddr: 'node0', masterPort: 29400 });
  assert.equal(launchEnv({ SLURM_PROCID: '5', SLURM_NTASKS: '8', SLURM_LOCALID: '1', MASTER_ADDR: 'n1' }), { rank: 5, worldSize: 8, localRank: 1, masterAddr: 'n1', masterPort: 29500 });
  // torchrun's agent serves its own store at MASTER_PORT: the rendezvous moves one port up unless told where.
  assert.is(launchEnv({ RANK: '0', WORLD_SIZE: '2', MASTER_PORT: '29400', TORCHELASTIC_USE_AGENT_STORE: 'True' }).masterPort, 29401);
  assert.is(launchEnv({ RANK: '0', WORLD_SIZE: '2', MASTER_PORT: '29400', TORCHELASTIC_USE_AGENT_STORE: 'True', EP_ACTORS_PORT: '31000' }).masterPort, 31000);
  assert.throws(() => launchEnv({ RANK: '4', WORLD_SIZE: '4' }), /RANK 4 must be below WORLD_SIZE 4/);
  assert.throws(() => launchEnv({ WORLD_SIZE: '2' }), /RANK or SLURM_PROCID must be set/);
  assert.throws(() => launchEnv({ RANK: '0', WORLD_SIZE: 'two' }), /WORLD_SIZE must be set to a non-negative integer \(got two\)/);
});

test('rendezvous: every rank gets the address table and rank 0\'s id, whichever starts first; failures name the address', async () => {
  const port = await freePort();
  const id = Uint8Array.from({ length: 128 }, (_, i) => (i * 37 + 11) & 255);
  const env = (rank: number): LaunchEnv => ({ rank, worldSize: 4, localRank: rank, masterAddr: '127.0.0.1', masterPort: port });
  const early = [1, 2].map((r) => rendezvous(env(r), 4000 + r, { timeoutMs: 10_000, identity: anon })); // before rank 0 listens: they retry
  await new Promise((r) => setTimeout(r, 300));
  const got = await Promise.all([rendezvous(env(0), 4000, { timeoutMs: 10_000, identity: anon, newId: () => id }), ...early, rendezvous(env(3), 4003, { timeoutMs: 10_000, identity: anon })]);
  for (const [r, g] of got.entries()) {
    assert.equal(g.peers.map((p) => p.port), [4000, 4001, 4002, 4003], `rank ${r}`);
    assert.ok(g.peers.every((p) => /127\.0\.0\.1/.test(p.host)), JSON.stringify(g.peers));
    assert.equal(Array.from(g.id!), Array.from(id), `rank ${r}`);
  }
  try {
    await rendezvous(env(2), 4002, { timeoutMs: 500, identity: anon });
    assert.unreachable('no rank 0 is listening any more');
  } catch (e) {
    assert.instance(e, RendezvousError);
    assert.match((e as Error).message, `rank 2 could not reach 127.0.0.1:${port}`);
  }
  // Two processes with RANK=1: the second hello is refused, and the rendezvous goes on with the first.
  const three = (rank: number): LaunchEnv => ({ ...env(rank), worldSize: 3 });
  const refused: string[] = [];
  const zero = rendezvous(three(0), 1, { timeoutMs: 5000, identity: anon, refused: (r) => refused.push(r.line) });
  const ones = [2, 3].map((port) => rendezvous(three(1), port, { timeoutMs: 5000, identity: anon }).catch((e: Error) => e));
  // The refused one settles first: the other waits for rank 2.
  const dup = await Promise.race(ones);
  assert.instance(dup, UsageError);
  assert.match((dup as Error).message, /rank 1 has already joined \(is RANK set the same in two processes\?\)/);
  assert.equal(refused, [(dup as Error).message.replace(/^rendezvous at [^ ]+: /, '')]);
  const [z, two, ...both] = await Promise.all([zero, rendezvous(three(2), 4, { timeoutMs: 5000, identity: anon }), ...ones]);
  const first = both.find((g) => g !== dup) as Rendezvous;
  const table = [1, first.peers[1]!.port, 4];
  assert.ok(table[1] === 2 || table[1] === 3);
  assert.equal([z, first, two].map((g) => g.peers.map((p) => p.port)), [table, table, table]);
});

test('rendezvous: a rank 0 that answers nonsense is an error naming the address, not a hang or a crash', async () => {
  const side = { me: { run: 'r', rank: 0, world: 2 }, secret: null, timeoutMs: 3000 };
  // Before the hello (not a rank at all), and after it (a rank 0 whose table is wrong).
  const answers: [(sock: Socket) => void, RegExp, typeof RendezvousError | typeof UsageError][] = [
    [(sock) => sock.end('hello\n'), /no hello from 127\.0\.0\.1:\d+: not JSON$/, RendezvousError],
    [(sock) => sock.end('{"peers":[1]}\n'), /refused 127\.0\.0\.1:\d+: not an ep-actors rank/, UsageError],
    [(sock) => sock.end(''), /no hello from .*closed before a message arrived/, RendezvousError],
    [(sock) => void helloAsListener(sock, side, () => null).then(() => sock.end('{"peers":[1],"run":"r"}\n')), /answered without a table of 2 addresses/, RendezvousError],
    [(sock) => void helloAsListener(sock, side, () => null).then(() => sock.end()), /rank 0 did not hand out the address table/, RendezvousError],
  ];
  for (const [answer, pattern, kind] of answers) {
    const server = createServer(answer);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
    const port = (server.address() as AddressInfo).port;
    try {
      await rendezvous({ rank: 1, worldSize: 2, localRank: 1, masterAddr: '127.0.0.1', masterPort: port }, 1, { timeoutMs: 3000, identity: anon });
      assert.unreachable(`accepted ${String(answer)}`);
    } catch (e) {
      assert.instance(e, kind);
      assert.match((e as Error).message, pattern);
      assert.match((e as Error).message, `127.0.0.1:${port}`);
    } finally {
      server.close();
    }
  }
});

/** The rank records `ep-actors rank` left in `dir`. */
const readRecords = (dir: string) => {
  const names = readdirSync(dir).filter((f) => f.endsWith('.record.json'));
  return checkRankRecords(names.map((f) => JSON.parse(readFileSync(join(dir, f), 'utf8')) as unknown), names);
};


/** A stand-in for a net.Socket: the test feeds it bytes. */
function fakeSocket() {
  const s = new EventEmitter() as EventEmitter & { written: Buffer[]; corked: number; log: string[] };
  s.written = [];
  s.corked = 0;
  s.log = [];
  Object.assign(s, {
    setNoDelay() {},
    cork: () => (s.corked++, s.log.push('cork')),
    uncork: () => (s.corked && s.corked--, s.log.push('uncork')),
    write: (b: Buffer, done?: (err?: Error | null) => void) => {
      s.written.push(Buffer.from(b));
      s.log.push(`write ${b.length}`);
      done?.(null);
    },
    end() {},
    destroy() {},
  });
  return s;
}

test('TCP framing: frames split anywhere arrive whole, in order, 8-aligned; a corrupt length breaks the connection', () => {
  const rng = seededRng(11);
  for (let trial = 0; trial < 50; trial++) {
    const frames = Array.from({ length: 1 + Math.floor(rng() * 6) }, () => Uint8Array.from({ length: 1 + Math.floor(rng() * 300) }, () => Math.floor(rng() * 256) & 0x7f));
    const wire = Buffer.concat(frames.flatMap((f) => [Buffer.from(Uint32Array.of(f.length).buffer), Buffer.from(f)]));
    const sock = fakeSocket();
    const got: Uint8Array[] = [];
    const port = new SocketPort(sock as unknown as Socket, { broken: (r) => assert.unreachable(r), finished: () => assert.unreachable('goodbye') });
    let at = 0;
    // Some bytes arrive before anyone listens: they wait in the backlog, as on a MessagePort.
    while (at < wire.length) {
      const n = 1 + Math.floor(rng() * 40);
      sock.emit('data', wire.subarray(at, at + n));
      at += n;
      if (got.length === 0 && at > wire.length / 2) port.on('message', (m) => got.push(m as Uint8Array));
    }
    if (got.length === 0) port.on('message', (m) => got.push(m as Uint8Array));
    assert.equal(got.map((g) => Array.from(g)), frames.map((f) => Array.from(f)));
    assert.ok(got.every((g) => g.byteOffset % 8 === 0));
  }
  const sock = fakeSocket();
  const broken: string[] = [];
  new SocketPort(sock as unknown as Socket, { broken: (r) => broken.push(r), finished: () => {} });
  sock.emit('data', Buffer.from([0xff, 0xff, 0xff, 0xff]));
  sock.emit('close');
  assert.equal(broken.length, 1, 'reported once');
  assert.match(broken[0]!, /frame of 4294967295 bytes/);
});

test('a rank\'s collective completes only once its rows have left the process: flushed() waits for a peer that is not reading yet', async () => {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const accepted = new Promise<Socket>((r) => server.once('connection', r));
  const client = connect((server.address() as AddressInfo).port, '127.0.0.1');
  const reader = await accepted;
  reader.pause(); // the peer is busy: nothing is read
  try {
    const port = new SocketPort(client, { broken: () => {}, finished: () => {} });
    await new Promise((r) => client.once('connect', r));
    port.postMessage(new Uint8Array(64 << 20));
    const flushed = port.flushed();
    assert.ok(flushed, 'a 64 MiB frame cannot all be in the kernel\'s buffers at once');
    let done = false;
    void flushed.then(() => (done = true));
    await new Promise((r) => setTimeout(r, 100));
    assert.not.ok(done, 'flushed while the peer had read nothing');
    let read = 0;
    reader.on('data', (c: Buffer) => (read += c.length));
    reader.resume();
    await flushed;
    assert.ok(read > 0);
    assert.is(port.flushed(), null, 'nothing pending after the flush');
  } finally {
    client.destroy();
    reader.destroy();
    server.close();
  }
});

test('a goodbye frame ends the connection quietly and reaches the peer with its counts', async () => {
  const a = fakeSocket();
  new SocketPort(a as unknown as Socket, { broken: () => {}, finished: () => {} }).goodbye({ issued: { ep: 6 } });
  const b = fakeSocket();
  const said: Goodbye[] = [];
  const broken: string[] = [];
  new SocketPort(b as unknown as Socket, { broken: (r) => broken.push(r), finished: (g) => said.push(g) });
  b.emit('data', Buffer.concat(a.written));
  b.emit('close');
  await new Promise((r) => setImmediate(r));
  assert.equal(said, [{ issued: { ep: 6 } }]);
  assert.equal(broken, []);
});

test('report frames tell a peer each collective the rank issues and when it computes again, and are never taken for data', async () => {
  const a = fakeSocket();
  const sender = new SocketPort(a as unknown as Socket, { broken: () => {}, finished: () => {} });
  const collective = { comm: 'ep', op: 'fwd.dispatch', layer: 1, microBatch: 0, phase: 'forward', sendSplits: [2, 0], recvSplits: [1, 3], why: [] } as unknown as IssuedCollective;
  sender.report({ kind: 'issue', collective, dtype: 'f32' });
  sender.postMessage(Uint8Array.of(9, 8, 7));
  sender.report({ kind: 'computing' });
  const b = fakeSocket();
  const reports: PeerReport[] = [];
  const data: number[][] = [];
  new SocketPort(b as unknown as Socket, { broken: () => {}, finished: () => {}, report: (r) => reports.push(r) }).on('message', (m) => data.push(Array.from(m as Uint8Array)));
  b.emit('data', Buffer.concat(a.written));
  assert.equal(reports, [{ kind: 'issue', collective, dtype: 'f32' }, { kind: 'computing' }]);
  assert.equal(data, [[9, 8, 7]]);
  // An issue report that does not parse breaks the connection, as a corrupt frame does.
  const c = fakeSocket();
  const broken: string[] = [];
  new SocketPort(c as unknown as Socket, { broken: (r) => broken.push(r), finished: () => {} });
  const bad = Buffer.from([0xc1, 0x02, 0x7b]);
  const header = Buffer.alloc(4);
  header.writeUInt32LE(bad.length);
  c.emit('data', Buffer.concat([header, bad]));
  assert.equal(broken, ['the peer reported an issue in a frame that does not parse']);
});

test('the fast lane\'s frames: an offer of an inbox arrives as its hello, a knock as LANE_KNOCK, neither taken for data; an offer that does not parse breaks the connection', async () => {
  const a = fakeSocket();
  const sender = new SocketPort(a as unknown as Socket, { broken: () => {}, finished: () => {} });
  const offer: SegmentHello = { segment: '/proc/1/fd/3', token: 'ab'.repeat(16), host: 'h', rings: 3, ring: 1 };
  sender.postMessage(offer);
  sender.postMessage(Uint8Array.of(9, 8, 7));
  sender.postMessage(LANE_KNOCK);
  const b = fakeSocket();
  const got: unknown[] = [];
  new SocketPort(b as unknown as Socket, { broken: (r) => assert.unreachable(r), finished: () => {} }).on('message', (m) => got.push(m instanceof Uint8Array ? Array.from(m) : m));
  b.emit('data', Buffer.concat(a.written));
  assert.equal(got, [offer, [9, 8, 7], LANE_KNOCK]);
  assert.is(got[2], LANE_KNOCK, 'the knock is the one object the mesh tests for');
  for (const body of [Buffer.from('{"segment"'), Buffer.from('[1,2]'), Buffer.from('{"token":"x"}')]) {
    const c = fakeSocket();
    const broken: string[] = [];
    new SocketPort(c as unknown as Socket, { broken: (r) => broken.push(r), finished: () => {} }).on('message', (m) => assert.unreachable(`delivered ${String(m)}`));
    const frame = Buffer.concat([Buffer.from([0xc1, 0x04]), body]);
    const header = Buffer.alloc(4);
    header.writeUInt32LE(frame.length);
    c.emit('data', Buffer.concat([header, frame]));
    assert.equal(broken, ['the peer offered its inbox in a frame that does not parse'], body.toString());
  }
});

test('frames of one event-loop turn leave in one write; large buffers are reused: a written chunk\'s goes back to the sender\'s mesh, a consumed one backs the next frame', async () => {
  const a = fakeSocket();
  const sender = new SocketPort(a as unknown as Socket, { broken: () => {}, finished: () => {} });
  const returned: unknown[] = [];
  sender.on('message', (m) => returned.push(m));
  const big = new Uint8Array(128 * 1024).fill(5);
  sender.report({ kind: 'computing' });
  sender.postMessage(big, [big.buffer]);
  const small = Uint8Array.of(1, 2, 3);
  sender.postMessage(small, [small.buffer]);
  assert.is(a.log.filter((e) => e === 'cork').length, 1, 'corked once for the turn');
  assert.is(a.corked, 1, 'held until the turn ends');
  await new Promise((r) => setImmediate(r));
  assert.is(a.corked, 0, 'the turn\'s frames left');
  assert.equal(a.log.slice(-1), ['uncork']);
  // Only the large transferred buffer goes back (a small one would take a pool's place; a report's is not the sender's).
  assert.equal(returned, [big.buffer]);
  sender.postMessage(Uint8Array.of(4)); // not transferred: stays the caller's
  await new Promise((r) => setImmediate(r));
  assert.is(returned.length, 1);

  const b = fakeSocket();
  const reader = new SocketPort(b as unknown as Socket, { broken: (r) => assert.unreachable(r), finished: () => {} });
  const frames: Uint8Array[] = [];
  reader.on('message', (m) => frames.push(m as Uint8Array));
  const wire = (n: number, v: number) => Buffer.concat([Buffer.from(Uint32Array.of(n).buffer), Buffer.alloc(n, v)]);
  b.emit('data', wire(100 * 1024, 1));
  reader.postMessage(frames[0]!.buffer); // consumed: the mesh gives it back
  b.emit('data', wire(90 * 1024, 2)); // fits the consumed buffer
  b.emit('data', wire(200 * 1024, 3)); // does not: a fresh one
  assert.is(frames[1]!.buffer, frames[0]!.buffer, 'the consumed buffer backs the next frame that fits');
  assert.is.not(frames[2]!.buffer, frames[0]!.buffer);
  assert.equal([frames[1]!.byteLength, frames[1]!.byteOffset, frames[1]!.every((x) => x === 2)], [90 * 1024, 0, true]);
  assert.ok(frames[2]!.every((x) => x === 3));
});

test('after a goodbye, either way, nothing more is written; a peer that reads a stop and then a reset reports the stop', async () => {
  const a = fakeSocket();
  const left = new SocketPort(a as unknown as Socket, { broken: () => {}, finished: () => {} });
  const closed = left.goodbye({ issued: { ep: 2 }, stopped: 'stall: rank 0 made no progress', stoppedBy: 0 });
  const said = a.written.length;
  left.postMessage(Uint8Array.of(1, 2, 3)); // the stopped rank's layer still finishing a compute
  assert.is(a.written.length, said, 'no write after the goodbye');
  a.emit('close');
  await closed; // resolves once the connection is closed

  const b = fakeSocket();
  const heard: Goodbye[] = [];
  const broken: string[] = [];
  const port = new SocketPort(b as unknown as Socket, { broken: (r) => broken.push(r), finished: (g) => heard.push(g) });
  b.emit('data', Buffer.concat(a.written));
  b.emit('error', new Error('read ECONNRESET'));
  b.emit('close');
  port.postMessage(Uint8Array.of(4, 5, 6));
  await new Promise((r) => setImmediate(r));
  assert.equal(heard, [{ issued: { ep: 2 }, stopped: 'stall: rank 0 made no progress', stoppedBy: 0 }]);
  assert.equal(broken, [], 'the reset after the goodbye is not a crash');
  assert.is(b.written.length, 0, 'nothing written to a peer that said goodbye');
});

const launch = (n: number, args: string[], env?: NodeJS.ProcessEnv) => launchLocally(n, args, { timeoutMs: 60_000, env });

test('golden cases computed by 4 launched processes (through the shared-memory lane, and over TCP only) match within 1e-5, the zero-token rank included', async () => {
  for (const [name, tcpOnly] of [['ep4_silu_packed', false], ['ep4_gelu_unpacked_starve1', false], ['ep4_gelu_unpacked_starve1', true]] as const) {
    const dir = mkdtempSync(join(tmpdir(), 'ep-actors-launch-'));
    try {
      const golden = join(goldenDir, `${name}.safetensors`);
      const runs = await launch(4, ['--case', golden, '--out-dir', dir, '--timeout', '30000', '--steps', '2', '--json'], { ...process.env, EP_ACTORS_SHM_DISABLE: tcpOnly ? '1' : '0' });
      runs.forEach((r, rank) => {
        assert.is(r.code, 0, `${name} rank ${rank}: ${r.stderr}`);
        const summary = JSON.parse(r.stdout) as { rank: number; stepMs: number[] };
        assert.is(summary.rank, rank);
        assert.is(summary.stepMs.length, 2, 'one time per step');
      });
      const want = await readSafetensorsFile(golden);
      const grads = new Map<string, Tensor[]>();
      for (let rank = 0; rank < 4; rank++) {
        const path = join(dir, `rank${rank}.safetensors`);
        const file = readSafetensors(readFileSync(path), path);
        assert.is(file.metadata.first_expert, String(rank * (Number(want.metadata.num_experts) / 4)));
        for (const [key, t] of file.tensors) {
          const m = /^rank\d+\.(grad\.\w+)$/.exec(key);
          if (m) grads.set(m[1]!, [...(grads.get(m[1]!) ?? []), t]);
          else assert.ok(relativeError(t, want.tensors.get(`expected.${key}`)!) <= 1e-5, `${name}: ${key}`);
        }
      }
      for (const [key, parts] of grads) {
        const all = Tensor.from('f32', [parts.reduce((a, p) => a + p.shape[0]!, 0), ...parts[0]!.shape.slice(1)], parts.flatMap((p) => Array.from(p.data as Float32Array)));
        assert.ok(relativeError(all, want.tensors.get(`expected.${key}`)!) <= 1e-5, `${name}: ${key}`);
      }
      // The ranks' records replay into the ledger the worker runtime keeps for the same case and steps.
      const records = readRecords(dir);
      for (const r of records) {
        const finished = r.messages.find((m) => m.type === 'finished') as Record<string, unknown> | undefined;
        assert.ok(finished && !('result' in finished), `${name} rank ${r.rank}: the record keeps the finish but not the case's result bytes`);
      }
      const merged = mergeRankRecords(records);
      assert.is(merged.diagnosis.verdict, 'ok', merged.diagnosis.cause);
      const data = await loadCase(golden);
      const onWorkers = await runActors(caseScenario(data.meta), { casePayloads: casePayloads(data), steps: 2 });
      assert.equal(canonicalLedger(merged.ledger), canonicalLedger(onWorkers.ledger), name);
      assert.equal(merged.paths, onWorkers.paths, `${name}: state paths`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
});

test('no-dispatch-edge on 4 processes: the ranks waiting in bwd.dispatch stop at once, naming the rank that finished without it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-launch-'));
  try {
    const golden = join(goldenDir, 'ep4_gelu_unpacked_starve1.safetensors');
    const runs = await launch(4, ['--case', golden, '--out-dir', dir, '--variant', 'no-dispatch-edge', '--timeout', '30000']);
    assert.is(runs[1]!.code, 0, 'rank 1 finished its own (buggy) code path');
    for (const r of [runs[0]!, runs[2]!, runs[3]!]) {
      assert.is(r.code, 2, r.stderr);
      assert.match(r.stderr, /missing collective: rank \d waits in bwd\.dispatch \(layer 0, ep position 5\) but rank 1 finished its step after issuing 5 collective\(s\) on ep/);
    }
    // Every rank left its record, the stopped ones too: merged, they give the diagnosis the
    // worker runtime gives for the same case and variant.
    const merged = mergeRankRecords(readRecords(dir));
    const data = await loadCase(golden);
    const onWorkers = (await runActors(caseScenario(data.meta, 'no-dispatch-edge'), { casePayloads: casePayloads(data) })).diagnosis;
    const { verdict, communicator, position, culprits, cause } = merged.diagnosis;
    assert.equal({ verdict, communicator, position, culprits }, { verdict: onWorkers.verdict, communicator: onWorkers.communicator, position: onWorkers.position, culprits: onWorkers.culprits });
    // The records are complete, so every waiting rank is named (the live runtime names those
    // whose issue reached the supervisor before it wrote its diagnosis).
    assert.match(cause, /so rank 1 skipped bwd\.dispatch; ranks 0, 2, 3 wait in bwd\.dispatch \(ep, position 5\)/);
    assert.is(merged.trace.filter((e) => e.name === 'bwd.dispatch').length, 3, 'three ranks entered bwd.dispatch');
    // No watchdog: the first rank stopped within moments of rank 1 finishing.
    assert.ok(merged.diagnosis.detectedAfterMs !== undefined && merged.diagnosis.detectedAfterMs < 5000, `detected after ${merged.diagnosis.detectedAfterMs} ms`);

    const html = join(dir, 'report.html');
    const r = await runCli(['viz', 'report', '--ranks', dir, '--html', html, '--json']);
    assert.is(r.code, 0, r.stderr);
    assert.is((JSON.parse(r.stdout) as { verdict: string }).verdict, 'missing');
    assert.match(readFileSync(html, 'utf8'), /bwd\.dispatch/);

    rmSync(join(dir, 'rank2.record.json'));
    // A rank with no record died: a crash naming it, and the report is still written.
    const gap = await runCli(['viz', 'report', '--ranks', dir, '--html', html, '--json']);
    assert.is(gap.code, 0, gap.stderr);
    assert.equal((JSON.parse(gap.stdout) as { verdict: string; culprits: number[] }).culprits, [2]);
    assert.match(gap.stdout, /"verdict":"crash"/);
    writeFileSync(join(dir, 'rank2.record.json'), '{"hello": 1}');
    const bad = await runCli(['viz', 'report', '--ranks', dir, '--html', html]);
    assert.match(bad.stderr, /rank2\.record\.json: not an ep-actors rank record/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a rank that throws tells its peers why; one that vanishes is reported as gone; one that stalls trips its watchdog', async () => {
  const data = await loadCase(join(goldenDir, 'ep2_relu_top1_skew.safetensors'));
  const env = async (): Promise<(rank: number) => LaunchEnv> => {
    const port = await freePort();
    return (rank) => ({ rank, worldSize: 2, localRank: rank, masterAddr: '127.0.0.1', masterPort: port });
  };
  const base = { data, scenario: caseScenario(data.meta), identity: anon, exchange: 'tcp' as const, backend: 'ts' as const, timeoutMs: 20_000 };

  let at = await env();
  const thrown = await Promise.allSettled([runLaunchedRank({ ...base, env: at(0) }), runLaunchedRank({ ...base, env: at(1), faults: [{ kind: 'throw', rank: 1, op: 'fwd.combine' }] })]);
  assert.is(thrown[1].status, 'rejected');
  const reason0 = (thrown[0] as PromiseRejectedResult).reason as Error;
  assert.instance(reason0, LaunchedRankError);
  assert.match(reason0.message, /^rank 1 stopped: /);
  assert.match(reason0.message, /fwd\.combine/);

  // Rank 1 joins and connects, then its process is gone: no goodbye, just closed connections.
  at = await env();
  const server = createServer();
  const listening = acceptEarly(server);
  await new Promise<void>((r) => server.listen(0, () => r()));
  const rank0 = runLaunchedRank({ ...base, env: at(0) });
  const { peers, runId } = await rendezvous(at(1), (server.address() as AddressInfo).port, { timeoutMs: 5000, identity: anon });
  const mesh = await socketMesh({ run: runId, rank: 1, world: 2 }, null, peers, listening, { broken: () => {}, finished: () => {}, refused: () => {} });
  mesh.get(0)!.socket.destroy();
  server.close();
  try {
    await rank0;
    assert.unreachable('rank 0 finished without its peer');
  } catch (e) {
    assert.instance(e, LaunchedRankError);
    assert.match((e as Error).message, /rank 1 went away before finishing its step \(.*\): it crashed or was killed/, (e as Error).message);
  }

  at = await env();
  const stalled = await Promise.allSettled([runLaunchedRank({ ...base, env: at(0) }), runLaunchedRank({ ...base, computeTimeoutMs: 1500, env: at(1), faults: [{ kind: 'stall', rank: 1, op: 'fwd.dispatch' }] })]);
  assert.match(String((stalled[1] as PromiseRejectedResult).reason), /stall: rank 1 has not returned from its work before fwd\.dispatch of layer 0 for 1500 ms \(compute limit\)/);
  // Rank 0 waits in fwd.dispatch past its own limits' sum only if rank 1 never says why: it hears the stall first.
  assert.match(String((stalled[0] as PromiseRejectedResult).reason), /rank 1 stopped: stall: rank 1 has not returned from its work before fwd\.dispatch/);
});

test('8 ranks on two replicas (dp=2 x ep=4), starve:1 and no-dispatch-edge: every rank ends by itself; those that wait in bwd.dispatch name the missing collective, the other replica finishes', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-launch-'));
  try {
    // The spawn's own limit (SIGKILL, exit code null) is the bound: a rank that does not end fails the test.
    const runs = await launchLocally(8, ['--ep', '4', '--dp', '2', '--routing', 'starve:1', '--variant', 'no-dispatch-edge', '--out-dir', dir, '--timeout', '20000'], { timeoutMs: 45_000 });
    // Rank 1 finishes its own (buggy) code path; ranks 0, 2, 3 wait for it in bwd.dispatch;
    // replica 1 (ranks 4..7) needs none of them and finishes its step.
    assert.equal(runs.map((r) => r.code), [2, 0, 2, 2, 0, 0, 0, 0], runs.map((r) => r.stderr).join('\n'));
    for (const rank of [0, 2, 3]) assert.match(runs[rank]!.stderr, /missing collective: rank \d waits in bwd\.dispatch \(layer 0, ep position 5\) but rank 1 finished its step/, `rank ${rank}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a rendezvous that cannot complete ends every rank with exit 1 and one line: a rank never started (--timeout), an impossible port, a host that does not resolve', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-launch-'));
  try {
    const runs = await launchLocally(4, ['--ep', '4', '--out-dir', dir, '--timeout', '3000'], { ranks: [0, 1, 2], timeoutMs: 20_000 });
    runs.forEach((r, rank) => {
      assert.is(r.code, 1, `rank ${rank}: ${r.stderr}`);
      assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
    });
    assert.match(runs[0]!.stderr, /rendezvous at 127\.0\.0\.1:\d+: rank 3 did not join within 3000 ms/);
    for (const r of runs.slice(1)) assert.match(r.stderr, /rank 0 did not hand out the address table within 3000 ms/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const placement = /^(RANK|WORLD_SIZE|LOCAL_RANK|MASTER_\w+|SLURM_\w+|TORCHELASTIC_\w+|EP_ACTORS_\w+)$/;
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !placement.test(k)));
  const cases: [Record<string, string>, RegExp][] = [
    [{ MASTER_PORT: '99999' }, /the rendezvous port 99999 \(MASTER_PORT\) is not a TCP port/],
    [{ MASTER_PORT: '29500', MASTER_ADDR: 'no-such-host.invalid' }, /MASTER_ADDR 'no-such-host\.invalid' does not resolve/],
  ];
  for (const [env, pattern] of cases) {
    for (const rank of ['0', '1']) {
      const r = await runCli(['rank', '--ep', '2', '--out-dir', '/tmp/never', '--timeout', '60000'], { env: { ...clean, ...env, RANK: rank, WORLD_SIZE: '2' }, timeoutMs: 20_000 });
      assert.is(r.code, 1, r.stderr);
      assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
      assert.match(r.stderr, pattern);
    }
  }
});

test('a rank killed mid-step (SIGKILL, SIGTERM): the others stop at once naming it; a terminated rank tells them why and exits 1', async () => {
  for (const signal of ['SIGKILL', 'SIGTERM'] as const) {
    const dir = mkdtempSync(join(tmpdir(), 'ep-actors-launch-'));
    try {
      let connected!: () => void;
      const inRun = new Promise<void>((r) => (connected = r));
      const children = new Map<number, ChildProcess>();
      const launched = launchLocally(4, ['--ep', '4', '--steps', '1000', '--out-dir', dir, '--timeout', '20000'], {
        timeoutMs: 60_000,
        started: (child, rank) => {
          children.set(rank, child);
          let err = '';
          if (rank === 1) child.stderr!.on('data', (d) => /connected to its 3 peers/.test((err += d)) && connected());
        },
      });
      await within(30_000, 'rank 1 connected', inRun);
      children.get(1)!.kill(signal); // a thousand steps: rank 1 is in one of the first
      const runs = await launched;
      if (signal === 'SIGKILL') assert.is(runs[1]!.code, null);
      else {
        assert.is(runs[1]!.code, 1, runs[1]!.stderr);
        assert.match(runs[1]!.stderr, /ep-actors rank 1: terminated by SIGTERM/);
      }
      for (const rank of [0, 2, 3]) {
        const r = runs[rank]!;
        assert.is(r.code, 2, `${signal}: rank ${rank}: ${r.stderr}`);
        assert.match(r.stderr, signal === 'SIGKILL' ? /rank 1 went away before finishing its step \(.*\): it crashed or was killed/ : /rank 1 stopped: terminated by SIGTERM/, `rank ${rank}`);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
});

test('sim --engine processes: one process per rank reaches the verdict and culprit the discrete-event engine does; ok ledgers are equal', async () => {
  const cases: Partial<Scenario>[] = [
    { ep: 4, routing: 'zipf:1.5', layers: 2 },
    { ep: 2, dp: 2, experts: 4, fsdp: 'split', packed: false, routing: 'starve:1' },
    { ep: 4, routing: 'starve:2', variant: 'no-dispatch-edge' },
    { ep: 2, dp: 2, experts: 4, fsdp: 'split', packed: false, routing: 'starve:1', variant: 'no-unused-expert-grads' },
    { ep: 4, routing: 'empty:2', variant: 'layer-metric' },
  ];
  for (const c of cases) {
    const s = validateScenario(c);
    const des = simulateDes(s);
    const merged = await runScenarioOnProcesses(s, ['--timeout', '20000']);
    assert.is(merged.diagnosis.verdict, des.diagnosis.verdict, `${JSON.stringify(c)}: ${merged.diagnosis.cause}`);
    assert.equal(merged.diagnosis.culprits, des.diagnosis.culprits, JSON.stringify(c));
    if (des.diagnosis.verdict === 'ok') assert.equal(canonicalLedger(merged.ledger), canonicalLedger(des.ledger), JSON.stringify(c));
  }
  const cli = await runCli(['sim', '--ep', '4', '--routing', 'starve:1', '--variant', 'no-dispatch-edge', '--engine', 'processes', '--json']);
  assert.is(cli.code, 2, cli.stderr);
  const d = JSON.parse(cli.stdout) as { verdict: string; culprits: number[] };
  assert.equal([d.verdict, d.culprits], ['missing', [1]]);
});

test('processes run to quiescence as the engine does: a kernel that never returns is a stall naming its rank; hangs in both replicas\' communicators are both listed', async () => {
  const verdict = (d: Diagnosis) => ({ verdict: d.verdict, communicator: d.communicator, position: d.position, culprits: d.culprits, hangs: (d.hangs ?? []).map((h) => [h.verdict, h.communicator, h.position, h.culprits]) });
  // Rank 1 holds no tokens: its expert's backward never returns (kernel-hang); its peers wait for it, which is not a hang of theirs.
  const stall = validateScenario({ ep: 2, dp: 2, experts: 4, routing: 'starve:1', variant: 'kernel-hang' });
  const stalled = await runScenarioOnProcesses(stall, ['--timeout', '20000', '--compute-timeout', '3000']);
  assert.equal(verdict(stalled.diagnosis), verdict(simulateDes(stall).diagnosis), stalled.diagnosis.cause);
  assert.equal(stalled.diagnosis.culprits, [1]);
  assert.match(stalled.diagnosis.cause, /rank 1 has not returned from .* for 3000 ms \(compute limit\)/);
  // wrong-group: ep rank 1 of each replica issues a collective on the wrong communicator, so ep[dp=0] and ep[dp=1] each hang on their own.
  const two = validateScenario({ ep: 2, dp: 2, experts: 4, variant: 'wrong-group', wrongGroupRank: 1 });
  const des = simulateDes(two).diagnosis;
  assert.equal(des.hangs?.map((h) => h.communicator), ['ep[dp=0]', 'ep[dp=1]']);
  const merged = await runScenarioOnProcesses(two, ['--timeout', '20000']);
  assert.equal(verdict(merged.diagnosis), verdict(des), merged.diagnosis.cause);
});

test('fuzz: damaged rank records fail with a RankRecordError or merge to a verdict that accounts for the damage', async () => {
  const data = await loadCase(join(goldenDir, 'ep2_relu_top1_skew.safetensors'));
  const port = await freePort();
  const records: unknown[] = [];
  await Promise.all([0, 1].map((rank) => runLaunchedRank({ data, scenario: caseScenario(data.meta), env: { rank, worldSize: 2, localRank: rank, masterAddr: '127.0.0.1', masterPort: port }, identity: anon, exchange: 'tcp', backend: 'ts', timeoutMs: 20_000, keep: (r) => records.push(r) })));
  const clean = JSON.stringify(records);
  const cleanMerge = mergeRankRecords(checkRankRecords(JSON.parse(clean) as unknown[], ['a', 'b']));
  assert.is(cleanMerge.diagnosis.verdict, 'ok');
  /** Who issued at which position of which communicator: what a field's damage must not change in an ok merge. */
  const slots = (m: typeof cleanMerge) => m.ledger.map((e) => `${e.communicator}|${e.position}|${e.rank}`).sort();
  assert.ok(cleanMerge.ledger.length > 0);
  const rng = seededRng(99);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rng() * xs.length)]!;
  const junk = [undefined, null, 'x', -1, 1.5, 1e9, {}, [], true];
  let failed = 0;
  let lostOrExtra = 0;
  let okMerges = 0;
  for (let i = 0; i < 400; i++) {
    const recs = JSON.parse(clean) as { messages: Record<string, unknown>[] }[];
    const rec = pick(recs);
    const k = Math.floor(rng() * rec.messages.length);
    const kind = rng();
    /** One rank lost a collective or its finish, or issued one more than its peers: no merge may call that ok. */
    let unbalanced = false;
    if (kind < 0.15) {
      unbalanced = rec.messages[k]!.type === 'issue' || rec.messages[k]!.type === 'finished';
      rec.messages.splice(k, 1);
    } else if (kind < 0.25) {
      const copy = structuredClone(rec.messages[Math.floor(rng() * rec.messages.length)]!);
      unbalanced = copy.type === 'issue';
      rec.messages.splice(k, 0, copy);
    } else {
      // Damage one field somewhere inside the message (collective, snapshot, context...).
      let target: Record<string, unknown> = rec.messages[k]!;
      for (let depth = 0; depth < 3; depth++) {
        const key = pick(Object.keys(target));
        const inner = target[key];
        if (depth < 2 && inner && typeof inner === 'object' && !Array.isArray(inner) && rng() < 0.6) target = inner as Record<string, unknown>;
        else {
          target[key] = pick(junk);
          break;
        }
      }
    }
    let merged: typeof cleanMerge;
    try {
      merged = mergeRankRecords(checkRankRecords(recs, ['a', 'b']));
    } catch (e) {
      if (!(e instanceof RankRecordError)) throw new Error(`mutation ${i}: ${(e as Error).stack}`);
      failed++;
      continue;
    }
    if (unbalanced) {
      lostOrExtra++;
      assert.is.not(merged.diagnosis.verdict, 'ok', `mutation ${i}: a rank lost or gained a collective, yet the merge is ok`);
    } else if (merged.diagnosis.verdict === 'ok') {
      okMerges++;
      assert.equal(slots(merged), slots(cleanMerge), `mutation ${i}: an ok merge with other ranks at other positions`);
    }
  }
  assert.ok(failed > 50, `only ${failed} of 400 damaged record sets were refused`);
  // Both properties were put to the test, not skipped by every mutation.
  assert.ok(lostOrExtra > 20, `only ${lostOrExtra} unbalanced record sets merged`);
  assert.ok(okMerges > 20, `only ${okMerges} damaged record sets merged ok`);
});

test('rank: clear one-line errors for a world size that is not the case\'s ep, a missing RANK, a bad exchange, NCCL without a GPU', async () => {
  const golden = join(goldenDir, 'ep2_relu_top1_skew.safetensors');
  const placement = /^(RANK|WORLD_SIZE|LOCAL_RANK|SLURM_\w+)$/;
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !placement.test(k)));
  const one = (args: string[], env: Record<string, string>) => runCli(['rank', ...args], { env: { ...clean, ...env }, timeoutMs: 30_000 });
  const cases: [string[], Record<string, string>, RegExp][] = [
    [['--case', golden, '--out-dir', '/tmp/never'], { RANK: '0', WORLD_SIZE: '3' }, /the case has ep=2 but WORLD_SIZE is 3/],
    [['--case', golden, '--out-dir', '/tmp/never'], { WORLD_SIZE: '2' }, /RANK or SLURM_PROCID must be set/],
    [['--case', golden, '--out-dir', '/tmp/never', '--exchange', 'pigeon'], { RANK: '0', WORLD_SIZE: '2' }, /--exchange must be tcp or nccl/],
    [['--case', golden, '--out-dir', '/tmp/never', '--variant', 'nope'], { RANK: '0', WORLD_SIZE: '2' }, /--variant must be one of seed/],
  ];
  for (const [args, env, pattern] of cases) {
    const r = await one(args, env);
    assert.is(r.code, 1, r.stderr);
    assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, pattern);
  }
});

test.run();
