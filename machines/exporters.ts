// Machine exports: a graph read off an xstate machine's own StateNode tree (states, nested
// states, final states, meta, `on` and eventless `always` transitions with their guards and
// actions by name), and four renderings of it: Mermaid stateDiagram-v2, Graphviz DOT, SCXML
// and JSON. Nothing here knows the rank machine's states; `liveUnder` adds, for one variant,
// which transitions its guards can ever take, by evaluating the machine's guard
// implementations over a grid of rank contexts.
import type { AnyStateMachine, AnyStateNode } from 'xstate';
import type { RankConfig, RankContext, LayerFacts, WrapPolicy } from './rankMachine.js';
import type { Variant } from './variants.js';

export type StateKind = 'atomic' | 'compound' | 'parallel' | 'final' | 'history';

export interface GraphState {
  /** xstate's id: the machine id and the path joined by dots (`rank.forward.counts`). */
  readonly id: string;
  readonly key: string;
  /** Path below the root, as the snapshot's state value reads it (`forward.counts`). */
  readonly path: string;
  readonly kind: StateKind;
  readonly parent: string | null;
  readonly children: readonly string[];
  /** Id of the initial child of a compound state. */
  readonly initial: string | null;
  readonly meta: Record<string, unknown> | null;
}

export interface GraphTransition {
  readonly index: number;
  readonly source: string;
  /** Target ids as declared; empty for a targetless transition. */
  readonly targets: readonly string[];
  /** The event, or null for an eventless (`always`) transition. */
  readonly event: string | null;
  readonly guard: string | null;
  readonly actions: readonly string[];
  /** Place in its source's candidate list for the event: the first enabled one is taken. */
  readonly order: number;
  /** Under `variant`: whether the guards can ever select this transition (absent without a variant). */
  readonly live?: boolean;
}

export interface MachineGraph {
  readonly id: string;
  readonly root: string;
  readonly states: readonly GraphState[];
  readonly transitions: readonly GraphTransition[];
  readonly variant?: string;
}

const nameOf = (x: unknown, fallback: string): string => {
  if (typeof x === 'string') return x;
  if (x && typeof x === 'object' && 'type' in x && typeof x.type === 'string') return x.type;
  if (typeof x === 'function' && x.name) return x.name;
  return fallback;
};

/** The machine's state tree and transitions, in document order. */
export function machineGraph(machine: AnyStateMachine): MachineGraph {
  const states: GraphState[] = [];
  const transitions: GraphTransition[] = [];
  const rootPath = (n: AnyStateNode) => n.path.join('.');
  const visit = (node: AnyStateNode) => {
    const children = Object.values(node.states) as AnyStateNode[];
    const initialTarget = node.type === 'compound' ? (node.initial?.target as AnyStateNode[] | undefined)?.[0] : undefined;
    states.push({
      id: node.id,
      key: node.key,
      path: rootPath(node),
      kind: node.type as StateKind,
      parent: node.parent?.id ?? null,
      children: children.map((c) => c.id),
      initial: initialTarget?.id ?? null,
      meta: node.meta && typeof node.meta === 'object' ? (node.meta as Record<string, unknown>) : null,
    });
    const lists: [string | null, readonly unknown[]][] = [...(node.transitions as Map<string, unknown[]>).entries()];
    if (node.always) lists.unshift([null, node.always]);
    for (const [event, list] of lists) {
      list.forEach((t, order) => {
        const def = t as { target?: AnyStateNode[]; guard?: unknown; actions?: unknown[] };
        transitions.push({
          index: transitions.length,
          source: node.id,
          targets: (def.target ?? []).map((n) => n.id),
          event,
          guard: def.guard === undefined ? null : nameOf(def.guard, 'inline guard'),
          actions: (def.actions ?? []).map((a) => nameOf(a, 'inline action')),
          order,
        });
      });
    }
    children.forEach(visit);
  };
  visit(machine.root);
  return { id: machine.id, root: machine.root.id, states, transitions };
}

const indexes = new WeakMap<MachineGraph, Map<string, GraphState>>();

/** Index of a graph's states by id (built once per graph). */
export function stateIndex(g: MachineGraph): Map<string, GraphState> {
  let index = indexes.get(g);
  if (!index) indexes.set(g, (index = new Map(g.states.map((s) => [s.id, s]))));
  return index;
}

/** The atomic or final state entering `id` ends in (following initial children). */
export function entryLeaf(g: MachineGraph, id: string): string {
  const byId = stateIndex(g);
  let s = byId.get(id)!;
  while (s.initial) s = byId.get(s.initial)!;
  return s.id;
}

