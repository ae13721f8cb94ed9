import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { setup, type AnyStateNode } from 'xstate';
import { instance as graphviz } from '@viz-js/viz';
import { rankMachine } from '../machines/rankMachine.js';
import { makeVariant } from '../machines/variants.js';
import { liveUnder, machineGraph, rankContexts, toDot, toJson, toMermaid, toScxml, transitionLabel, type MachineGraph } from '../machines/exporters.js';
import { cliPath } from './paths.js';

const graph = machineGraph(rankMachine);
const cli = cliPath;

/** Every state id in the machine, read straight off xstate's tree, to hold the graph to. */
function allIds(node: AnyStateNode): string[] {
  return [node.id, ...Object.values(node.states).flatMap((c) => allIds(c as AnyStateNode))];
}

test('the graph holds every state of the machine, nested and final, with collective meta', () => {
  assert.equal(graph.states.map((s) => s.id).sort(), allIds(rankMachine.root).sort());
  const byPath = new Map(graph.states.map((s) => [s.path, s]));
  assert.is(byPath.get('forward')!.kind, 'compound');
  assert.is(byPath.get('forward')!.initial, 'rank.forward.route');
  for (const f of ['done', 'exited', 'aborted', 'failed']) assert.is(byPath.get(f)!.kind, 'final', f);
  assert.equal(byPath.get('forward.counts')!.meta, { collective: { op: 'fwd.counts', comm: 'ep', issuer: 'layer' } });
  assert.equal(byPath.get('backward.moeReduceScatter')!.meta, { collective: { op: 'fsdp.reduce_scatter', comm: 'dp', unit: 'moe', issuer: 'driver' } });
  assert.is(byPath.get('backward.dispatch')!.parent, 'rank.backward');
});

test('eventless transitions keep their guards and actions by name, in candidate order', () => {
  const choice = graph.transitions.filter((t) => t.source === 'rank.backward.dispatchChoice');
  assert.ok(choice.length >= 2);
  assert.ok(choice.every((t) => t.event === null));
  const keep = choice.find((t) => t.guard === 'keepsDispatchEdge')!;
  assert.equal(keep.targets, ['rank.backward.dispatch']);
  const dropped = choice.find((t) => t.actions.includes('noteDroppedDispatchEdge'))!;
  assert.is(dropped.guard, null);
  assert.ok(dropped.order > keep.order, 'the unguarded fallback comes after the guarded candidate');
  const root = graph.transitions.filter((t) => t.source === 'rank');
  assert.equal(root.map((t) => t.event).sort(), ['rank.failed', 'supervisor.abort']);
  assert.is(transitionLabel(keep), 'always [keepsDispatchEdge]');
});

test('the walk is generic: a small machine exports its own states and transitions', () => {
  const m = setup({ guards: { ready: () => true }, actions: { log: () => {} } }).createMachine({
    id: 'door',
    initial: 'closed',
    states: {
      closed: { on: { open: { target: 'opened', guard: 'ready', actions: 'log' } } },
      opened: { initial: 'wide', states: { wide: { always: { target: '#door.gone' } } } },
      gone: { type: 'final' },
    },
  });
  const g = machineGraph(m);
  assert.equal(g.states.map((s) => s.path), ['', 'closed', 'opened', 'opened.wide', 'gone']);
  assert.equal(
    g.transitions.map((t) => [t.source, t.event, t.guard, t.actions, t.targets]),
    [
      ['door.closed', 'open', 'ready', ['log'], ['door.opened']],
      ['door.opened.wide', null, null, [], ['door.gone']],
    ],
  );
});

test('under a variant, only the transitions its guards can take are live', () => {
  const dropped = (g: MachineGraph) => g.transitions.find((t) => t.actions.includes('noteDroppedDispatchEdge'))!;
  const seed = liveUnder(graph, rankMachine, rankContexts(makeVariant('seed')), 'seed');
  assert.is(dropped(seed).live, false, 'the seed always keeps the dispatch edge');
  const nde = liveUnder(graph, rankMachine, rankContexts(makeVariant('no-dispatch-edge')), 'no-dispatch-edge');
  assert.is(dropped(nde).live, true);
  const early = liveUnder(graph, rankMachine, rankContexts(makeVariant('early-exit')), 'early-exit');
  assert.is(early.transitions.find((t) => t.guard === 'stopsEarly')!.live, true);
  assert.is(seed.transitions.find((t) => t.guard === 'stopsEarly')!.live, false);
  assert.ok(seed.transitions.filter((t) => t.guard === null && t.event !== null).every((t) => t.live), 'unguarded event transitions are always live');
});

test('Mermaid names every state once by its path and keeps reused keys apart', () => {
  const text = toMermaid(graph);
  assert.ok(text.startsWith('stateDiagram-v2\n'));
  for (const s of graph.states.filter((s) => s.path)) {
    const id = s.path.replace(/\./g, '_');
    assert.ok(new RegExp(`state "${s.key}[^"]*" as ${id}\\b`).test(text), `state ${s.path}`);
  }
  assert.match(text, /forward_combine/);
  assert.match(text, /backward_combine/);
  assert.match(text, /backward_dispatchChoice --> backward_dispatch : always \[keepsDispatchEdge\]/);
  // Cross-block edges sit at the level of the innermost common state, never inside a block.
  assert.match(text, /\n {2}forward_layerDone --> backward : always/);
  assert.not.match(text, /:[^\n]*:/, 'no second colon inside a label');
});

