// `ep-actors run --case F --out F [--json]`: the EP layer, forward and backward, on the
// inputs of a case file; results are written to a new safetensors file.
import { resolve } from 'node:path';
import { helpAsked, noPositionals, outputFile, parse, requiredString } from './args.js';
import { UsageError } from '../src/errors.js';
import { caseMetadata, loadCase, resultTensors, runCase } from '../src/case.js';
import { writeSafetensorsFileAtomic } from '../src/codec/safetensors.js';
import { chooseBackend, loadBackend } from '../src/backends.js';
import { parseExchange } from '../actors/exchanges.js';
import { actorRanks } from '../actors/caseRanks.js';
import { inProcessRanks } from '../actors/inprocess.js';

const HELP = `usage: ep-actors run --case FILE --out FILE [--json] [--in-process] [--backend ts|native|cuda]
                      [--exchange ports|shared|device-copy|nccl]

Run the EP layer (KempnerForge's ep_dispatch_and_compute) forward and backward on the
inputs of a case file, each EP rank a worker-thread actor under its rank machine.

  --case FILE   safetensors case: experts.up_w [E,D,H], experts.down_w [E,H,D],
                experts.gate_w [E,D,H] (silu only), rank{r}.x [T_r,D],
                rank{r}.weights [T_r,K], rank{r}.indices [T_r,K] (i64), rank{r}.grad_out [T_r,D];
                metadata ep, num_experts, top_k, dim, hidden, activation (silu|gelu|relu),
                packed (true|false), gradient_scale (true|false); floats all f32, f64, bf16
                or f16 (bf16 and f16 are computed in f32)
  --out FILE    results: rank{r}.out, rank{r}.grad_x, rank{r}.grad_weights and the expert
                grads grad.up_w, grad.down_w, grad.gate_w over all experts (packed layout);
                written atomically, nothing is written when the case is invalid
  --json        print one JSON object instead of the summary
  --in-process  run the ranks as async tasks in one thread instead of worker threads
  --backend B   expert kernels: ts (TypeScript), native (the C++ addon) or cuda; by default
                native where the addon loaded, else ts (with a note on stderr)
  --exchange X  how worker ranks move all-to-all data: ports (msgpack over MessagePorts,
                the default), shared (staged in host shared memory), device-copy (staged in
                one GPU's memory: several ranks on one GPU) or nccl (one GPU per rank)
  -h, --help    this text

exit codes: 0 ok, 1 bad usage or an invalid case (one line names the tensor or key)`;

export async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parse(
    argv,
    { case: { type: 'string' }, out: { type: 'string' }, json: { type: 'boolean' }, 'in-process': { type: 'boolean' }, backend: { type: 'string' }, exchange: { type: 'string' } },
    HELP,
  );
  if (helpAsked(values, HELP)) return 0;
  noPositionals(positionals, HELP);
  const casePath = resolve(requiredString(values, 'case', HELP));
  requiredString(values, 'out', HELP);
  const outPath = outputFile(values, 'out')!; // checked before the run: a bad folder must not cost it

  const { name: backend, fallback } = await chooseBackend(values.backend);
  const kernels = await loadBackend(backend); // fails in one line when it cannot run here
  if (fallback) console.error(`note: ${fallback}`);
  const exchange = parseExchange(values.exchange);
  if (values['in-process'] && values.exchange !== undefined) throw new UsageError('--exchange chooses how worker ranks exchange; --in-process ranks share one thread');

  const data = await loadCase(casePath);
  const result = values['in-process']
    ? await runCase(data, { runRanks: inProcessRanks, backend: kernels })
    : await runCase(data, { runRanks: actorRanks({ backend, exchange }) });
  const tensors = resultTensors(result);
  await writeSafetensorsFileAtomic(outPath, tensors, caseMetadata(data.meta));

  const { meta } = data;
  const summary = {
    case: casePath,
    out: outPath,
    ep: meta.ep,
    numExperts: meta.numExperts,
    topK: meta.topK,
    activation: meta.activation,
    packed: meta.packed,
    gradientScale: meta.gradientScale,
    dtype: data.fileDtype,
    computedIn: data.dtype,
    backend,
    tokensPerRank: data.ranks.map((r) => r.x_TD.shape[0] ?? 0),
    rowsReceivedPerRank: result.ranks.map((r) => r.rowsReceived),
    tensors: [...tensors.keys()],
  };
  if (values.json) {
    console.log(JSON.stringify(summary));
  } else {
    const layout = meta.packed ? 'packed' : 'unpacked';
    console.log(`ran ${casePath}: ep=${meta.ep}, ${meta.numExperts} experts, top-${meta.topK}, ${meta.activation} (${layout}, ${data.fileDtype === data.dtype ? data.dtype : `${data.fileDtype} computed in ${data.dtype}`})${meta.gradientScale ? ', gradient scale on' : ''}, ${backend} kernels`);
    console.log(`  tokens per rank:        ${summary.tokensPerRank.join(' ')}`);
    console.log(`  rows received per rank: ${summary.rowsReceivedPerRank.join(' ')}`);
    console.log(`wrote ${outPath} (${tensors.size} tensors)`);
  }
  return 0;
}
