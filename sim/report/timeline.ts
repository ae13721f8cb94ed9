// The report's timeline: a lane per rank, a block per collective from its issue to its
// completion on that rank. The time before every rank is in the step (worker start-up, the
// first collective waiting on ranks still starting) is folded into a narrow band, so the
// step gets the width; a collective that never completed runs into an open end past the
// run's last moment, so every pending block is visible however late it was issued.
import type { TraceEvent } from '../../machines/spans.js';
import type { ReportInput } from '../../machines/record.js';
import { COMPACT_FROM, esc, opClass, opOrder, rd, shortOp } from './html-util.js';

const LABEL_W = 52;
const PLOT_W = 1000;
/** The folded start-up band and the open end of never-completed collectives. */
const FOLD_W = 72;
const OPEN_W = 56;
/** Start-up is folded only when it would take more than this share of the width. */
const FOLD_FROM = 0.1;

const pending = (e: TraceEvent) => e.args.completed === false;

/**
 * The time axis: [t0, step) folded into FOLD_W, [step, end] linear over the plot, and past
 * `end` the open end where pending collectives run on. Times are µs as the trace has them.
 */
export interface TimeAxis {
  readonly t0: number;
  /** When every rank that issued anything had issued its first collective: the step is running everywhere. */
  readonly step: number;
  readonly end: number;
  readonly folded: boolean;
  readonly open: boolean;
  x(t: number): number;
  /** The right edge of the drawing (the open end's, when there is one). */
  readonly right: number;
}

export function timeAxis(trace: readonly TraceEvent[]): TimeAxis {
  // reduce, not Math.min(...): a long run has more spans than a call takes arguments
  const t0 = trace.reduce((m, e) => Math.min(m, e.ts), 0);
  const end = Math.max(t0 + 1, trace.reduce((m, e) => Math.max(m, e.ts + e.dur), t0));
  const first = new Map<number, number>();
  for (const e of trace) first.set(e.tid, Math.min(first.get(e.tid) ?? Infinity, e.ts));
  const started = Math.max(t0, ...first.values());
  const folded = started - t0 > FOLD_FROM * (end - t0) && started < end;
  const step = folded ? started : t0;
  const open = trace.some(pending);
  const x0 = LABEL_W + (folded ? FOLD_W : 0);
  const x1 = LABEL_W + PLOT_W - (open ? OPEN_W : 0);
  const x = (t: number) => (t < step ? LABEL_W + ((t - t0) / (step - t0)) * FOLD_W : x0 + ((t - step) / (end - step)) * (x1 - x0));
  return { t0, step, end, folded, open, x, right: LABEL_W + PLOT_W };
}