/** A transition's label: `event [guard] / action, action` (`always` for an eventless one). */
export function transitionLabel(t: GraphTransition): string {
  let label = t.event ?? 'always';
  if (t.guard) label += ` [${t.guard}]`;
  if (t.actions.length) label += ` / ${t.actions.join(', ')}`;
  return label;
}

// ---------------------------------------------------------------- liveness under a variant

/**
 * Contexts the rank machine's guards can see: every wrap policy, packed or not, first and
 * last layer and micro-batch, and for the current layer no rows or some rows sent, received
 * and reaching each local expert; no pipeline, and both stages of a two-stage pipeline whose
 * first stage is dense. Two EP ranks with two experts each keep it small while still telling
 * "none" from "some" from "all".
 */
export function rankContexts(variant: Variant): RankContext[] {
  const out: RankContext[] = [];
  // Sample the rank early-exit singles out (an unset rank means "any rank": take 0).
  const epRank = Math.max(0, variant.earlyExit?.rank ?? 0);
  const sampled: Variant = variant.earlyExit ? { ...variant, earlyExit: { ...variant.earlyExit, rank: epRank } } : variant;
  const rowsChoices = [[0, 0], [1, 1]];
  const perExpert = [[0, 0], [1, 0], [1, 1]];
  const pipelines = [{ pp: 1, ppRank: 0, stageLayers: [2] }, { pp: 2, ppRank: 0, stageLayers: [0, 1] }, { pp: 2, ppRank: 1, stageLayers: [0, 1] }];
  for (const fsdp of [null, 'block', 'split', 'experts'] as (WrapPolicy | null)[]) {
    for (const packed of [true, false]) for (const { pp, ppRank, stageLayers } of pipelines) {
      const cfg: RankConfig = {
        rank: epRank, epRank, dpRank: 0, ppRank, ep: 2, dp: fsdp ? 2 : 1, pp, layers: stageLayers[ppRank]!, stageLayers, microBatches: 2, numExperts: 4, topK: 1,
        packed, fsdp, paramsPerExpert: 8, attentionParams: 8, variant: sampled,
      };
      for (const layer of [0, 1]) for (const microBatch of [0, 1]) for (const layerCalls of [0, 2]) {
        for (const send of rowsChoices) for (const recv of rowsChoices) for (const rows of perExpert) for (const tokens of [0, 2]) {
          const facts: LayerFacts[] = [0, 1].map(() => ({ tokens, sendCounts: send, recvCounts: recv, rowsPerExpert: rows }));
          out.push({ cfg, layer, microBatch, layerCalls, facts, trail: [], skips: [], failure: null });
        }
      }
    }
  }
  return out;
}

/**
 * Marks each transition live when, for some context, its guard holds and every earlier
 * candidate for the same source and event fails: xstate takes the first enabled one. An
 * over-approximation (a context may be unreachable), so a dead transition is truly dead.
 */
export function liveUnder<C>(g: MachineGraph, machine: AnyStateMachine, contexts: readonly C[], variantName: string): MachineGraph {
  const impls = (machine.implementations.guards ?? {}) as Record<string, (args: { context: C; event: unknown }, params: unknown) => boolean>;
  const holds = (guard: string | null, context: C) => {
    if (guard === null) return true;
    const fn = impls[guard];
    // A guard we cannot evaluate (inline or higher-order) may hold.
    if (!fn) return true;
    return fn({ context, event: { type: '' } }, undefined);
  };
  const live = new Set<number>();
  const groups = new Map<string, GraphTransition[]>();
  for (const t of g.transitions) {
    const key = `${t.source}\u0000${t.event ?? ''}`;
    groups.set(key, [...(groups.get(key) ?? []), t]);
  }
  for (const list of groups.values()) {
    for (const context of contexts) {
      const taken = list.find((t) => holds(t.guard, context));
      if (taken) live.add(taken.index);
    }
  }
  return { ...g, variant: variantName, transitions: g.transitions.map((t) => ({ ...t, live: live.has(t.index) })) };
}

// ---------------------------------------------------------------- Mermaid

/**
 * Mermaid ids must be unique across nesting and the rank machine reuses keys (`combine`
 * in forward and backward), so each state is named by its path and labelled by its key.
 * Transitions declared on the root ("from any state") are drawn from each top-level state
 * that can still take events, since Mermaid cannot draw an edge out of the whole diagram.
 */
