// `ep-actors check`: explore every routing class of a layout under a variant; prove that
// none hangs or give the shortest counterexample, optionally written as a replayable scenario.
import { writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { helpAsked, noPositionals, parse } from './args.js';
import { SCENARIO_HELP, SCENARIO_OPTIONS, scenarioFromFlags } from './scenarioFlags.js';
import { formatDiagnosis } from '../machines/diagnosis.js';
import { explore } from '../sim/explorer.js';

const HELP = `usage: ep-actors check [scenario flags] [--replay FILE] [--json]

Can any routing hang this layout? Runs every routing class through the discrete-event
engine: per rank, whether it holds tokens and how many of its local experts receive rows
(what the rank machine's guards read), one class per orbit of rank permutations; every
layer and micro-batch is routed the same way. Where a variant lets two ready collectives
go out in completion order, every order is explored. Either proves that no class
diverges, or prints the shortest counterexample: fewest starved ranks (receiving no
rows), then fewest rows. The scenario's own routing, tokens and seed are not used.

  --replay FILE          write the counterexample as a scenario JSON (routing 'explicit')
                         that 'ep-actors sim --scenario FILE' reproduces in either engine
  --json                 one JSON object instead of the summary
  -h, --help             this text

${SCENARIO_HELP}

exit codes: 0 proved, 2 counterexample found, 1 bad usage`;

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse(argv, { ...SCENARIO_OPTIONS, replay: { type: 'string' }, json: { type: 'boolean' } }, HELP);
  if (helpAsked(values, HELP)) return 0;
  noPositionals(positionals, HELP);
  const layout = await scenarioFromFlags(values);
  const tty = !values.json && process.stderr.isTTY;
  const r = explore(layout, { onProgress: tty ? (done, total) => process.stderr.write(`\r${done}/${total} classes`) : undefined });
  if (tty) process.stderr.write('\r\x1b[K');
  const replay = typeof values.replay === 'string' ? resolve(values.replay) : null;
  if (replay && r.counterexample) await writeFile(replay, JSON.stringify(r.counterexample.scenario, null, 2) + '\n');
  const rate = r.classesRun / Math.max(r.elapsedMs / 1000, 1e-9);
  if (values.json) {
    const { counterexample: c, ...rest } = r;
    console.log(JSON.stringify({ ...rest, classesPerSecond: rate, counterexample: c && { ...c, scenario: undefined }, replay: c ? replay : null }));
  } else {
    const where = `ep=${layout.ep}${layout.dp > 1 ? ` dp=${layout.dp}` : ''}${layout.fsdp ? ` fsdp=${layout.fsdp}` : ''}, ${layout.experts} experts, top-${layout.topK}, variant ${layout.variant}`;
    const speed = `${(r.elapsedMs / 1000).toFixed(2)} s, ${rate.toFixed(0)} classes/s, ${r.symmetries} rank symmetries`;
    if (!r.counterexample) {
      console.log(`proved over ${r.classes} classes (${r.schedulesRun} runs): no routing hangs ${where} [${speed}]`);
    } else {
      const c = r.counterexample;
      console.log(`counterexample after ${r.classesRun} of ${r.classes} classes for ${where} [${speed}]`);
      console.log(`routing: ${c.ranks.map((k, g) => `rank ${g} ${k.holdsTokens ? 'holds tokens' : 'holds none'}, ${k.usedExperts} local expert(s) reached`).join('; ')}`);
      console.log(`starved (receiving no rows): ${c.starvedRanks.length ? c.starvedRanks.map((g) => `rank ${g}`).join(', ') : 'none'}; rows: ${c.rows}${c.firstReady ? `; issued first: ${c.firstReady.map((o, g) => `rank ${g} ${o.join('/')}`).join(', ')}` : ''}`);
      console.log(formatDiagnosis(c.diagnosis));
      if (replay) console.log(`wrote ${replay}`);
    }
  }
  return r.counterexample ? 2 : 0;
}
