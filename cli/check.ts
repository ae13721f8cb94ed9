// `ep-actors check`: explore every routing class of a layout under a variant; prove that
// none hangs or give the shortest counterexample, optionally written as a replayable
// scenario. Shards split an exhaustive run across machines; --merge joins their results.
import { readFile, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { helpAsked, intOption, parse } from './args.js';
import { SCENARIO_HELP, SCENARIO_OPTIONS, scenarioFromFlags } from './scenarioFlags.js';
import { UsageError } from '../src/errors.js';
import { formatDiagnosis, rankWord } from '../machines/diagnosis.js';
import { DEFAULT_MAX_CLASSES, explore, mergeResults, type ExploreResult, type MergedResult, type Progress, type Shard } from '../sim/explorer.js';
import type { Scenario } from '../machines/scenario.js';
import { ppOf, worldSize } from '../machines/mesh.js';
import { shardBatches } from '../machines/variants.js';
import { parseShard, slurmArrayShard } from '../sim/sweep.js';

const HELP = `usage: ep-actors check [scenario flags] [--shard I/N] [--max-classes N] [--exhaustive]
                       [--replay FILE] [--json]
       ep-actors check --merge FILE... [--replay FILE] [--json]

Can any routing hang this layout? Runs routing classes through the discrete-event engine.
A rank's kind is what the rank machine's guards can read of its routing: whether it holds
tokens, whether rows reach it, how many of its local experts get rows (or whether one gets
none: kernel-hang), its completion order (completion-order) or its order of the shared
expert's all-gather and fwd.combine (second-stream) per layer call, and only as far as the
variant and layout make the guards read them (the proof lists them). early-exit's and
wrong-group's EP rank is singled out (wrong-group on any other EP rank is the same class
with two EP ranks' routing swapped). A class fixes the kinds of every rank, up to
permuting EP ranks (alike in every dp group) and dp groups; every layer and micro-batch is
routed the same way. Under uneven-batches every class also runs once per evaluation batch
count E, from one batch per rank to --micro-batches per rank (each rank runs its
round-robin share of E as micro-batches), fewest first. Classes run fewest starved ranks
(receiving no rows) first, then fewest rows, so a counterexample is a shortest one. The
scenario's own routing, tokens, evaluation batches and seed are unused.

A compute that never returns (kernel-hang) is reported as a stall, naming the rank and its
expert, not as a collective mismatch.

Cutoff: two ranks of one kind issue identical, mutually consistent collectives, so a
class's verdict depends only on which kinds it holds: 1 rank per kind stands for any
number (the bound holds for every variant). A class holding fewer kinds than another can
only hang if that one does, so when one class can hold every kind and passes, the layout
is proved by that single run. Tested against the exhaustive search at small ep for every
variant and FSDP wrap policy. local-capacity sizes splits from token counts: its kinds
give every holder one capacity level, so unequal holders are not explored.

  --exhaustive           no cutoff: every class of rank kinds (holds tokens x local
                         experts reached x orders per layer call), for cross-checks; grows
                         like ep^(kinds-1)
  --max-classes N        run at most N classes (one run per class and evaluation batch
                         count under uneven-batches), and hold at most N for one starved level
                         (default ${DEFAULT_MAX_CLASSES}); past it, stop and exit 1
  --shard I/N            run only the classes enumerated at positions I modulo N of each
                         starved level (each shard holds 1/N of a level); without it, a
                         Slurm array task (SLURM_ARRAY_TASK_ID, _COUNT, _MIN) is a shard
  --merge FILE...        join the --json results of every shard of one run into one proof
                         or counterexample (the one earliest in search order)
  --replay FILE          write the counterexample as a scenario JSON (routing 'explicit',
                         orders in 'firstReady' or 'streamOrder', 'evalBatches') that
                         'ep-actors sim --scenario FILE' reproduces on every engine
  --json                 one JSON object (a shard's result, which --merge reads)
  -h, --help             this text

Progress and an estimate for the current level are drawn on stderr when it is a terminal.
Pipeline stages (--pp N, --moe-layers): stages meet only in the step-end all-reduce(s)
over the pipeline group, which read the MoE-layer counts per stage, never routing. The
first class (every stage at its own first class) runs first; if it hangs (stage-metric with
unequal counts) it is the shortest counterexample. Otherwise each distinct MoE-layer count is
explored as its own stage layout, a counterexample placed on the first stage with that count
and the other stages at their first class, and run again as the whole pipeline.

Limits, each one line and exit 1: at most 4096 ranks, dp <= 6, 4 layer calls under
completion-order or second-stream; a starved level that would fill the heap stops the run
(shard it or add heap).

${SCENARIO_HELP}

exit codes: 0 proved, 2 counterexample found, 1 bad usage or stopped at a limit`;

/** --shard, else a Slurm array task, else the whole run. */
function shardOf(flag: unknown, env: NodeJS.ProcessEnv): Shard {
  if (typeof flag === 'string') return parseShard(flag);
  if (env.SLURM_ARRAY_TASK_ID === undefined || env.SLURM_ARRAY_TASK_COUNT === undefined) return { index: 0, count: 1 };
  return slurmArrayShard(env, 'check in a Slurm array task');
}

const where = (l: Scenario) =>
  `ep=${l.ep}${l.dp > 1 ? ` dp=${l.dp}` : ''}${ppOf(l) > 1 ? ` pp=${ppOf(l)}${l.moeLayers ? ` (MoE layers ${l.moeLayers.join(',')})` : ''}` : ''}${l.fsdp ? ` fsdp=${l.fsdp}` : ''}, ${l.experts} experts, top-${l.topK}${l.layers > 1 ? `, ${l.layers} layers` : ''}${l.microBatches > 1 ? `, ${l.microBatches} micro-batches` : ''}, variant ${l.variant}`;

function progressLine(p: Progress): string {
  const rate = p.classesRun / Math.max(p.elapsedMs / 1000, 1e-3);
  const eta = (p.levelSize - p.levelDone) / Math.max(rate, 1e-9);
  return `\r\x1b[Kstarved level ${p.level}/${p.maxLevel}: ${p.levelDone}/${p.levelSize} · ${p.classesRun} classes run, ${rate.toFixed(0)}/s · level done in ${eta < 1 ? 'under 1' : `~${eta.toFixed(0)}`} s`;
}

function stopLine(r: ExploreResult, maxClasses: number): string {
  const s = r.stopped!;
  const got = `check: stopped in starved level ${s.key[0]} of ${worldSize(r.layout)} (${r.classesRun} classes run, all passed)`;
  if (s.reason === 'memory') return `${got}: the heap is nearly full; give node more heap (NODE_OPTIONS=--max-old-space-size=MB)${r.reduction.cutoff === null ? ' or drop --exhaustive' : ''}, or split the run with --shard I/N`;
  if (s.reason === 'level') return `${got}: starved level ${s.key[0]} alone holds more than --max-classes ${maxClasses} classes; raise --max-classes (memory grows with it)${r.reduction.cutoff === null ? ', or drop --exhaustive' : ''}`;
  return `${got}: --max-classes ${maxClasses} reached; split the run with --shard I/N (then --merge), or raise --max-classes`;
}

function printSummary(r: ExploreResult | MergedResult, replay: string | null): void {
  const red = r.reduction;
  const speed = `${r.classesRun} class${r.classesRun === 1 ? '' : 'es'} run, ${(r.elapsedMs / 1000).toFixed(2)} s`;
  const observed = red.observed.length ? red.observed.join('; ') : 'nothing (every rank issues the same collectives whatever the routing)';
  const c = r.counterexample;
  if (!c) {
    console.log(`proved: no routing hangs ${where(r.layout)} [${speed}]`);
    console.log(red.cutoff === null ? `exhaustive: every class of ${red.rankKinds} rank kinds, no cutoff` : `cutoff: 1 rank per kind stands for any number; the guards read per rank: ${observed}`);
    if (red.everyKindAtOnce) console.log(`one class held all ${red.columnKinds} column kind(s) and passed; a class holding fewer kinds can only hang if it does`);
    return;
  }
  // A stall is compute that never returns: say so before anything reads it as a collective hang.
  const finding = c.diagnosis.verdict === 'stall' ? `a stall in compute (${rankWord(c.diagnosis.culprits)}), not a collective mismatch` : `a hang in the collectives (${c.diagnosis.verdict})`;
  console.log(`counterexample: ${finding}, the first in search order (starved level ${c.key[0]}, ${c.key[1]} rows) for ${where(r.layout)} [${speed}]`);
  if (red.cutoff !== null) console.log(`cutoff: 1 rank per kind; the guards read per rank: ${observed}`);
  if (ppOf(r.layout) > 1) {
    const size = r.layout.ep * r.layout.dp;
    console.log(
      c.stage === null
        ? 'pipeline: every stage at its first class (the first class in search order)'
        : `pipeline: stage ${c.stage} (ranks ${c.stage * size}–${(c.stage + 1) * size - 1}) takes the class that hangs; every other stage its first class`,
    );
  }
  console.log(`routing: ${runs(c.ranks.map((k) => `${k.holdsTokens ? 'hold' : 'hold no'} tokens, ${k.usedExperts} local expert(s) reached`)).join('; ')}`);
  console.log(`starved (receiving no rows): ${c.starvedRanks.length ? c.starvedRanks.map((g) => `rank ${g}`).join(', ') : 'none'}; rows: ${c.rows}${c.firstReady ? `; issued first: ${c.firstReady.map((o, g) => `rank ${g} ${o.join('/')}`).join(', ')}` : ''}`);
  if (c.evalBatches) {
    // Sharded over one stage's ranks: every stage of a replica runs its data.
    const stage = r.layout.ep * r.layout.dp;
    const shares = Array.from({ length: worldSize(r.layout) }, (_, g) => `${shardBatches(c.evalBatches!, stage, g % stage)} micro-batch(es)`);
    console.log(`evaluation batches: ${c.evalBatches} round-robin over the ${stage} ranks of ${ppOf(r.layout) > 1 ? 'each stage' : 'the layout'}: ${runs(shares.map((t) => `run ${t}`)).join('; ')}`);
  }
  console.log(formatDiagnosis(c.diagnosis));
  if (replay) console.log(`wrote ${replay}`);
}

/** Consecutive ranks alike, as 'ranks 0–62 hold …; rank 63 holds …' (each text starts with its verb, plural). */
function runs(texts: readonly string[]): string[] {
  const out: string[] = [];
  for (let g = 0; g < texts.length; ) {
    let end = g;
    while (end + 1 < texts.length && texts[end + 1] === texts[g]) end++;
    out.push(end > g ? `ranks ${g}–${end} ${texts[g]}` : `rank ${g} ${texts[g]!.replace(/^(\w+)/, '$1s')}`);
    g = end + 1;
  }
  return out;
}

async function readResults(files: readonly string[]): Promise<ExploreResult[]> {
  return Promise.all(
    files.map(async (f) => {
      try {
        return JSON.parse(await readFile(resolve(f), 'utf8')) as ExploreResult;
      } catch (e) {
        throw new UsageError(`check --merge: ${f}: ${(e as Error).message}`);
      }
    }),
  );
}

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse(
    argv,
    { ...SCENARIO_OPTIONS, replay: { type: 'string' }, json: { type: 'boolean' }, exhaustive: { type: 'boolean' }, 'max-classes': { type: 'string' }, shard: { type: 'string' }, merge: { type: 'boolean' } },
    HELP,
  );
  if (helpAsked(values, HELP)) return 0;
  if (!values.merge && positionals.length) throw new UsageError(`unexpected argument '${positionals[0]}' (result files go after --merge)\n\n${HELP}`);
  const replay = typeof values.replay === 'string' ? resolve(values.replay) : null;

  if (values.merge) {
    const given = Object.keys(values).filter((k) => !['merge', 'replay', 'json'].includes(k));
    if (given.length) throw new UsageError(`check --merge takes result files, --replay and --json only; got --${given[0]}`);
    if (!positionals.length) throw new UsageError('check --merge: give the result files of every shard (check --shard I/N --json > FILE)');
    const m = mergeResults(await readResults(positionals));
    if (replay && m.counterexample) await writeFile(replay, JSON.stringify(m.counterexample.scenario, null, 2) + '\n');
    if (values.json) console.log(JSON.stringify({ ...m, replay: m.counterexample ? replay : null }));
    else if (m.verdict === 'stopped') {
      console.error(`check --merge: no counterexample, but shard(s) ${m.stopped.map((s) => `${s.shard} (stopped in starved level ${s.key[0]}, ${s.reason})`).join(', ')} did not finish: rerun them with a higher --max-classes or more shards`);
    } else {
      printSummary(m, replay);
      if (m.shortest === false) console.log('a shard stopped before this class, so a shorter counterexample may exist');
      console.log(`merged ${m.shards} shard(s)`);
    }
    return m.verdict === 'proved' ? 0 : m.verdict === 'counterexample' ? 2 : 1;
  }

  const layout = await scenarioFromFlags(values);
  const maxClasses = intOption(values['max-classes'], 'max-classes', DEFAULT_MAX_CLASSES, 1);
  const shard = shardOf(values.shard, process.env);
  const tty = process.stderr.isTTY;
  const r = explore(layout, { reduce: !values.exhaustive, shard, maxClasses, onProgress: tty ? (p) => process.stderr.write(progressLine(p)) : undefined });
  if (tty) process.stderr.write('\r\x1b[K');
  if (replay && r.counterexample) await writeFile(replay, JSON.stringify(r.counterexample.scenario, null, 2) + '\n');
  if (values.json) {
    console.log(JSON.stringify({ ...r, classesPerSecond: r.classesRun / Math.max(r.elapsedMs / 1000, 1e-9), replay: r.counterexample ? replay : null }));
  } else if (r.stopped) {
    console.error(stopLine(r, maxClasses));
  } else {
    printSummary(r, replay);
    if (shard.count > 1) console.log(`shard ${shard.index}/${shard.count}: only this shard's classes; join every shard's --json with --merge`);
  }
  if (r.stopped && values.json) console.error(stopLine(r, maxClasses));
  return r.verdict === 'proved' ? 0 : r.verdict === 'counterexample' ? 2 : 1;
}
