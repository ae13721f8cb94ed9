// The MessagePort mesh and its communicators, driven in one thread: uneven all-to-alls,
// ring-style collectives built on them, and the reuse of result and message buffers, for
// msgpack chunks over the ports and for the staged (shared-memory) exchange alike; then
// what a staged exchange does with announcements and acknowledgements it cannot trust; the
// fast lane's rings, and small and large chunks between two worker threads, where small
// ones take the lane, large ones are written straight into the receiver's result, and both
// keep their checks; the lane between launched ranks on one host (a segment every peer
// maps), alone and under two meshes over a real TCP connection.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MessageChannel, Worker, type MessagePort } from 'node:worker_threads';
import { communicators } from '../machines/mesh.js';
import { MeshCommunicator, PortMesh, type Chunk } from '../actors/transport.js';
import { encodeMessage } from '../src/codec/msgpack.js';
import { sharedMemory, type StagingMemory } from '../actors/staging.js';
import { Tensor } from '../src/tensor.js';
import { seededRng } from '../src/moe/random.js';
import { Inbox, Outbox, segmentsAvailable, type SegmentHello } from '../actors/lane.js';
import { SocketPort } from '../actors/socketPort.js';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';

/** n ranks of one ep group, each with its mesh and communicator, wired by MessageChannels. */
function group(n: number, staging: (() => StagingMemory) | null, onError: (m: string) => void = (m) => assert.unreachable(m)) {
  const spec = communicators({ ep: n, dp: 1 })[0]!;
  const ports: Map<number, MessagePort>[] = Array.from({ length: n }, () => new Map());
  for (let a = 0; a < n; a++) {
    for (let b = a + 1; b < n; b++) {
      const { port1, port2 } = new MessageChannel();
      ports[a]!.set(b, port1);
      ports[b]!.set(a, port2);
    }
  }
  const meshes = ports.map((p, r) => new PortMesh(r, p, [spec], onError));
  const comms = meshes.map((m, r) => new MeshCommunicator(spec, r, m, staging?.() ?? null));
  const close = () => ports.forEach((p) => p.forEach((port) => port.close()));
  return { comms, meshes, ports, close };
}

const tag = { op: 'fwd.dispatch' as const, layer: 0, microBatch: 0 };