export function toMermaid(g: MachineGraph): string {
  const byId = stateIndex(g);
  const mid = (id: string) => byId.get(id)!.path.replace(/\./g, '_');
  const lines = ['stateDiagram-v2'];
  if (g.variant) lines.push(`  %% transitions no guard can take under variant ${g.variant} are marked (dead)`);
  const scopeOf = (a: string, b: string) => {
    let s = byId.get(byId.get(a)!.parent ?? g.root)!;
    while (!isAncestor(g, s.id, b)) s = byId.get(s.parent!)!;
    return s.id;
  };
  const emitState = (s: GraphState, indent: string) => {
    const label = s.kind === 'final' ? `${s.key} (final)` : s.key;
    if (s.children.length) {
      lines.push(`${indent}state "${label}" as ${mid(s.id)} {`);
      emitChildren(s, indent + '  ');
      lines.push(`${indent}}`);
    } else {
      lines.push(`${indent}state "${label}" as ${mid(s.id)}`);
    }
    const collective = (s.meta?.collective ?? null) as { op?: string; comm?: string } | null;
    if (collective?.op) lines.push(`${indent}note right of ${mid(s.id)} : ${collective.op} on ${collective.comm}`);
  };
  const emitChildren = (parent: GraphState, indent: string) => {
    for (const c of parent.children) emitState(byId.get(c)!, indent);
    if (parent.initial) lines.push(`${indent}[*] --> ${mid(parent.initial)}`);
    for (const c of parent.children) if (byId.get(c)!.kind === 'final') lines.push(`${indent}${mid(c)} --> [*]`);
    for (const t of g.transitions) {
      const sources = t.source === g.root ? byId.get(g.root)!.children.filter((c) => byId.get(c)!.kind !== 'final') : [t.source];
      const label = mermaidText(transitionLabel(t) + (t.live === false ? ' (dead)' : ''));
      for (const src of sources) {
        for (const tgt of t.targets.length ? t.targets : [t.source]) {
          // Mermaid scopes a name to the block it appears in, so an edge goes in the block of
          // the innermost state containing both ends, or it would create a new state.
          if (scopeOf(src, tgt) === parent.id) lines.push(`${indent}${mid(src)} --> ${mid(tgt)} : ${label}`);
        }
      }
    }
  };
  emitChildren(byId.get(g.root)!, '  ');
  return lines.join('\n') + '\n';
}

