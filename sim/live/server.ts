// The live view of an actors run: a small HTTP server on 127.0.0.1 that serves one page and
// streams, over Server-Sent Events, each rank's current state, last event and collective
// count as the rank machines' inspection events arrive, then the verdict. Inspection events
// only update a per-rank summary; summaries of the ranks that changed go out at most every
// FLUSH_MS, so a fast run is not slowed by the view, and a page that connects late is sent
// every rank's latest summary (and the verdict, once there is one) before anything else.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Diagnosis } from '../../machines/diagnosis.js';
import { type Scenario } from '../../machines/scenario.js';
import { worldSize } from '../../machines/mesh.js';
import { livePage } from './page.js';

/** What the page shows for one rank. */
export interface RankView {
  readonly rank: number;
  /** Dotted state path of the rank machine's latest snapshot ('' before the first). */
  state: string;
  /** The last event the rank machine received, with the op for a collective. */
  event: string;
  /** collective.done events received: collectives the rank completed. */
  collectives: number;
  /** Inspection events seen for the rank. */
  events: number;
}

export interface LiveServer {
  /** http://127.0.0.1:PORT/ */
  readonly url: string;
  /** For RuntimeOptions.onInspect: constant work per event; pages see it at the next flush. */
  readonly onInspect: (rank: number, event: unknown) => void;
  /** Flush what is pending, then send the verdict to every page, now and to pages that connect later. */
  verdict(d: Diagnosis): void;
  /** End every page's stream and stop listening. */
  close(): Promise<void>;
}

const FLUSH_MS = 50;

/** The parts of actors/rankDriver.ts's inspection JSON the view reads. */
interface Inspection {
  type?: string;
  event?: { type?: string; op?: string };
  value?: unknown;
}

/** `{backward: 'dispatch'}` → `backward.dispatch`. */
function valuePath(value: unknown): string {
  const parts: string[] = [];
  let v = value;
  while (v && typeof v === 'object') {
    const entry = Object.entries(v as Record<string, unknown>)[0];
    if (!entry) break;
    parts.push(entry[0]);
    v = entry[1];
  }
  if (typeof v === 'string') parts.push(v);
  return parts.join('.');
}

const sse = (name: string, data: unknown) => `event: ${name}\ndata: ${JSON.stringify(data)}\n\n`;

export async function startLive(scenario: Scenario, port: number): Promise<LiveServer> {
  const views: RankView[] = Array.from({ length: worldSize(scenario) }, (_, rank) => ({ rank, state: '', event: '', collectives: 0, events: 0 }));
  const dirty = new Set<number>();
  const pages = new Set<ServerResponse>();
  const page = livePage(scenario);
  let verdictMessage: string | null = null;
  let timer: NodeJS.Timeout | undefined;

  const flush = () => {
    timer = undefined;
    if (dirty.size === 0) return;
    const message = sse('ranks', [...dirty].map((r) => views[r]));
    dirty.clear();
    for (const res of pages) res.write(message);
  };

  const onInspect = (rank: number, event: unknown) => {
    const view = views[rank];
    if (!view) return;
    const e = event as Inspection;
    view.events++;
    if (e.type === '@xstate.event' && e.event?.type) {
      view.event = e.event.op ? `${e.event.type} ${e.event.op}` : e.event.type;
      if (e.event.type === 'collective.done') view.collectives++;
    } else if (e.type === '@xstate.snapshot') {
      view.state = valuePath(e.value);
    }
    dirty.add(rank);
    timer ??= setTimeout(flush, FLUSH_MS);
  };

  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const { port: own } = server.address() as AddressInfo;
    // Only this machine's names for the server: a page elsewhere that rebinds a DNS name to
    // 127.0.0.1 gets nothing.
    if (req.headers.host !== `127.0.0.1:${own}` && req.headers.host !== `localhost:${own}`) {
      res.writeHead(403).end();
      return;
    }
    if (req.method !== 'GET') {
      res.writeHead(405, { Allow: 'GET' }).end();
      return;
    }
    if (req.url === '/') {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' }).end(page);
      return;
    }
    if (req.url === '/events') {
      res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store', Connection: 'keep-alive' });
      res.write(sse('ranks', views) + (verdictMessage ?? ''));
      pages.add(res);
      res.on('close', () => pages.delete(res));
      return;
    }
    res.writeHead(404).end();
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/`;

  return {
    url,
    onInspect,
    verdict(d) {
      clearTimeout(timer);
      flush();
      verdictMessage = sse('verdict', d);
      for (const res of pages) res.write(verdictMessage);
    },
    close() {
      clearTimeout(timer);
      for (const res of pages) res.end();
      return new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}

/** Resolves on Ctrl-C (or SIGTERM), which then no longer kill the process by themselves. */
export function untilInterrupted(): Promise<void> {
  return new Promise((resolve) => {
    const stop = () => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}
