// The MessagePort mesh and its communicators, driven in one thread: uneven all-to-alls,
// ring-style collectives built on them, and the reuse of result and message buffers.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { communicators } from '../machines/ledger.js';
import { MeshCommunicator, PortMesh } from '../actors/transport.js';
import { Tensor } from '../src/tensor.js';

/** n ranks of one ep group, each with its mesh and communicator, wired by MessageChannels. */
function group(n: number, onError: (m: string) => void = (m) => assert.unreachable(m)) {
  const spec = communicators({ ep: n, dp: 1 })[0]!;
  const ports: Map<number, MessagePort>[] = Array.from({ length: n }, () => new Map());
  for (let a = 0; a < n; a++) {
    for (let b = a + 1; b < n; b++) {
      const { port1, port2 } = new MessageChannel();
      ports[a]!.set(b, port1);
      ports[b]!.set(a, port2);
    }
  }
  const comms = ports.map((p, r) => new MeshCommunicator(spec, r, new PortMesh(r, p, [spec], onError)));
  const close = () => ports.forEach((p) => p.forEach((port) => port.close()));
  return { comms, close };
}

const tag = { op: 'fwd.dispatch' as const, layer: 0, microBatch: 0 };

test('uneven all-to-all: rows arrive grouped by source rank, in order, empty splits included', async () => {
  const { comms, close } = group(3);
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

test('i64 tensors, reduce-scatter, all-gather, all-reduce and barrier', async () => {
  const { comms, close } = group(2);
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

test('a released result backs the next one; foreign tensors are ignored', async () => {
  const { comms, close } = group(2);
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

test('a row count that disagrees with the expected split is reported and the collective waits', async () => {
  const errors: string[] = [];
  const { comms, close } = group(2, (m) => errors.push(m));
  const a = comms[0]!.allToAll(tag, Tensor.zeros('f32', [3, 2]), [1, 2], [1, 1]);
  const b = comms[1]!.allToAll(tag, Tensor.zeros('f32', [2, 2]), [1, 1], [1, 1]); // expects 1 row from rank 0, gets 2
  await a;
  const settled = await Promise.race([b.then(() => 'resolved'), new Promise((r) => setTimeout(() => r('waiting'), 100))]);
  assert.is(settled, 'waiting');
  assert.match(errors.join('\n'), /rank 0 sent 2 rows of f32 × 2, rank 1 expected 1 rows/);
  close();
});

test.run();
