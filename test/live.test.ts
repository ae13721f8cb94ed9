// The live view (`sim --live`): its server streams every rank's summary and the verdict
// over Server-Sent Events, a page that connects late gets the latest state first, the page
// names no other origin, and the server closes. In-process with runActors, and end to end
// through the CLI (kept alive until SIGINT, or closed by --live-exit).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { get, type IncomingMessage } from 'node:http';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runActors } from '../actors/supervisor.js';
import { validateScenario } from '../machines/scenario.js';
import { startLive, type RankView } from '../sim/live/server.js';
import { cliPath } from './paths.js';

const STARVE = { ep: 4, routing: 'starve:1', variant: 'no-dispatch-edge' } as const;
const STARVE_FLAGS = ['--ep', '4', '--routing', 'starve:1', '--variant', 'no-dispatch-edge'];

interface Message {
  name: string;
  data: any;
}

/** A Server-Sent Events subscription: every message so far, a wait for a condition, the end. */
interface Stream {
  readonly messages: Message[];
  /** Resolves once `ok(messages)` holds; rejects if the stream ends first. */
  until(ok: (ms: Message[]) => boolean): Promise<void>;
  readonly ended: Promise<void>;
}

// A fresh connection per request: a pooled socket the server has since closed reads as a reset.
function request(url: string, headers: Record<string, string> = {}): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => get(url, { headers, agent: false }, resolve).on('error', reject));
}

async function body(res: IncomingMessage): Promise<string> {
  let text = '';
  for await (const chunk of res) text += chunk;
  return text;
}

async function subscribe(url: string): Promise<Stream> {
  const res = await request(url);
  assert.is(res.statusCode, 200);
  assert.is(res.headers['content-type'], 'text/event-stream');
  const messages: Message[] = [];
  const waiters: { ok: (ms: Message[]) => boolean; resolve: () => void; reject: (e: Error) => void }[] = [];
  const check = () => {
    for (const w of [...waiters]) {
      if (w.ok(messages)) {
        waiters.splice(waiters.indexOf(w), 1);
        w.resolve();
      }
    }
  };
  let buffer = '';
  res.setEncoding('utf8');
  res.on('data', (chunk: string) => {
    buffer += chunk;
    for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const field = (name: string) => block.split('\n').find((l) => l.startsWith(`${name}: `))?.slice(name.length + 2);
      messages.push({ name: field('event') ?? 'message', data: JSON.parse(field('data') ?? 'null') });
    }
    check();
  });
  const ended = new Promise<void>((resolve) =>
    res.on('close', () => {
      for (const w of waiters.splice(0)) w.reject(new Error(`stream ended first; got ${JSON.stringify(messages.map((m) => m.name))}`));
      resolve();
    }),
  );
  return {
    messages,
    ended,
    until: (ok) =>
      new Promise((resolve, reject) => {
        waiters.push({ ok, resolve, reject });
        check();
      }),
  };
}

const hasVerdict = (ms: Message[]) => ms.some((m) => m.name === 'verdict');

/** Per rank, the last summary the stream carried. */
function latest(ms: Message[]): Map<number, RankView> {
  const out = new Map<number, RankView>();
  for (const m of ms) if (m.name === 'ranks') for (const v of m.data as RankView[]) out.set(v.rank, v);
  return out;
}

test('in process: summaries for every rank, then the verdict; a late page gets the latest state first; the server closes', async () => {
  const s = validateScenario(STARVE);
  const live = await startLive(s, 0);
  assert.match(live.url, /^http:\/\/127\.0\.0\.1:\d+\/$/);
  const early = await subscribe(`${live.url}events`);
  await early.until((ms) => ms.length > 0);
  assert.is(early.messages[0]!.name, 'ranks', 'a page is first sent every rank');
  assert.equal(
    (early.messages[0]!.data as RankView[]).map((v) => [v.rank, v.events]),
    [0, 1, 2, 3].map((r) => [r, 0]),
  );

  const sent = [0, 0, 0, 0];
  const r = await runActors(s, {
    onInspect: (rank, event) => {
      sent[rank]!++;
      live.onInspect(rank, event);
    },
  });
  live.verdict(r.diagnosis);
  await early.until(hasVerdict);

  const last = latest(early.messages);
  for (const rank of [0, 1, 2, 3]) {
    const v = last.get(rank)!;
    assert.ok(v.events > 0, `events reached the page for rank ${rank}`);
    assert.is(v.events, sent[rank], `every event of rank ${rank} is counted once the buffer is flushed`);
    assert.ok(v.state.length > 0 && v.event.length > 0, `rank ${rank} has a state and a last event`);
    assert.ok(v.collectives > 0, `rank ${rank} completed collectives`);
  }
  const verdicts = early.messages.filter((m) => m.name === 'verdict');
  assert.is(verdicts.length, 1);
  assert.is(early.messages[early.messages.length - 1]!.name, 'verdict', 'the verdict comes after every summary');
  assert.is(verdicts[0]!.data.verdict, 'missing');
  assert.equal(verdicts[0]!.data, JSON.parse(JSON.stringify(r.diagnosis)));

  const late = await subscribe(`${live.url}events`);
  await late.until(hasVerdict);
  assert.equal(
    late.messages.map((m) => m.name),
    ['ranks', 'verdict'],
  );
  assert.equal(late.messages[0]!.data, [0, 1, 2, 3].map((rank) => last.get(rank)));

  await live.close();
  await early.ended;
  await late.ended;
  try {
    await request(live.url);
    assert.unreachable('the server still answers after close');
  } catch (err) {
    assert.is((err as NodeJS.ErrnoException).code, 'ECONNREFUSED');
  }
});

