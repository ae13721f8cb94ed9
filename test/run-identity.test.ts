// Only the job's own ranks get in: the run identity every launched-rank connection opens
// with, the optional HMAC over it, and what strangers, other jobs' ranks, wrong secrets,
// replayed hellos and random bytes meet, on loopback, while the run goes on.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { helloAsDialer, helloAsListener, readLine, RefusedConnection, runIdentity, type Hello, type Side } from '../actors/runIdentity.js';
import { acceptEarly, socketMesh } from '../actors/socketPort.js';
import { freePort } from '../actors/rendezvous.js';
import { launchLocally, type CliRun } from '../cli/localRanks.js';
import type { RankRecord } from '../actors/rankRecord.js';
import { readSafetensorsFile } from '../src/codec/safetensors.js';
import { relativeError } from '../src/tensor.js';
import { UsageError } from '../src/errors.js';
import { seededRng } from '../src/moe/random.js';
import { goldenDir } from './paths.js';
import { within } from './within.js';

const golden = join(goldenDir, 'ep2_relu_top1_skew.safetensors');

test('the run id: --run-id, else TORCHELASTIC_RUN_ID, else SLURM_JOB_ID.SLURM_STEP_ID, else rank 0 makes it up; the secret from --secret-file or EP_ACTORS_SECRET', () => {
  const env = { TORCHELASTIC_RUN_ID: 'te-1', SLURM_JOB_ID: '77', SLURM_STEP_ID: '3' };
  assert.equal(runIdentity({ runId: 'mine' }, env), { runId: 'mine', source: '--run-id', secret: null });
  assert.equal(runIdentity({}, env).runId, 'te-1');
  assert.equal(runIdentity({}, { SLURM_JOB_ID: '77', SLURM_STEP_ID: '3' }).runId, 'slurm-77.3');
  assert.equal(runIdentity({}, { ...env, TORCHELASTIC_RUN_ID: 'none' }).runId, 'slurm-77.3', "torchrun's default id names no job");
  assert.equal(runIdentity({}, {}), { runId: null, source: 'rank 0', secret: null });
  assert.equal(runIdentity({}, { EP_ACTORS_SECRET: 'swordfish' }).secret, Buffer.from('swordfish'));
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-id-'));
  try {
    writeFileSync(join(dir, 'secret'), 'from-a-file\n');
    assert.equal(runIdentity({ secretFile: join(dir, 'secret') }, { EP_ACTORS_SECRET: 'env' }).secret, Buffer.from('from-a-file'), 'the file wins; its trailing newline is not part of it');
    writeFileSync(join(dir, 'empty'), '\n');
    assert.throws(() => runIdentity({ secretFile: join(dir, 'empty') }), /the secret from --secret-file is empty/);
    assert.throws(() => runIdentity({ secretFile: join(dir, 'absent') }), /--secret-file: cannot read/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.throws(() => runIdentity({ runId: 'has space' }), (e: Error) => e instanceof UsageError && /the run id from --run-id must be/.test(e.message));
});

/** A listener on loopback that runs `onSocket` for each connection. */
async function listen(onSocket: (sock: Socket) => void): Promise<{ server: Server; port: number }> {
  const server = createServer(onSocket);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { server, port: (server.address() as AddressInfo).port };
}

const dial = (port: number) =>
  new Promise<Socket>((resolve, reject) => {
    const sock = connect(port, '127.0.0.1', () => resolve(sock));
    sock.once('error', reject);
  });

const side = (me: Hello, secret: string | null): Side => ({ me, secret: secret === null ? null : Buffer.from(secret), timeoutMs: 3000 });

test('the hello: ranks of one run get in (with or without a shared secret); a mismatch is one line on both sides naming both identities', async () => {
  const cases: { listener: [string | null, number, string | null]; dialer: [string | null, number, string | null]; refused: RegExp | null }[] = [
    { listener: ['job-a', 2, null], dialer: ['job-a', 2, null], refused: null },
    { listener: ['job-a', 2, 'k'], dialer: ['job-a', 2, 'k'], refused: null },
    { listener: ['job-a', 2, null], dialer: [null, 2, null], refused: null }, // a rank that learns the run id from rank 0
    { listener: ['job-a', 2, null], dialer: ['job-b', 2, null], refused: /the run ids differ/ },
    { listener: ['job-a', 2, null], dialer: ['job-a', 4, null], refused: /the world sizes differ/ },
    { listener: ['job-a', 2, 'k'], dialer: ['job-a', 2, 'other'], refused: /its MAC does not match/ },
    { listener: ['job-a', 2, 'k'], dialer: ['job-a', 2, null], refused: /carries no MAC and this rank requires one/ },
    { listener: ['job-a', 2, null], dialer: ['job-a', 2, 'k'], refused: /carries a MAC and this rank has no secret/ },
  ];
  for (const c of cases) {
    const what = JSON.stringify(c);
    let heard!: Promise<{ peer: Hello } | Error>;
    const { server, port } = await listen((sock) => {
      heard = helloAsListener(sock, side({ run: c.listener[0], rank: 0, world: c.listener[1] }, c.listener[2]), () => null).catch((e: Error) => e);
    });
    try {
      const sock = await dial(port);
      const mine = await within(5000, what, helloAsDialer(sock, side({ run: c.dialer[0], rank: 1, world: c.dialer[1] }, c.dialer[2]), () => null).catch((e: Error) => e));
      const theirs = await within(5000, what, heard);
      sock.destroy();
      if (c.refused === null) {
        assert.equal((mine as { peer: Hello }).peer, { run: 'job-a', rank: 0, world: c.listener[1] }, what);
        assert.equal((theirs as { peer: Hello }).peer, { run: c.dialer[0] ?? 'job-a', rank: 1, world: c.dialer[1] }, what);
        continue;
      }
      for (const end of [mine, theirs]) {
        assert.instance(end, RefusedConnection, what);
        const line = (end as RefusedConnection).line;
        assert.match(line, c.refused, what);
        assert.not.match(line, /\n/);
        // Both identities are named, whichever side refused.
        assert.match(line, `rank 0 of ${c.listener[1]} in run 'job-a'`, what);
        assert.match(line, `rank 1 of ${c.dialer[1]} in run ${c.dialer[0] === null ? '' : `'${c.dialer[0]}'`}`, what);
      }
      assert.is((mine as RefusedConnection).line, (theirs as RefusedConnection).line, 'the same line on both sides');
    } finally {
      server.close();
    }
  }
});

/**
 * A connection to `port` that reads the listener's hello, sends what `say` makes of it,
 * and returns everything the listener sent after its hello until it closed.
 */
async function stranger(port: number, say: (challenge: Record<string, unknown>) => string | Buffer): Promise<string> {
  const sock = await dial(port);
  try {
    const { value, rest } = await readLine(sock, { timeoutMs: 5000, max: 4096 });
    sock.write(say(value as Record<string, unknown>));
    let answer = rest.toString();
    await within(5000, 'the listener closes', new Promise<void>((resolve) => {
      sock.on('data', (d) => (answer += d));
      sock.on('close', () => resolve());
    }));
    return answer;
  } finally {
    sock.destroy();
  }
}

/** Waits until something listens on `port` (a rank 0 still starting refuses connections). */
async function listening(port: number): Promise<void> {
  for (let i = 0; i < 150; i++) {
    const up = await new Promise<boolean>((resolve) => {
      const probe = connect(port, '127.0.0.1', () => {
        probe.destroy();
        resolve(true);
      });
      probe.once('error', () => resolve(false));
    });
    if (up) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`nothing listens on ${port}`);
}

test('strangers at the rendezvous (another run, a wrong or missing MAC, a replayed hello, random bytes, a silent probe) are refused; the run completes with the right results and rank 0 names each in its record', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ep-actors-id-'));
  try {
    const port = await freePort();
    const env = { ...process.env, EP_ACTORS_SECRET: 'job-a-secret' };
    const args = ['--case', golden, '--out-dir', dir, '--run-id', 'job-a', '--timeout', '30000'];
    const rank0 = launchLocally(2, args, { env, port, ranks: [0], timeoutMs: 60_000 });
    await listening(port); // the probe is the first refused connection: it closed before its hello

    // A hello that was good once: a real rank's, made for another listener's nonce.
    let captured = '';
    const { server, port: trap } = await listen((sock) => {
      void readLine(sock, { timeoutMs: 5000, max: 4096 }).then(({ value }) => {
        captured = `${JSON.stringify(value)}\n`;
        sock.destroy();
      });
      sock.write(`${JSON.stringify({ protocol: 'ep-actors/1', run: 'job-a', rank: 0, world: 2, nonce: 'an-old-nonce' })}\n`);
    });
    await helloAsDialer(await dial(trap), side({ run: 'job-a', rank: 1, world: 2 }, 'job-a-secret'), () => null).catch(() => {});
    server.close();
    assert.match(captured, /"mac":/);

    const rng = seededRng(5);
    const answers = {
      otherRun: await within(10_000, 'another run', helloAsDialer(await dial(port), side({ run: 'job-b', rank: 1, world: 2 }, 'job-a-secret'), () => null).catch((e: Error) => e)),
      wrongMac: await within(10_000, 'a wrong MAC', helloAsDialer(await dial(port), side({ run: 'job-a', rank: 1, world: 2 }, 'guess'), () => null).catch((e: Error) => e)),
      noMac: await within(10_000, 'no MAC', helloAsDialer(await dial(port), side({ run: 'job-a', rank: 1, world: 2 }, null), () => null).catch((e: Error) => e)),
      replayed: await stranger(port, () => captured),
      random: await stranger(port, () => Buffer.from(Array.from({ length: 300 }, () => Math.floor(rng() * 256)).concat(10))),
    };
    for (const [name, pattern] of [['otherRun', /the run ids differ/], ['wrongMac', /its MAC does not match/], ['noMac', /carries no MAC/]] as const) {
      assert.instance(answers[name], RefusedConnection, name);
      assert.match((answers[name] as RefusedConnection).line, pattern, name);
    }
    assert.match(answers.replayed, /"refused":".*its MAC does not match \(another secret, or a replayed hello\)/);
    assert.match(answers.random, /"refused":".*not an ep-actors hello/);

    // Only now does the real rank 1 start: the run was not disturbed.
    const [r1] = await launchLocally(2, args, { env, port, ranks: [1], timeoutMs: 60_000 });
    const [r0] = await rank0;
    for (const r of [r0!, r1!] as CliRun[]) assert.is(r.code, 0, r.stderr);
    const want = await readSafetensorsFile(golden);
    for (const rank of [0, 1]) {
      const got = await readSafetensorsFile(join(dir, `rank${rank}.safetensors`));
      for (const key of [`rank${rank}.out`, `rank${rank}.grad_x`]) assert.ok(relativeError(got.tensors.get(key)!, want.tensors.get(`expected.${key}`)!) <= 1e-5, key);
    }
    const record = JSON.parse(readFileSync(join(dir, 'rank0.record.json'), 'utf8')) as RankRecord;
    const lines = (record.refused ?? []).map((r) => r.line);
    // In the order rank 0 finished with them, which the load on the machine may shuffle.
    const kind = (line: string) =>
      /closed before a message arrived|ECONNRESET/.test(line) ? 'probe'
      : /the run ids differ/.test(line) ? 'other run'
      : /MAC does not match \(another secret, or a replayed hello\)/.test(line) ? 'wrong MAC or replayed'
      : /carries no MAC/.test(line) ? 'no MAC'
      : /not an ep-actors hello/.test(line) ? 'random bytes'
      : line;
    assert.equal(lines.map(kind).sort(), ['no MAC', 'other run', 'probe', 'random bytes', 'wrong MAC or replayed', 'wrong MAC or replayed'], lines.join('\n'));
    assert.ok(record.refused!.every((r) => /^127\.0\.0\.1:\d+$/.test(r.from) && r.at > 0), JSON.stringify(record.refused));
    // Each refusal is one line on rank 0's stderr too.
    for (const line of lines) assert.ok(r0!.stderr.includes(`ep-actors rank 0: ${line}\n`), line);
    assert.match(r1!.stderr, /connected to its 1 peer in run 'job-a'/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('data connections: a stranger dialling a rank\'s data port is refused and the mesh still forms', async () => {
  const servers = [0, 1].map(() => createServer());
  const early = servers.map(acceptEarly);
  await Promise.all(servers.map((s) => new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()))));
  const peers = servers.map((s) => ({ host: '127.0.0.1', port: (s.address() as AddressInfo).port }));
  // Before the ranks even have their table: another run's rank 1, and random bytes.
  const strangers = [
    helloAsDialer(await dial(peers[0]!.port), side({ run: 'job-b', rank: 1, world: 2 }, null), () => null).catch((e: Error) => e),
    stranger(peers[0]!.port, () => 'GET / HTTP/1.1\r\n\r\n'),
  ];
  const refused: string[] = [];
  const events = { broken: () => {}, finished: () => {}, refused: (r: RefusedConnection) => refused.push(r.line) };
  const meshes = await within(10_000, 'the mesh', Promise.all([0, 1].map((rank) => socketMesh({ run: 'job-a', rank, world: 2 }, null, peers, early[rank]!, events, 5000))));
  const [other, junk] = await Promise.all(strangers);
  assert.match((other as RefusedConnection).line, /the run ids differ/);
  assert.match(junk as string, /not an ep-actors hello/);
  assert.is(refused.length, 2, refused.join('\n'));
  // The mesh carries frames between the two real ranks.
  const got = new Promise<unknown>((r) => meshes[1]!.get(0)!.on('message', r));
  meshes[0]!.get(1)!.postMessage(Uint8Array.of(1, 2, 3));
  assert.equal(Array.from((await within(5000, 'a frame', got)) as Uint8Array), [1, 2, 3]);
  await Promise.all(meshes.flatMap((m) => [...m.values()].map((p) => p.goodbye({ issued: {} }))));
  assert.ok(servers.every((s) => !s.listening), 'a formed mesh stops accepting');
});

test('two jobs with different run ids on one port at once never exchange a frame: each completes with the right results or reports the collision', async () => {
  const port = await freePort();
  const dirs = ['job-a', 'job-b'].map(() => mkdtempSync(join(tmpdir(), 'ep-actors-id-')));
  try {
    const jobs = await Promise.all(['job-a', 'job-b'].map((id, j) => launchLocally(2, ['--case', golden, '--out-dir', dirs[j]!, '--run-id', id, '--timeout', '8000'], { port, timeoutMs: 60_000 })));
    const want = await readSafetensorsFile(golden);
    let completed = 0;
    for (const [j, runs] of jobs.entries()) {
      if (runs.every((r) => r.code === 0)) {
        completed++;
        for (const rank of [0, 1]) {
          const got = await readSafetensorsFile(join(dirs[j]!, `rank${rank}.safetensors`));
          assert.ok(relativeError(got.tensors.get(`rank${rank}.out`)!, want.tensors.get(`expected.rank${rank}.out`)!) <= 1e-5);
        }
        continue;
      }
      runs.forEach((r, rank) => assert.is(r.code, 1, `job ${j} rank ${rank}: ${r.stderr}`));
      assert.ok(runs.some((r) => /another process holds it|the run ids differ/.test(r.stderr)), runs.map((r) => r.stderr).join('\n'));
    }
    assert.ok(completed >= 1, 'the job that held the port first completes');
  } finally {
    dirs.forEach((d) => rmSync(d, { recursive: true, force: true }));
  }
});

test.run();