for (const [exchange, memory] of [['ports', null], ['shared', sharedMemory]] as const) {
  test(`${exchange}: uneven all-to-all: rows arrive grouped by source rank, in order, empty splits included`, async () => {
    const { comms, close } = group(3, memory);
    // sends[r][j] rows from rank r to rank j; each row holds [r, j, k] for the k-th such row.
    const sends = [
      [1, 0, 2],
      [0, 0, 3],
      [2, 1, 0],
    ];
    const results = await Promise.all(
      comms.map((c, r) => {
        const rows = sends[r]!.flatMap((count, j) => Array.from({ length: count }, (_, k) => [r, j, k]));
        return c.allToAll(tag, Tensor.from('f32', [rows.length, 3], rows.flat()), sends[r]!, sends.map((s) => s[r]!));
      }),
    );
    results.forEach((t, j) => {
      const want = sends.flatMap((s, r) => Array.from({ length: s[j]! }, (_, k) => [r, j, k]));
      assert.equal(Array.from(t.data), want.flat(), `rank ${j}`);
    });
    close();
  });

  test(`${exchange}: i64 tensors, reduce-scatter, all-gather, all-reduce and barrier`, async () => {
    const { comms, close } = group(2, memory);
    const ids = await Promise.all(comms.map((c, r) => c.allToAll(tag, Tensor.from('i64', [2], [10 * r, 10 * r + 1]), [1, 1], [1, 1])));
    assert.equal(ids.map((t) => Array.from(t.data as BigInt64Array, Number)), [[0, 10], [1, 11]]);
    const sums = await Promise.all(comms.map((c, r) => c.reduceScatter(tag, Tensor.from('f32', [4], [1, 2, 3, 4].map((v) => v * (r + 1))))));
    assert.equal(sums.map((t) => Array.from(t.data)), [[3, 6], [9, 12]]);
    const gathered = await Promise.all(comms.map((c, r) => c.allGather(tag, Tensor.from('f32', [1, 2], [r, r]))));
    assert.equal(Array.from(gathered[1]!.data), [0, 0, 1, 1]);
    const reduced = await Promise.all(comms.map((c, r) => c.allReduce(tag, Tensor.from('f64', [3], [r, 1, -r]))));
    assert.equal(reduced.map((t) => Array.from(t.data)), [[1, 2, -1], [1, 2, -1]]);
    // A barrier completes only once both have entered it.
    let entered = 0;
    const first = comms[0]!.barrier({ ...tag, op: 'barrier' }).then(() => entered);
    await new Promise((r) => setTimeout(r, 20));
    entered = 1;
    await comms[1]!.barrier({ ...tag, op: 'barrier' });
    assert.is(await first, 1);
    close();
  });

  test(`${exchange}: a released result backs the next one; foreign tensors are ignored`, async () => {
    const { comms, close } = group(2, memory);
    const exchange = () => Promise.all(comms.map((c) => c.allToAll(tag, Tensor.zeros('f32', [4, 256]), [2, 2], [2, 2])));
    const first = await exchange();
    const buffers = first.map((t) => t.data.buffer);
    comms.forEach((c, r) => {
      c.release(first[r]!);
      c.release(Tensor.zeros('f32', [4, 256])); // not this communicator's: ignored
    });
    const second = await exchange();
    second.forEach((t, r) => assert.ok(t.data.buffer === buffers[r], `rank ${r} reused its released buffer`));
    const third = await exchange(); // nothing released since: fresh buffers
    third.forEach((t, r) => assert.ok(t.data.buffer !== second[r]!.data.buffer));
    close();
  });

  test(`${exchange}: a row count that disagrees with the expected split is reported and the collective waits`, async () => {
    const errors: string[] = [];
    const { comms, close } = group(2, memory, (m) => errors.push(m));
    const a = comms[0]!.allToAll(tag, Tensor.zeros('f32', [3, 2]), [1, 2], [1, 1]);
    const b = comms[1]!.allToAll(tag, Tensor.zeros('f32', [2, 2]), [1, 1], [1, 1]); // expects 1 row from rank 0, gets 2
    const within100ms = (p: Promise<unknown>) => Promise.race([p.then(() => 'resolved'), new Promise((r) => setTimeout(() => r('waiting'), 100))]);
    assert.is(await within100ms(a), 'resolved'); // rank 0 got what it expected
    assert.is(await within100ms(b), 'waiting');
    assert.match(errors.join('\n'), /rank 0 sent 2 rows of f32 × 2, rank 1 expected 1 rows/);
    close();
  });
}

test('shared: staged regions are reused once every peer has acknowledged them (two per rank at most)', async () => {
  const regions: SharedArrayBuffer[][] = [];
  const recording = (): StagingMemory => {
    const m = sharedMemory();
    const mine: SharedArrayBuffer[] = [];
    regions.push(mine);
    return { ...m, stage: (b) => { const h = m.stage(b) as SharedArrayBuffer; mine.push(h); return h; } };
  };
  const { comms, close } = group(3, recording);
  for (let i = 0; i < 6; i++) await Promise.all(comms.map((c) => c.allToAll(tag, Tensor.zeros('f32', [3, 64]), [1, 1, 1], [1, 1, 1])));
  // A peer acknowledges exchange i before it announces exchange i + 1 on the same port, so a
  // rank's region from exchange i is free again by the time it stages exchange i + 2.
  regions.forEach((mine, r) => {
    assert.is(mine.length, 6);
    assert.ok(new Set(mine).size <= 2, `rank ${r} staged into ${new Set(mine).size} regions`);
  });
  close();
});

/** Waits until messages posted so far have been delivered. */
const drained = () => new Promise((r) => setTimeout(r, 20));