test('the page: one row per rank, inline script and style, no other origin; unknown paths and foreign hosts refused', async () => {
  const s = validateScenario({ ...STARVE, ep: 8 });
  const live = await startLive(s, 0);
  try {
    const res = await request(live.url);
    assert.is(res.statusCode, 200);
    assert.match(String(res.headers['content-type']), /^text\/html/);
    const html = await body(res);
    for (let r = 0; r < 8; r++) assert.ok(html.includes(`<tr><th>${r}</th>`), `row for rank ${r}`);
    assert.not.ok(html.includes('<tr><th>8</th>'));
    const origins = [...html.matchAll(/https?:\/\/[^\s"'`<>)]*/g)].map((m) => m[0]);
    assert.ok(
      origins.every((u) => u.startsWith(live.url)),
      `external URLs: ${origins.join(', ')}`,
    );
    // Nothing to fetch: the only URL attributes are data: (the empty icon that keeps browsers off /favicon.ico).
    for (const [, url] of html.matchAll(/\b(?:src|href)="([^"]*)"/g)) assert.ok(url!.startsWith('data:'), url);
    assert.not.match(html, /@import|url\(/);
    assert.match(html, /new EventSource\('events'\)/);
    assert.match(html, /<h1>ep-actors live — ep=8, dp=1, no FSDP, 1 layer, 1 micro-batch, routing starve:1, variant no-dispatch-edge<\/h1>/, 'the title names the whole layout, as the report\'s');

    assert.is((await request(`${live.url}nope`)).statusCode, 404);
    assert.is((await request(live.url, { Host: 'attacker.example' })).statusCode, 403);
  } finally {
    await live.close();
  }
});

const CLI = cliPath;

/** Resolves with the first match of `pattern` in what the child has written to stderr. */
function stderrMatch(child: ReturnType<typeof spawn>, pattern: RegExp): Promise<RegExpMatchArray> {
  return new Promise((resolve, reject) => {
    let text = '';
    const onData = (chunk: Buffer) => {
      text += chunk;
      const m = pattern.exec(text);
      if (m) {
        child.stderr!.off('data', onData);
        resolve(m);
      }
    };
    child.stderr!.on('data', onData);
    child.once('exit', () => reject(new Error(`exited before printing ${pattern}: ${text}`)));
  });
}

test('cli: --live keeps the page after the verdict until SIGINT, and the run still exits 2', async () => {
  const child = spawn(process.execPath, [CLI, 'sim', ...STARVE_FLAGS, '--live', '--json'], { stdio: ['ignore', 'pipe', 'pipe'], timeout: 60_000 });
  let stdout = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const url = (await stderrMatch(child, /live view: (http:\/\/127\.0\.0\.1:\d+\/)\n/))[1]!;
  // Printed once the verdict is sent, right as the process starts waiting for Ctrl-C.
  await stderrMatch(child, /stays up at .* Ctrl-C to exit/);

  const stream = await subscribe(`${url}events`);
  await stream.until(hasVerdict);
  const last = latest(stream.messages);
  assert.equal([...last.keys()].sort(), [0, 1, 2, 3]);
  for (const v of last.values()) assert.ok(v.events > 0 && v.state.length > 0, `rank ${v.rank}: ${JSON.stringify(v)}`);
  const verdict = stream.messages.find((m) => m.name === 'verdict')!.data;
  assert.is(verdict.verdict, 'missing');

  child.kill('SIGINT');
  assert.is(await exited, 2);
  await stream.ended;
  assert.is(JSON.parse(stdout).verdict, verdict.verdict);
});

test('cli: --live 0 --live-exit closes after the verdict; --inspect still writes JSON Lines alongside', () => {
  const file = join(mkdtempSync(join(tmpdir(), 'ep-live-')), 'inspect.jsonl');
  const r = spawnSync(process.execPath, [CLI, 'sim', ...STARVE_FLAGS, '--live', '0', '--live-exit', '--inspect', file, '--json'], { encoding: 'utf8', timeout: 60_000 });
  assert.is(r.status, 2, r.stderr);
  assert.match(r.stderr, /live view: http:\/\/127\.0\.0\.1:\d+\//);
  assert.not.match(r.stderr, /Ctrl-C/);
  assert.is(JSON.parse(r.stdout).verdict, 'missing');
  const ranks = new Set(
    readFileSync(file, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l).rank),
  );
  assert.equal([...ranks].sort(), [0, 1, 2, 3]);
});

test('cli: bad --live usage exits 1 naming the problem', () => {
  const cases: [string[], RegExp][] = [
    [['--live-exit'], /--live-exit needs --live/],
    [['--live', '--engine', 'des'], /--live .*needs --engine actors/],
    [['--live', 'abc'], /--live must be an integer, got 'abc'/],
    [['--live', '70000'], /--live must be in \[0, 65535\]/],
  ];
  for (const [args, pattern] of cases) {
    const r = spawnSync(process.execPath, [CLI, 'sim', ...STARVE_FLAGS, ...args], { encoding: 'utf8', timeout: 60_000 });
    assert.is(r.status, 1, `${args.join(' ')}: ${r.stdout}`);
    assert.match(r.stderr, pattern);
  }
});

test.run();