test('Graphviz (compiled to WebAssembly) lays out the DOT export without a warning', async () => {
  const viz = await graphviz();
  // The check can fail: Graphviz refuses a broken graph, and says why.
  const broken = viz.render('digraph { a -> }');
  assert.is(broken.status, 'failure');
  assert.match(broken.errors.map((e) => e.message).join(' '), /syntax error/);
  for (const g of [graph, liveUnder(graph, rankMachine, rankContexts(makeVariant('no-dispatch-edge')), 'no-dispatch-edge')]) {
    const run = viz.render(toDot(g), { format: 'svg', engine: 'dot' });
    assert.equal(run.errors, [], 'Graphviz printed warnings');
    assert.is(run.status, 'success');
    for (const key of ['dispatchChoice', 'layerStart', 'expertIds', 'aborted']) assert.ok(run.output!.includes(`>${key}<`), key);
  }
});

/**
 * A small XML reader, enough to hold the SCXML to well-formedness (every tag closed in
 * order, attributes quoted, one root) and to return the elements for structural checks.
 */
function readXml(text: string): { name: string; attrs: Record<string, string>; parent: number }[] {
  const body = text.replace(/^<\?xml[^?]*\?>\s*/, '');
  const els: { name: string; attrs: Record<string, string>; parent: number }[] = [];
  const stack: number[] = [];
  const tag = /<(\/?)([A-Za-z_][\w.:-]*)((?:\s+[A-Za-z_][\w.:-]*="[^"<]*")*)\s*(\/?)>/y;
  let i = 0;
  let roots = 0;
  while (i < body.length) {
    if (/\s/.test(body[i]!)) {
      i++;
      continue;
    }
    tag.lastIndex = i;
    const m = tag.exec(body);
    if (!m) throw new Error(`not well-formed at offset ${i}: ${body.slice(i, i + 40)}`);
    const [, close, name, rawAttrs, selfClose] = m;
    if (close) {
      const open = stack.pop();
      if (open === undefined || els[open]!.name !== name) throw new Error(`</${name}> closes ${open === undefined ? 'nothing' : `<${els[open]!.name}>`}`);
    } else {
      const attrs: Record<string, string> = {};
      for (const a of rawAttrs!.matchAll(/([\w.:-]+)="([^"]*)"/g)) {
        if (a[1]! in attrs) throw new Error(`duplicate attribute ${a[1]} on <${name}>`);
        attrs[a[1]!] = a[2]!;
      }
      if (stack.length === 0) roots++;
      els.push({ name: name!, attrs, parent: stack[stack.length - 1] ?? -1 });
      if (!selfClose) stack.push(els.length - 1);
    }
    i = tag.lastIndex;
  }
  if (stack.length) throw new Error(`<${els[stack.pop()!]!.name}> never closed`);
  if (roots !== 1) throw new Error(`${roots} root elements`);
  return els;
}

test('SCXML is well-formed and every transition target and initial state exists', () => {
  const els = readXml(toScxml(graph));
  assert.is(els[0]!.name, 'scxml');
  const ids = new Set(els.filter((e) => e.attrs.id).map((e) => e.attrs.id!));
  assert.is(ids.size, els.filter((e) => e.attrs.id).length, 'ids are unique');
  assert.equal([...ids].sort(), graph.states.map((s) => s.id).sort());
  assert.ok(ids.has(els[0]!.attrs.initial!));
  const transitions = els.filter((e) => e.name === 'transition');
  assert.is(transitions.length, graph.transitions.length);
  for (const t of transitions) for (const target of (t.attrs.target ?? '').split(' ').filter(Boolean)) assert.ok(ids.has(target), `target ${target}`);
  for (const s of els.filter((e) => e.attrs.initial && e.name === 'state')) {
    const child = els.find((c) => c.attrs.id === s.attrs.initial)!;
    assert.is(els[child.parent]!.attrs.id, s.attrs.id, `initial of ${s.attrs.id} is its child`);
  }
  assert.is(els.filter((e) => e.name === 'final').length, 4);
  assert.ok(transitions.some((t) => !t.attrs.event && t.attrs.cond === 'keepsDispatchEdge'), 'eventless transitions have no event attribute');
  assert.throws(() => readXml('<a><b></a></b>'), /closes/);
});

test('JSON export carries the whole machine: read back, it holds every state of xstate\'s tree and rebuilds the other exports exactly', () => {
  const back = JSON.parse(toJson(graph)) as MachineGraph;
  assert.equal(back.states.map((s) => s.id).sort(), allIds(rankMachine.root).sort());
  assert.ok(back.transitions.length > 40, `${back.transitions.length} transitions`);
  assert.is(toMermaid(back), toMermaid(graph));
  assert.is(toDot(back), toDot(graph));
  assert.is(toScxml(back), toScxml(graph));
});

test('viz machine prints each format and rejects an unknown one', () => {
  const json = JSON.parse(execFileSync(process.execPath, [cli, 'viz', 'machine', '--format', 'json', '--variant', 'no-dispatch-edge'], { encoding: 'utf8' }));
  assert.is(json.variant, 'no-dispatch-edge');
  assert.is(json.states.length, graph.states.length);
  const mermaid = execFileSync(process.execPath, [cli, 'viz', 'machine'], { encoding: 'utf8' });
  assert.is(mermaid, toMermaid(graph));
  const bad = spawnSync(process.execPath, [cli, 'viz', 'machine', '--format', 'png'], { encoding: 'utf8' });
  assert.is(bad.status, 1);
  assert.match(bad.stderr, /--format must be one of mermaid, dot, scxml, json/);
  const badVariant = spawnSync(process.execPath, [cli, 'viz', 'machine', '--variant', 'nope'], { encoding: 'utf8' });
  assert.is(badVariant.status, 1);
  assert.match(badVariant.stderr, /unknown variant 'nope'/);
});

test.run();