test('staged announcements and invitations that cannot be trusted are reported one error each, never thrown, never delivered', async () => {
  const errors: string[] = [];
  const { comms, ports, close } = group(2, sharedMemory, (m) => errors.push(m));
  const fromRank1 = ports[1]!.get(0)!; // what rank 1 posts, rank 0's mesh receives
  const valid = () => ({ comm: 'ep', position: 0, op: 'fwd.dispatch', from: 1, staged: { handle: new SharedArrayBuffer(64), offset: 0, rows: 2, rowSize: 4, dtype: 'f32' } });
  const bad: Record<string, unknown[]> = {
    comm: [undefined, 5, 'ep-bogus', null],
    position: [0.5, '0', Number.NaN, undefined, 2 ** 60, -1],
    op: [undefined, 7, null],
    from: [0, 2, '1', undefined],
    staged: [null, 5, 'x', {}, { handle: 5, offset: 0, rows: 0, rowSize: 0, dtype: 'f32' }],
    'staged.offset': [-4, 1.5, '0', 64],
    'staged.rows': [-1, 2.5, null, 1e9],
    'staged.rowSize': [-2, undefined],
    'staged.dtype': ['f8', 3, undefined],
  };
  const rng = seededRng(7);
  const keys = Object.keys(bad);
  let posted = 0;
  for (let i = 0; i < 300; i++) {
    const m = valid() as Record<string, unknown> & { staged: Record<string, unknown> };
    const key = keys[Math.floor(rng() * keys.length)]!;
    const values = bad[key]!;
    const value = values[Math.floor(rng() * values.length)];
    if (key.startsWith('staged.')) m.staged[key.slice(7)] = value;
    else m[key] = value;
    fromRank1.postMessage(m);
    posted++;
  }
  const invitation = { invite: 'ep', position: 0, op: 'fwd.dispatch', from: 1, into: { handle: new SharedArrayBuffer(64), offset: 0, rows: 2, rowSize: 4, dtype: 'f32' } };
  const badInvitations = [{ ...invitation, invite: 5 }, { ...invitation, invite: 'ep-bogus' }, { ...invitation, from: 0 }, { ...invitation, into: { ...invitation.into, rows: 9 } }, { ...invitation, into: { ...invitation.into, handle: 7n } }, { decline: 'ep', position: 'x' }];
  for (const garbage of [null, 42, 'bytes', [1, 2], { ack: 'ep', position: 9 }, new Uint8Array([0xc1]), { staged: true }, ...badInvitations]) {
    fromRank1.postMessage(garbage);
    posted++;
  }
  await drained();
  assert.is(errors.length, posted, errors.slice(0, 5).join('\n'));
  assert.ok(errors.some((e) => /past its 64-byte region/.test(e)));
  assert.ok(errors.some((e) => /never staged/.test(e)));
  assert.ok(errors.some((e) => /an invitation to write whose rows end at byte 144, past its 64-byte region/.test(e)), errors.filter((e) => /invitation/.test(e)).join('\n'));
  // Nothing was delivered: a real exchange at position 0 still works.
  const done = await Promise.all(comms.map((c) => c.allToAll(tag, Tensor.zeros('f32', [2, 4]), [1, 1], [1, 1])));
  assert.equal(done.map((t) => t.shape), [[2, 4], [2, 4]]);
  close();
});

