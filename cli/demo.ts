// `npm start`: the main job on the embedded CPU default. A real EP step on generated
// inputs (ranks as worker threads), the seed variant passing a starved-rank scenario, the
// no-dispatch-edge variant caught and explained on the same scenario, the HTML report
// of that hang written to disk, and the same bug caught on four real processes.
import { writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { formatDiagnosis } from '../machines/diagnosis.js';
import { actorRanks } from '../actors/caseRanks.js';
import { runActors } from '../actors/supervisor.js';
import { reportFromRun } from '../actors/supervisor.js';
import { renderReport } from '../sim/report/html.js';
import { validateScenario } from '../machines/scenario.js';
import { runCase, syntheticCase } from '../src/case.js';
import { withLaunchedRanks, type CliRun } from './localRanks.js';
import type { ReportInput } from '../machines/record.js';
import { mergeRankRecordsIn } from '../actors/rankRecord.js';
import { helpAsked, parse } from './args.js';

const HELP = `usage: ep-actors demo [--report FILE]

The tour: run the EP layer for real on 4 worker-thread ranks, then simulate a rank that
receives no tokens, first with the seed's safety (passes), then without it (hangs: caught
at once and explained), write the HTML report of the hang, and run the same bug on four
processes placed as a launcher places them (each rank stops at once, naming the culprit).

  --report FILE   where to write the report (default ./ep-actors-report.html)`;

export async function main(argv: string[]): Promise<number> {
  const { values } = parse(argv, { report: { type: 'string' } }, HELP);
  if (helpAsked(values, HELP)) return 0;
  const reportPath = resolve(typeof values.report === 'string' ? values.report : 'ep-actors-report.html');

  console.log('1. A real EP step: ep=4, 8 experts, top-2, SwiGLU, each rank a worker thread');
  const data = syntheticCase({ ep: 4, numExperts: 8, topK: 2, dim: 32, hidden: 64, activation: 'silu', packed: true, gradientScale: false, dtype: 'f32', tokensPerRank: [48, 32, 0, 64] }, 7);
  const t0 = performance.now();
  const result = await runCase(data, { runRanks: actorRanks() });
  console.log(`   forward + backward in ${(performance.now() - t0).toFixed(0)} ms (threads started included)`);
  result.ranks.forEach((r, rank) => console.log(`   rank ${rank}: ${data.ranks[rank]!.x_TD.shape[0]} tokens, sent ${r.rowsSent} rows, received ${r.rowsReceived}, |out| = ${norm(r.out_TD.data).toFixed(4)}`));

  const hazard = { ep: 4, experts: 8, topK: 2, tokens: 16, routing: 'starve:1' };
  console.log(`\n2. The seed on a zero-token rank (routing starve:1: nothing is routed to rank 1's experts)`);
  const seed = await runActors(validateScenario({ ...hazard, variant: 'seed' }));
  console.log(indent(formatDiagnosis(seed.diagnosis)));

  console.log(`\n3. The same scenario without received_tokens.sum()*0 (variant no-dispatch-edge)`);
  const scenario = validateScenario({ ...hazard, variant: 'no-dispatch-edge' });
  const hang = await runActors(scenario);
  console.log(indent(formatDiagnosis(hang.diagnosis)));

  await writeFile(reportPath, renderReport(reportFromRun(scenario, hang)));
  console.log(`\n4. Report of the hang: ${reportPath}`);

  console.log(`\n5. The same bug on 4 real processes, placed as torchrun places them (ep-actors rank: shared memory on this host, TCP across hosts)`);
  const { ranks, merged } = await productionHang();
  // A rank's last line says how it ended (the ones before say it connected).
  ranks.forEach((r, rank) => console.log(`   rank ${rank}: exit ${r.code}  ${lastLine(r.code === 0 ? r.stdout : r.stderr).replace(/^ep-actors rank \d+: /, '').replace(/ \(record: .*\)$/, '').replace(/; wrote .*$/, '')}`));
  const stopped = ranks.filter((r) => r.code === 2).length;
  const d = merged.diagnosis;
  const h = hang.diagnosis;
  const same = d.verdict === h.verdict && d.communicator === h.communicator && d.position === h.position && d.culprits.join() === h.culprits.join();
  const where = (x: typeof d) => `${x.verdict.toUpperCase()} on ${x.communicator}, position ${x.position}, culprit ${x.culprits.map((r) => `rank ${r}`).join(', ')}`;
  console.log(`   their records merged (viz report --ranks): ${where(d)}, ${same ? 'as simulated' : `but the simulation says ${where(h)}`}${d.detectedAfterMs === undefined ? '' : `; the first rank stopped ${d.detectedAfterMs.toFixed(1)} ms after the evidence existed`}`);

  const caught = seed.diagnosis.verdict === 'ok' && h.verdict !== 'ok' && stopped === 3 && same;
  console.log(caught ? '\nThe seed passes and the hazard is caught, in simulation and on real processes: demo ok.' : '\nUnexpected verdicts: see above.');
  return caught ? 0 : 1;
}

/** Four `ep-actors rank` processes on a case whose rank 1 receives no tokens, running no-dispatch-edge, and their records merged. */
export function productionHang(): Promise<{ ranks: CliRun[]; merged: ReportInput }> {
  const data = syntheticCase({ ep: 4, numExperts: 8, topK: 2, dim: 32, hidden: 64, activation: 'silu', packed: true, gradientScale: false, dtype: 'f32', tokensPerRank: [16, 16, 16, 16], starvedRanks: [1] }, 11);
  return withLaunchedRanks({ case: data }, ['--variant', 'no-dispatch-edge', '--timeout', '60000'], { timeoutMs: 120_000 }, async (ranks, dir) => ({ ranks, merged: await mergeRankRecordsIn(dir) }));
}

const lastLine = (text: string) => text.trim().split('\n').at(-1) ?? '';
const norm = (xs: ArrayLike<number>) => Math.sqrt(Array.from(xs).reduce((a, x) => a + x * x, 0));
const indent = (s: string) => s.replace(/^/gm, '   ');
