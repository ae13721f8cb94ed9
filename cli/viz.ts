// `ep-actors viz machine|report`: the rank machine exported as Mermaid, DOT, SCXML or JSON,
// and the self-contained HTML report from a trace file or from launched ranks' records.
import { readFile, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { helpAsked, parse, requiredString } from './args.js';
import { UsageError } from '../src/errors.js';
import { rankMachine } from '../machines/rankMachine.js';
import { EXPORT_FORMATS, exportMachine, liveUnder, machineGraph, rankContexts, type ExportFormat } from '../machines/exporters.js';
import { isVariantName, makeVariant, VARIANT_NAMES } from '../machines/variants.js';
import { fromTraceFile } from '../sim/report/input.js';
import { diagnoseEvidence } from './diagnose.js';
import { renderReport } from '../sim/report/html.js';

const HELP = `usage: ep-actors viz machine [--format mermaid|dot|scxml|json] [--variant V] [--out FILE]
       ep-actors viz report TRACE.json --html OUT.html
       ep-actors viz report --ranks DIR --html OUT.html [--trace OUT.json] [--json]

viz machine   the rank machine, generated from its definition: every state (nested and
              final), every transition with its event (or none: eventless), guard and
              actions, and each collective state's op and communicator
  --format F  mermaid (stateDiagram-v2, default), dot (Graphviz), scxml, json
  --variant V mark the transitions no guard can take under variant V
              (${VARIANT_NAMES.join(', ')})
  --out FILE  write to FILE instead of stdout

viz report    one self-contained HTML file (no network at view time): the machine with
              each rank's path, the per-communicator ledger with its first divergence,
              a timeline with a lane per rank, the wait-for graph and the expert load
  TRACE.json  a Chrome trace as \`ep-actors sim --trace\` writes it:
              {traceEvents: [...], epActors: {scenario, diagnosis, ledger, paths, routing}}
              (it opens in Perfetto as it is)
  --ranks DIR the rank{r}.record.json files \`ep-actors rank\` wrote (one per rank):
              their collectives are replayed through the supervisor's ledger, so a run
              of launched processes gets the verdict and diagnosis a simulation gives
              (printed; --json: as one JSON object), and its report; a rank with no
              record died (a crash). The same as \`ep-actors diagnose DIR --html FILE\`
  --trace F   with --ranks: also write the merged Chrome trace
  --html FILE the report to write

exit codes: 0 ok, 1 bad usage or an unreadable trace`;

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse(
    argv,
    { format: { type: 'string' }, variant: { type: 'string' }, out: { type: 'string' }, html: { type: 'string' }, ranks: { type: 'string' }, trace: { type: 'string' }, json: { type: 'boolean' } },
    HELP,
  );
  if (helpAsked(values, HELP)) return 0;
  const [what, ...rest] = positionals;
  if (what === 'machine') {
    if (rest.length) throw new UsageError(`unexpected argument '${rest[0]}'\n\n${HELP}`);
    const format = (values.format ?? 'mermaid') as string;
    if (!EXPORT_FORMATS.includes(format as ExportFormat)) throw new UsageError(`--format must be one of ${EXPORT_FORMATS.join(', ')}, got '${format}'`);
    let graph = machineGraph(rankMachine);
    if (values.variant !== undefined) {
      const v = String(values.variant);
      if (!isVariantName(v)) throw new UsageError(`unknown variant '${v}'; one of ${VARIANT_NAMES.join(', ')}`);
      graph = liveUnder(graph, rankMachine, rankContexts(makeVariant(v)), v);
    }
    const text = exportMachine(graph, format as ExportFormat);
    if (typeof values.out === 'string') await writeFile(resolve(values.out), text);
    else process.stdout.write(text);
    return 0;
  }
  if (what === 'report' && typeof values.ranks === 'string') {
    if (rest.length) throw new UsageError(`viz report --ranks takes no trace file\n\n${HELP}`);
    const html = requiredString(values, 'html', HELP);
    // `ep-actors diagnose DIR` renders it; viz's exit code says only that the report was written.
    await diagnoseEvidence([values.ranks], { html, json: values.json === true, trace: typeof values.trace === 'string' ? values.trace : undefined });
    return 0;
  }
  if (what === 'report') {
    if (rest.length !== 1) throw new UsageError(`viz report takes one trace file\n\n${HELP}`);
    if (typeof values.html !== 'string') throw new UsageError(`--html is required\n\n${HELP}`);
    const path = resolve(rest[0]!);
    let json: unknown;
    try {
      json = JSON.parse(await readFile(path, 'utf8'));
    } catch (e) {
      throw new UsageError(`cannot read trace ${path}: ${(e as Error).message}`);
    }
    const html = renderReport(fromTraceFile(json, path));
    await writeFile(resolve(values.html), html);
    console.log(`report: ${resolve(values.html)} (${(Buffer.byteLength(html) / 1024).toFixed(1)} KiB)`);
    return 0;
  }
  throw new UsageError(`viz needs 'machine' or 'report'${what ? `, got '${what}'` : ''}\n\n${HELP}`);
}