test('a staged chunk whose region this exchange cannot read is reported and the collective waits', async () => {
  const errors: string[] = [];
  const { comms, ports, close } = group(2, sharedMemory, (m) => errors.push(m));
  // Rank 1 announces a device pointer, which host shared memory cannot read.
  ports[1]!.get(0)!.postMessage({ comm: 'ep', position: 0, op: 'fwd.dispatch', from: 1, staged: { handle: 0x7f00n, offset: 0, rows: 1, rowSize: 4, dtype: 'f32' } });
  const a = comms[0]!.allToAll(tag, Tensor.zeros('f32', [2, 4]), [1, 1], [1, 1]);
  const settled = await Promise.race([a.then(() => 'resolved'), new Promise((r) => setTimeout(() => r('waiting'), 100))]);
  assert.is(settled, 'waiting');
  assert.match(errors.join('\n'), /rank 1 staged its rows in memory that rank 0's shared exchange cannot read/);
  close();
});

test('fast lane: messages arrive in order per peer, as views of their slots; full rings and oversized messages are refused; bad offers are rejected', () => {
  const inbox = new Inbox([3, 5]);
  const to = (peer: number) => Outbox.of(inbox.hello(peer, 0))!;
  const from3 = to(3);
  const from5 = to(5);
  const got: [number, number[]][] = [];
  const drain = () => inbox.drain((peer, bytes) => got.push([peer, Array.from(bytes)]));
  // Ten messages through a ring of four slots: the writer is refused until the reader drains.
  let refused = 0;
  for (let i = 0; i < 10; i++) {
    while (!from3.write(Uint8Array.of(i, i + 1))) {
      refused++;
      drain();
    }
  }
  assert.ok(from5.write(Uint8Array.of(99)));
  drain();
  assert.ok(refused >= 2, `refused ${refused} times`);
  assert.equal(got.filter(([p]) => p === 3).map(([, b]) => b), Array.from({ length: 10 }, (_, i) => [i, i + 1]));
  assert.equal(got.filter(([p]) => p === 5), [[5, [99]]]);
  assert.not.ok(from3.write(new Uint8Array(from3.capacity + 1)), 'larger than a slot');
  // Nothing new: a wait times out and says so.
  assert.not.ok(inbox.waitSync(1, 1));
  assert.ok(from5.write(Uint8Array.of(1)));
  assert.ok(inbox.waitSync(1000, 1), 'a write before the wait is seen');
  for (const bad of [{ lane: new ArrayBuffer(8), rings: 2, ring: 0 }, { lane: inbox.memory, rings: 3, ring: 0 }, { lane: inbox.memory, rings: 2, ring: 2 }, { lane: inbox.memory, rings: 2, ring: -1 }, { lane: new SharedArrayBuffer(64), rings: 2, ring: 0 }]) {
    assert.is(Outbox.of(bad), null, JSON.stringify({ ...bad, lane: bad.lane.byteLength }));
  }
});

test('fast lane between processes: a peer maps the segment its hello names, EP-sized chunks fit, a listening owner is knocked once; any other offer is refused', () => {
  if (!segmentsAvailable()) return; // no addon, or not Linux: launched ranks keep to TCP
  const inbox = new Inbox([3, 5], 'processes');
  let knocks = 0;
  const hello = inbox.segmentHello(3);
  const from3 = Outbox.mapped(hello, () => knocks++)!;
  assert.ok(from3, 'the offer is mapped');
  assert.ok(from3.capacity >= 768 * 1024, `an EP step's chunk fits a slot (${from3.capacity} bytes)`);
  const big = new Uint8Array(600 * 1024).map((_, i) => i % 251);
  assert.ok(from3.write(big));
  assert.ok(from3.write(Uint8Array.of(7)));
  const got: [number, Uint8Array][] = [];
  inbox.drain((peer, bytes) => got.push([peer, bytes.slice()]));
  assert.equal(got.map(([p, b]) => [p, b.length]), [[3, big.length], [3, 1]]);
  assert.ok(Buffer.from(got[0]![1]).equals(Buffer.from(big)), 'the bytes are the ones written');
  assert.is(knocks, 0, 'nobody listens: no knock');
  // A listening owner is knocked by the first write only; it resolves once the knock arrives.
  let woke = false;
  const listening = inbox.waitAsync().then(() => (woke = true));
  assert.ok(from3.write(Uint8Array.of(1)));
  assert.ok(from3.write(Uint8Array.of(2)));
  assert.is(knocks, 1);
  inbox.knocked();
  // Sleeping in the shared futex: a write before the wait is seen at once.
  assert.ok(inbox.waitSync(1000, 1));
  const offers: [string, Partial<Record<keyof SegmentHello, unknown>>][] = [
    ['another host', { ...hello, host: 'elsewhere' }],
    ['another token', { ...hello, token: 'ab'.repeat(16) }],
    ['a short token', { ...hello, token: 'ab' }],
    ['a ring past the last', { ...hello, ring: 2 }],
    ['another ring count (the segment is another size)', { ...hello, rings: 3 }],
    ['a path that names nothing', { ...hello, segment: '/proc/self/fd/999999' }],
    ['no path', { ...hello, segment: 42 }],
  ];
  for (const [what, offer] of offers) assert.is(Outbox.mapped(offer, () => {}), null, what);
  // EP_ACTORS_SHM_DISABLE=1 keeps launched ranks to TCP: none offers its inbox, none maps a peer's.
  process.env.EP_ACTORS_SHM_DISABLE = '1';
  try {
    assert.not.ok(segmentsAvailable());
    assert.is(Outbox.mapped(hello, () => {}), null, 'a rank that keeps to TCP maps no offer');
  } finally {
    delete process.env.EP_ACTORS_SHM_DISABLE;
  }
  return listening.then(() => assert.ok(woke));
});

test('launched ranks on one host: after the offers cross their connection, a 256 KiB chunk each way takes the lane, not the socket', async () => {
  if (!segmentsAvailable()) return;
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const accepted = new Promise<Socket>((r) => server.once('connection', r));
  const a = connect((server.address() as AddressInfo).port, '127.0.0.1');
  const b = await accepted;
  let tcpBytes = 0;
  for (const s of [a, b]) s.on('data', (c: Buffer) => (tcpBytes += c.length));
  const broken: string[] = [];
  try {
    const spec = communicators({ ep: 2, dp: 1 })[0]!;
    const events = { broken: (r: string) => void broken.push(r), finished: () => {} };
    const meshes = [new SocketPort(a, events), new SocketPort(b, events)].map((port, r) => new PortMesh(r, new Map([[1 - r, port]]), [spec], (e) => assert.unreachable(e)));
    const comms = meshes.map((m, r) => new MeshCommunicator(spec, r, m, null));
    const rows = 512; // 512 × 128 f32 = 256 KiB to each peer
    const exchange = () =>
      Promise.all(comms.map((c, r) => c.allToAll(tag, Tensor.from('f32', [2 * rows, 128], Array.from({ length: 2 * rows * 128 }, (_, i) => r * 1e6 + i)), [rows, rows], [rows, rows])));
    await exchange(); // the offers may still be on their way: this one may go by TCP
    await new Promise((r) => setTimeout(r, 50));
    const before = tcpBytes;
    const results = await exchange();
    assert.ok(tcpBytes - before < 4096, `${tcpBytes - before} bytes crossed the socket for 512 KiB of chunks`);
    results.forEach((t, r) => {
      // Rank r's result: rank 0's rows for r first, then rank 1's.
      const firstOf = (from: number) => Array.from(t.data.subarray(from * rows * 128, from * rows * 128 + 4));
      const sent = (from: number) => Array.from({ length: 4 }, (_, i) => from * 1e6 + r * rows * 128 + i);
      assert.equal([firstOf(0), firstOf(1)], [sent(0), sent(1)], `rank ${r}`);
    });
    assert.equal(broken, []);
  } finally {
    a.destroy();
    b.destroy();
    server.close();
  }
});

/** Rank 0's mesh with rank 1 as a peer in another thread (its port a stub), and rank 1's way into rank 0's fast lane. */
function laneIntoRank0() {
  const spec = communicators({ ep: 2, dp: 1 })[0]!;
  const posted: unknown[] = [];
  const port = { postMessage: (m: unknown) => void posted.push(m), on: () => undefined, betweenThreads: true };
  const errors: string[] = [];
  const mesh = new PortMesh(0, new Map([[1, port]]), [spec], (e) => void errors.push(e));
  const lane = Outbox.of(posted[0] as { lane: unknown; rings: unknown; ring: unknown })!;
  const send = (position: number, value: number, op = 'fwd.counts') => assert.ok(lane.write(encodeMessage({ comm: spec.id, position, op, from: 1, tensor: Tensor.from('i64', [1, 2], [value, -value]) })));
  return { spec, mesh, errors, send, lane };
}

test('fast lane: a chunk taken from its slot keeps its values after the slot is reused', () => {
  const { spec, mesh, errors, send } = laneIntoRank0();
  const take = (position: number) => {
    const c = mesh.receive(1, spec.id, position, 'fwd.counts');
    assert.not.ok(c instanceof Promise, `position ${position} has arrived`);
    return (c as Chunk).rows as { tensor: Tensor<'i64'>; buffer: ArrayBuffer | null };
  };
  const kept = [];
  // Three rounds through the ring's four slots: each round's writes land where the last one's were.
  for (let round = 0; round < 3; round++) {
    for (let i = 0; i < 4; i++) send(4 * round + i, 100 * round + i);
    for (let i = 0; i < 4; i++) kept.push(take(4 * round + i));
  }
  assert.equal(errors, []);
  kept.forEach((rows, p) => {
    assert.is(rows.buffer, null, 'nothing goes back to the sender');
    assert.not.ok(rows.tensor.data.buffer instanceof SharedArrayBuffer, `position ${p}: copied out of the slot`);
    const v = 100 * Math.floor(p / 4) + (p % 4);
    assert.equal(Array.from(rows.tensor.data), [BigInt(v), BigInt(-v)], `position ${p}`);
  });
});

test('fast lane: malformed bytes, a foreign communicator, a stale and a duplicate position are each reported once, and the lane goes on', () => {
  const { spec, mesh, errors, send, lane } = laneIntoRank0();
  const poll = () => mesh.receive(1, spec.id, 99, 'fwd.counts'); // drains the lane; nothing comes for 99
  lane.write(Uint8Array.of(0xc1, 0xff, 0x00));
  void poll();
  assert.match(errors.join('\n'), /^rank 0 received from rank 1 a corrupt message: invalid message \(3 bytes\)/);
  lane.write(encodeMessage({ comm: 'dp-bogus', position: 0, op: 'fwd.counts', from: 1, tensor: Tensor.from('i64', [1], [1]) }));
  send(0, 7);
  send(1, 8);
  send(1, 9); // duplicate, not yet consumed
  void poll();
  assert.is(errors.length, 3, errors.join('\n'));
  assert.match(errors[1]!, /a chunk for communicator 'dp-bogus', which the two ranks do not share/);
  assert.match(errors[2]!, /stale chunk from rank 1: fwd.counts for ep position 1, which already has its chunk/);
  const first = mesh.receive(1, spec.id, 0, 'fwd.counts') as Chunk;
  assert.equal(Array.from((first.rows as { tensor: Tensor<'i64'> }).tensor.data), [7n, -7n]);
  void mesh.receive(1, spec.id, 1, 'fwd.counts');
  send(1, 10); // after position 1 completed
  void poll();
  assert.is(errors.length, 4);
  assert.match(errors[3]!, /stale chunk from rank 1: fwd.counts for ep position 1, which it already completed/);
});

/** Two ranks in two worker threads: `script` runs in each with `mesh`, `comm`, `rank`, `Tensor` in scope and posts its result. */
async function twoWorkerRanks(script: string, sharedResults = false): Promise<unknown[]> {
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    parentPort.once('message', async ({ port }) => {
      const { PortMesh, MeshCommunicator } = await import(workerData.transport);
      const { communicators } = await import(workerData.mesh);
      const { Tensor } = await import(workerData.tensor);
      const rank = workerData.rank;
      const spec = communicators({ ep: 2, dp: 1 })[0];
      const errors = [];
      const mesh = new PortMesh(rank, new Map([[1 - rank, port]]), [spec], (e) => { errors.push(e); parentPort.postMessage({ errors }); });
      const comm = new MeshCommunicator(spec, rank, mesh, null, workerData.sharedResults);
      ${script}
    });`;
  const url = (p: string) => new URL(p, import.meta.url).href;
  const { port1, port2 } = new MessageChannel();
  const workers = [port1, port2].map((port, rank) => {
    const w = new Worker(code, { eval: true, workerData: { rank, sharedResults, transport: url('../actors/transport.js'), mesh: url('../machines/mesh.js'), tensor: url('../src/tensor.js') } });
    w.postMessage({ port }, [port]);
    return w;
  });
  try {
    return await Promise.all(workers.map((w) => new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('worker rank did not answer in 20 s')), 20_000);
      w.once('message', (m) => (clearTimeout(timer), resolve(m)));
      w.once('error', reject);
    })));
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
  }
}

for (const sharedResults of [false, true]) {
  test(`worker ranks: small chunks take the fast lane, large ones ${sharedResults ? 'are written by their sender into the receiver\'s shared result' : 'go by the port'}, and both arrive intact`, async () => {
    const results = await twoWorkerRanks(`
      const peer = 1 - rank;
      const out = { lane: [], counts: [], rows: [] };
      for (let i = 0; i < 12; i++) {
        const tag = { op: 'fwd.counts', layer: 0, microBatch: 0 };
        const counts = await comm.allToAll(tag, Tensor.from('i64', [2], [100 * rank + i, 100 * rank + i + 50]), [1, 1], [1, 1]);
        out.counts.push(Array.from(counts.data, Number));
        const rows = 4096; // 64 KiB to the peer: more than a lane slot holds
        const x = Tensor.zeros('f32', [2 * rows, 4]);
        x.data.fill(rank + i);
        const got = await comm.allToAll({ ...tag, op: 'fwd.dispatch' }, x, [rows, rows], [rows, rows]);
        out.rows.push([got.data[0], got.data[got.data.length - 1], got.shape[0]]);
        out.lane.push([mesh.laneCarries(peer, 8), mesh.laneCarries(peer, 4 * rows * 4), mesh.directSend(peer, 4 * rows * 4), got.data.buffer instanceof SharedArrayBuffer]);
        comm.release(got); // the next exchanges reuse it, as peers write into it again
      }
      parentPort.postMessage(out);
    `, sharedResults);
    results.forEach((r, rank) => {
      const { lane, counts, rows } = r as { lane: boolean[][]; counts: number[][]; rows: number[][] };
      assert.equal(lane.at(-1), [true, false, true, sharedResults], `rank ${rank}: the lane carries the counts, not the rows`);
      counts.forEach((c, i) => assert.equal(c, [i + (rank === 0 ? 0 : 50), 100 + i + (rank === 0 ? 0 : 50)], `rank ${rank} exchange ${i}`));
      rows.forEach((x, i) => assert.equal(x, [i, 1 + i, 8192], `rank ${rank} exchange ${i}`));
    });
  });
}

test('worker ranks: written rows whose count or op disagrees are reported, never written, and the sender completes', async () => {
  const results = await twoWorkerRanks(`
    const rows = 4096; // 64 KiB: written into the receiver's result
    const send = (n, op) => comm.allToAll({ op, layer: 0, microBatch: 0 }, Tensor.zeros('f32', [rows + n, 4]), [rows, n], [rows, rows]);
    if (rank === 0) {
      // Twice the rows rank 1 expects: rank 1 reports it and waits; rank 0 completes and goes on.
      await send(2 * rows, 'fwd.dispatch');
      void send(rows, 'fwd.dispatch');
    } else {
      void send(rows, 'fwd.dispatch');
      void send(rows, 'fwd.combine'); // and the next position disagrees on the op
    }
  `, true);
  const [rank0, rank1] = (results as { errors: string[] }[]).map((r) => r.errors.join('\n'));
  assert.match(rank1!, /fwd.dispatch on ep position 0: rank 0 sent 8192 rows of f32 × 4, rank 1 expected 4096 rows/);
  // Rank 0 reached position 1 (its first exchange completed) and saw rank 1's header there.
  assert.match(rank0!, /rank 0 expected fwd.dispatch from rank 1 at ep position 1 but received fwd.combine/);
});

test('worker ranks: a chunk damaged on the fast lane is reported as through a port', async () => {
  const results = await twoWorkerRanks(`
    const tag = { op: 'fwd.counts', layer: 0, microBatch: 0 };
    const exchange = () => comm.allToAll(tag, Tensor.from('i64', [2], [1, 2]), [1, 1], [1, 1]);
    for (let i = 0; i < 3; i++) await exchange();
    if (rank === 1) {
      mesh.fault = { op: 'fwd.counts', kind: 'wrong-communicator' };
      await exchange().catch(() => {});
      parentPort.postMessage({ sent: true });
    } else {
      void exchange();
    }
  `);
  assert.equal(results[1], { sent: true });
  assert.match((results[0] as { errors: string[] }).errors.join('\n'), /rank 0 received from rank 1 a chunk for communicator 'ep-bogus'/);
});

test.run();