export function timelineSection(input: ReportInput): string {
  const n = input.paths.length;
  const laneH = n <= COMPACT_FROM ? 20 : n <= 64 ? 10 : 6;
  const axis = timeAxis(input.trace);
  const { x } = axis;
  // A matched collective: every member's span at (communicator, position) completed.
  const slots = new Map<string, { ts: number; end: number; lanes: number[]; done: boolean }>();
  for (const e of input.trace) {
    const k = `${e.args.communicator}#${e.args.position}`;
    const s = slots.get(k) ?? { ts: -Infinity, end: Infinity, lanes: [], done: true };
    s.ts = Math.max(s.ts, e.ts);
    s.end = Math.min(s.end, e.ts + e.dur);
    s.lanes.push(e.tid);
    s.done &&= !pending(e);
    slots.set(k, s);
  }
  const top = axis.folded ? 34 : 22;
  const bottom = top + n * laneH;
  const byLane = new Map<number, TraceEvent[]>();
  for (const e of input.trace) byLane.set(e.tid, [...(byLane.get(e.tid) ?? []), e]);
  const lanes: string[] = [];
  for (let r = 0; r < n; r++) {
    const y = top + r * laneH;
    const rects = (byLane.get(r) ?? [])
      .map((e) => {
        const hung = pending(e);
        const x1 = hung ? axis.right : x(e.ts + e.dur);
        const when = `${fmtUs(e.ts - axis.step)}${hung ? ', never completes' : ` + ${fmtUs(e.dur)}`}`;
        const title = `rank ${r}: ${e.name} layer ${e.args.layer}${e.args.microBatch ? ` mb ${e.args.microBatch}` : ''} · ${e.args.communicator} #${e.args.position} · ${when}`;
        return `<rect class="${opClass(e.name)}${hung ? ' hung' : ''}" x="${rd(x(e.ts))}" y="${y + 1}" width="${rd(Math.max(1, x1 - x(e.ts)))}" height="${laneH - 2}"><title>${esc(title)}</title></rect>`;
      })
      .join('');
    lanes.push(`<g class="lane" data-r="${r}"><rect class="bg" x="0" y="${y}" width="${axis.right}" height="${laneH}"/><text x="4" y="${y + laneH - (laneH > 10 ? 6 : 1)}">r${r}</text>${rects}</g>`);
  }
  // A matched collective is one vertical line across its members' lanes, in the window
  // where all of them are inside it (from the last arrival to the first departure).
  const joins = [...slots.values()]
    .filter((s) => s.done)
    .map((s) => {
      const jx = rd(x(s.end > s.ts ? (s.ts + s.end) / 2 : s.ts));
      return `<line class="join" x1="${jx}" x2="${jx}" y1="${top + Math.min(...s.lanes) * laneH + 1}" y2="${top + (Math.max(...s.lanes) + 1) * laneH - 1}"/>`;
    })
    .join('');
  const ticks = niceTicks(0, axis.end - axis.step, 8)
    // The open end's label takes the last tick's place.
    .filter((t) => !axis.open || x(axis.step + t) < x(axis.end) - 40 || t === 0)
    .map((t) => {
      const tx = rd(x(axis.step + t));
      return `<line class="tick" x1="${tx}" x2="${tx}" y1="${top - 4}" y2="${bottom}"/><text class="tick" x="${tx}" y="${top - 8}">${fmtUs(t)}</text>`;
    })
    .join('');
  const startUp = axis.step - axis.t0;
  const fold = axis.folded
    ? `<rect class="fold" x="${LABEL_W}" y="${top - 2}" width="${FOLD_W}" height="${bottom - top + 2}"><title>start-up folded: ${fmtUs(startUp)} until every rank had issued its first collective</title></rect><text class="fold" x="4" y="${top - 22}">start-up ${fmtUs(startUp)}, folded ▸</text>`
    : '';
  const openEnd = axis.open
    ? `<g class="open"><line class="end" x1="${rd(x(axis.end))}" x2="${rd(x(axis.end))}" y1="${top - 4}" y2="${bottom}"/><text class="tick" x="${rd(x(axis.end) + OPEN_W / 2)}" y="${top - 8}">never ends →</text></g>`
    : '';
  const h = bottom + 6;
  const clock = input.clock === 'real' ? 'wall-clock time of the run' : "the engine's simulated time (its cost model: expert FLOPs over a compute rate, collectives as latency plus bytes over link bandwidth)";
  const foldNote = axis.folded ? ` Time counts from the step's start, when every rank had issued its first collective; the ${fmtUs(startUp)} before it (worker start-up, and early ranks waiting in their first collective for the rest) is folded into the grey band.` : '';
  return `<section id="timeline"><h2>Timeline</h2><p>One lane per rank, ${clock}.${foldNote} A vertical line joins the members of each matched collective; a blank stretch of a lane is the rank's own work (routing, expert compute). A collective that never completed is hatched and runs on past the run's end.</p>
${timelineLegend(input.trace, axis)}<div class="scroll tall"><svg xmlns="http://www.w3.org/2000/svg" class="timeline" viewBox="0 0 ${axis.right + 10} ${h}"><defs>${HATCH}</defs>${ticks}${lanes.join('')}${fold}${joins}${openEnd}</svg></div></section>`;
}

/** The stripes of a never-completed block; the legend's swatch uses the same pattern. */
const HATCH = `<pattern id="hatch" patternUnits="userSpaceOnUse" width="6" height="6" patternTransform="rotate(45)"><rect width="6" height="6" fill="#fee2e2"/><rect width="2.5" height="6" fill="#dc2626"/></pattern>`;

/** One entry per thing the timeline draws: each collective kind drawn in its colour, the pending hatch, the join line, the fold. */
function timelineLegend(trace: readonly TraceEvent[], axis: TimeAxis): string {
  const swatch = (inner: string) => `<svg class="swatch" width="22" height="12" viewBox="0 0 22 12">${inner}</svg>`;
  const block = (cls: string) => swatch(`<rect class="${cls}" x="1" y="1" width="20" height="10"/>`);
  const items = opOrder(trace.flatMap((e) => (pending(e) ? [] : [e.name]))).map((op) => `<span data-legend="${esc(op)}">${block(opClass(op))}<b>${esc(shortOp(op))}</b> ${esc(op)}</span>`);
  if (axis.open) items.push(`<span data-legend="pending">${block('hung')}issued, never completed</span>`);
  items.push(`<span data-legend="join">${swatch('<line class="join" x1="11" x2="11" y1="0" y2="12"/>')}matched across its members</span>`);
  items.push(`<span data-legend="work">${block('work')}the rank's own work: routing, expert compute</span>`);
  if (axis.folded) items.push(`<span data-legend="fold">${block('fold')}start-up, folded</span>`);
  return `<p class="legend tl-legend" id="timeline-legend">${items.join('')}</p>`;
}

const fmtUs = (us: number) => (Math.abs(us) >= 1e6 ? `${(us / 1e6).toPrecision(3)} s` : Math.abs(us) >= 1e3 ? `${(us / 1e3).toPrecision(3)} ms` : `${Math.round(us)} µs`);

function niceTicks(a: number, b: number, count: number): number[] {
  const raw = (b - a) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw)!;
  const out: number[] = [];
  for (let t = Math.ceil(a / step) * step; t <= b; t += step) out.push(t);
  return out;
}