/** Mermaid ends a transition label at `:` and reads `;` and `#` as syntax. */
const mermaidText = (s: string) => s.replace(/[:;#]/g, ' ');

// ---------------------------------------------------------------- Graphviz DOT

const dotString = (s: string) => `"${s.replace(/\\/g, '\\\\').replace(/"/g, '\\"')}"`;

/**
 * Compound states below the root become clusters (an edge into one enters its initial leaf,
 * drawn with lhead so it meets the cluster's border); each compound state gets an initial
 * point, and one with transitions of its own ("from any state inside") an `any state` node.
 */
export function toDot(g: MachineGraph): string {
  const byId = stateIndex(g);
  const lines = [`digraph ${dotString(g.id)} {`, '  compound=true;', '  rankdir=TB;', '  node [shape=box, style=rounded, fontname="Helvetica", fontsize=11];', '  edge [fontname="Helvetica", fontsize=9];'];
  lines.push(`  label=${dotString(g.variant ? `${g.id} under variant ${g.variant} (grey dashed: no guard can take it)` : g.id)}; labelloc=t;`);
  const slug = (id: string) => byId.get(id)!.path.replace(/\./g, '_') || 'root';
  const inCluster = (id: string) => id !== g.root && byId.get(id)!.children.length > 0;
  const hasOwn = (id: string) => g.transitions.some((t) => t.source === id);
  const emit = (s: GraphState, indent: string) => {
    if (s.children.length) {
      const inner = inCluster(s.id) ? indent + '  ' : indent;
      if (inCluster(s.id)) lines.push(`${indent}subgraph cluster_${slug(s.id)} {`, `${inner}label=${dotString(s.key)}; style=rounded;`);
      lines.push(`${inner}init_${slug(s.id)} [shape=point, width=0.12, label=""];`);
      if (hasOwn(s.id)) lines.push(`${inner}any_${slug(s.id)} [shape=plaintext, label=${dotString(`any state${s.id === g.root ? '' : ` in ${s.key}`}`)}];`);
      for (const c of s.children) emit(byId.get(c)!, inner);
      if (inCluster(s.id)) lines.push(`${indent}}`);
      return;
    }
    const collective = (s.meta?.collective ?? null) as { op?: string; comm?: string } | null;
    const label = dotString(collective?.op ? `${s.key}\n${collective.op} (${collective.comm})` : s.key).replace(/\n/g, '\\n');
    lines.push(`${indent}${dotString(s.id)} [label=${label}${s.kind === 'final' ? ', shape=doublecircle, style=solid' : ''}];`);
  };
  emit(byId.get(g.root)!, '  ');
  for (const s of g.states) {
    if (s.initial) lines.push(`  init_${slug(s.id)} -> ${dotString(entryLeaf(g, s.initial))}${inCluster(s.initial) ? ` [lhead=cluster_${slug(s.initial)}]` : ''};`);
  }
  for (const t of g.transitions) {
    const src = byId.get(t.source)!;
    for (const tgtId of t.targets.length ? t.targets : [t.source]) {
      const attrs = [`label=${dotString(transitionLabel(t))}`];
      const from = src.children.length ? `any_${slug(src.id)}` : dotString(src.id);
      if (inCluster(tgtId) && !isAncestor(g, tgtId, src.id)) attrs.push(`lhead=cluster_${slug(tgtId)}`);
      if (t.event === null) attrs.push('style=dotted');
      if (t.live === false) attrs.push('color=gray70', 'fontcolor=gray60', 'style=dashed');
      lines.push(`  ${from} -> ${dotString(entryLeaf(g, tgtId))} [${attrs.join(', ')}];`);
    }
  }
  lines.push('}');
  return lines.join('\n') + '\n';
}

/** Whether `a` is `b` or one of its ancestors. */
export function isAncestor(g: MachineGraph, a: string, b: string): boolean {
  const byId = stateIndex(g);
  for (let s: GraphState | undefined = byId.get(b); s; s = s.parent ? byId.get(s.parent) : undefined) if (s.id === a) return true;
  return false;
}

// ---------------------------------------------------------------- SCXML

const xml = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');

/**
 * SCXML keeps the tree as it is: the root becomes a compound <state> (SCXML's <scxml>
 * element cannot hold transitions), guards become `cond`, named actions and collective
 * meta become elements in the ep-actors namespace, which SCXML allows in executable content.
 */
export function toScxml(g: MachineGraph): string {
  const byId = stateIndex(g);
  const out = [
    '<?xml version="1.0" encoding="UTF-8"?>',
    `<scxml xmlns="http://www.w3.org/2005/07/scxml" xmlns:ep="urn:ep-actors" version="1.0" datamodel="null" name="${xml(g.id)}" initial="${xml(g.root)}">`,
  ];
  const emit = (s: GraphState, indent: string) => {
    const tag = s.kind === 'final' ? 'final' : s.kind === 'parallel' ? 'parallel' : 'state';
    const init = s.initial && tag === 'state' ? ` initial="${xml(s.initial)}"` : '';
    const own = g.transitions.filter((t) => t.source === s.id);
    const collective = (s.meta?.collective ?? null) as Record<string, unknown> | null;
    if (!s.children.length && !own.length && !collective) {
      out.push(`${indent}<${tag} id="${xml(s.id)}"/>`);
      return;
    }
    out.push(`${indent}<${tag} id="${xml(s.id)}"${init}>`);
    if (collective) {
      const attrs = Object.entries(collective).map(([k, v]) => ` ${k}="${xml(String(v))}"`).join('');
      out.push(`${indent}  <ep:collective${attrs}/>`);
    }
    for (const t of own) {
      const attrs = [
        t.event !== null ? ` event="${xml(t.event)}"` : '',
        t.guard ? ` cond="${xml(t.guard)}"` : '',
        t.targets.length ? ` target="${xml(t.targets.join(' '))}"` : ' type="internal"',
        t.live === false ? ` ep:live="false"` : '',
      ].join('');
      if (!t.actions.length) out.push(`${indent}  <transition${attrs}/>`);
      else {
        out.push(`${indent}  <transition${attrs}>`);
        for (const a of t.actions) out.push(`${indent}    <ep:action name="${xml(a)}"/>`);
        out.push(`${indent}  </transition>`);
      }
    }
    for (const c of s.children) emit(byId.get(c)!, indent + '  ');
    out.push(`${indent}</${tag}>`);
  };
  emit(byId.get(g.root)!, '  ');
  out.push('</scxml>');
  return out.join('\n') + '\n';
}

// ---------------------------------------------------------------- JSON

export function toJson(g: MachineGraph): string {
  return JSON.stringify(g, null, 2) + '\n';
}

export type ExportFormat = 'mermaid' | 'dot' | 'scxml' | 'json';
export const EXPORT_FORMATS: readonly ExportFormat[] = ['mermaid', 'dot', 'scxml', 'json'];

export function exportMachine(g: MachineGraph, format: ExportFormat): string {
  switch (format) {
    case 'mermaid':
      return toMermaid(g);
    case 'dot':
      return toDot(g);
    case 'scxml':
      return toScxml(g);
    case 'json':
      return toJson(g);
  }
}
