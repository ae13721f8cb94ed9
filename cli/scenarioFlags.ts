// The scenario flags shared by `sim`, `check` and `sweep`: one definition, one help text,
// one validation path (sim/scenario.ts validateScenario).
import { readFile } from 'node:fs/promises';
import { loadCase } from '../src/case.js';
import { toIndexArray } from '../src/tensor.js';
import { UsageError } from '../src/errors.js';
import { checkKeys, DEFAULT_SCENARIO, SCENARIO_FIELDS, validateScenario, type Scenario } from '../machines/scenario.js';
import { ROUTING_HELP } from '../machines/routing.js';
import { worldSize } from '../machines/mesh.js';
import { VARIANT_NAMES } from '../machines/variants.js';
import { WRAP_POLICIES, type WrapPolicy } from '../machines/rankMachine.js';
import { intOption, type Options, type Parsed } from './args.js';

export const SCENARIO_OPTIONS: Options = {
  scenario: { type: 'string' },
  ep: { type: 'string' },
  dp: { type: 'string' },
  pp: { type: 'string' },
  'moe-layers': { type: 'string' },
  fsdp: { type: 'boolean' },
  wrap: { type: 'string' },
  experts: { type: 'string' },
  'top-k': { type: 'string' },
  tokens: { type: 'string' },
  dim: { type: 'string' },
  hidden: { type: 'string' },
  layers: { type: 'string' },
  'micro-batches': { type: 'string' },
  routing: { type: 'string' },
  variant: { type: 'string' },
  seed: { type: 'string' },
  unpacked: { type: 'boolean' },
  activation: { type: 'string' },
  'early-exit-rank': { type: 'string' },
  'early-exit-after': { type: 'string' },
  'capacity-factor': { type: 'string' },
  'wrong-group-rank': { type: 'string' },
  'eval-batches': { type: 'string' },
  'shared-first': { type: 'string' },
};

const d = DEFAULT_SCENARIO;
export const SCENARIO_HELP = `scenario:
  --scenario FILE        a scenario JSON (e.g. from \`check --replay\`); flags below override it
  --ep N                 expert-parallel ranks per group (default ${d.ep})
  --dp N                 data-parallel replicas (default ${d.dp})
  --pp N                 pipeline stages; world size is pp × dp × ep, stages outermost
                         (rank = (stage · dp + replica) · ep + EP rank); a pp group joins
                         each (dp, ep) position across the stages (default 1)
  --moe-layers N,N,...   MoE layers on each pipeline stage, one count per stage, 0 for a
                         dense stage (e.g. --pp 4 --moe-layers 0,1,1,0); --pp defaults to the
                         number of counts and --layers to the largest (default: --layers on
                         every stage)
  --fsdp                 FSDP2 over the dp communicator (needs --dp >= 2)
  --wrap POLICY          FSDP wrap policy: ${WRAP_POLICIES.join(' | ')} (default block)
  --experts E            experts in all (default ${d.experts}); must be divisible by --ep
  --top-k K              experts per token (default ${d.topK})
  --tokens T             tokens per rank per micro-batch (default ${d.tokens})
  --dim D, --hidden H    model and expert hidden size (default ${d.dim}, ${d.hidden})
  --layers L             MoE layers per step on every stage (default ${d.layers})
  --micro-batches M      micro-batches per step (default ${d.microBatches})
  --routing G            ${ROUTING_HELP} | case:FILE.safetensors (default ${d.routing})
                         case:FILE takes the layout (ep, experts, top-k) and every rank's
                         rank{r}.indices from a case file, for every layer and micro-batch
  --variant V            ${VARIANT_NAMES.join(' | ')} (default ${d.variant})
  --seed S               routing and data seed (default ${d.seed})
  --unpacked             unpacked experts (one Linear per projection) instead of packed
  --activation A         silu | gelu | relu (default ${d.activation})
  --early-exit-rank R, --early-exit-after N   early-exit: which EP rank stops, after N layer calls
  --capacity-factor F    local-capacity: capacity factor (default 1)
  --wrong-group-rank R   wrong-group: the EP rank that gathers on its dp communicator (default ep-1)
  --eval-batches N       uneven-batches: evaluation batches sharded over a stage's dp × ep ranks
                         (default dp · ep · micro-batches − 1)
  --shared-first R,R,... second-stream: these global ranks issue the shared expert's all-gather
                         before fwd.combine in every layer call, the others after ('none': no
                         rank); default: each rank and layer call drawn from --seed`;

/** The scenario the flags describe (a --scenario file first, flags on top), validated. */
export async function scenarioFromFlags(v: Parsed['values']): Promise<Scenario> {
  let base: Partial<Scenario> = {};
  if (typeof v.scenario === 'string') {
    try {
      base = JSON.parse(await readFile(v.scenario, 'utf8')) as Partial<Scenario>;
    } catch (err) {
      throw new UsageError(`--scenario ${v.scenario}: ${(err as Error).message}`);
    }
    if (!base || typeof base !== 'object' || Array.isArray(base)) throw new UsageError(`--scenario ${v.scenario}: not a scenario object`);
    checkKeys(base, SCENARIO_FIELDS, `--scenario ${v.scenario}: `);
  }
  const int = (flag: string, key: keyof Scenario, min = 1) => {
    if (v[flag] !== undefined) (base as Record<string, unknown>)[key] = intOption(v[flag], flag, undefined, min);
  };
  int('ep', 'ep');
  int('dp', 'dp');
  int('pp', 'pp');
  int('experts', 'experts');
  int('top-k', 'topK');
  int('tokens', 'tokens', 0);
  int('dim', 'dim');
  int('hidden', 'hidden');
  int('layers', 'layers');
  int('micro-batches', 'microBatches');
  int('seed', 'seed', 0);
  int('early-exit-rank', 'earlyExitRank', 0);
  int('early-exit-after', 'earlyExitAfterLayers', 0);
  int('wrong-group-rank', 'wrongGroupRank', 0);
  int('eval-batches', 'evalBatches');
  if (v['moe-layers'] !== undefined) base.moeLayers = countList(v['moe-layers'], 'moe-layers', 'MoE layer counts, one per pipeline stage (e.g. 0,1,1,0)');
  if (typeof v.routing === 'string' && v.routing.startsWith('case:')) {
    // The case file fixes the layout; a flag that would change it silently loses.
    const clash = CASE_LAYOUT_FLAGS.find((f) => v[f] !== undefined);
    if (clash) throw new UsageError(`--${clash} conflicts with --routing ${v.routing}: the case file sets the layout (${CASE_LAYOUT_FLAGS.map((f) => `--${f}`).join(', ')})`);
    Object.assign(base, await routingFromCase(v.routing.slice(5), base));
  } else if (typeof v.routing === 'string') base.routing = v.routing;
  if (typeof v.variant === 'string') base.variant = v.variant as Scenario['variant'];
  if (typeof v.activation === 'string') {
    if (!['silu', 'gelu', 'relu'].includes(v.activation)) throw new UsageError(`--activation must be silu, gelu or relu, got '${v.activation}'`);
    base.activation = v.activation as Scenario['activation'];
  }
  if (v.unpacked) base.packed = false;
  if (v['capacity-factor'] !== undefined) {
    const f = Number(v['capacity-factor']);
    if (!(f > 0)) throw new UsageError(`--capacity-factor must be a positive number, got '${String(v['capacity-factor'])}'`);
    base.capacityFactor = f;
  }
  // A variant's knobs would be ignored under another variant: say so rather than run without them.
  for (const [flag, variant] of VARIANT_FLAGS) {
    if (v[flag] !== undefined && (base.variant ?? DEFAULT_SCENARIO.variant) !== variant) throw new UsageError(`--${flag} applies to --variant ${variant}`);
  }
  if (v.wrap !== undefined && !v.fsdp) throw new UsageError('--wrap needs --fsdp');
  if (v.fsdp) base.fsdp = (typeof v.wrap === 'string' ? v.wrap : 'block') as WrapPolicy;
  if (v['shared-first'] === undefined) return validateScenario(base);
  // The order table needs the layout's size: from the scenario as validated without it.
  const first = v['shared-first'] === 'none' ? [] : countList(v['shared-first'], 'shared-first', "global ranks (or 'none')");
  const s = validateScenario({ ...base, streamOrder: undefined });
  const bad = first.find((r) => r >= worldSize(s));
  if (bad !== undefined) throw new UsageError(`--shared-first: rank ${bad} is outside the scenario's ranks 0..${worldSize(s) - 1}`);
  const calls = s.layers * s.microBatches;
  return validateScenario({ ...base, streamOrder: Array.from({ length: worldSize(s) }, (_, r) => Array.from({ length: calls }, () => (first.includes(r) ? 'shared.all_gather' : 'fwd.combine'))) });
}

/** `0,1,1,0`: non-negative integers, comma-separated. */
function countList(value: unknown, flag: string, what: string): number[] {
  if (typeof value !== 'string' || !/^\d+(,\d+)*$/.test(value)) throw new UsageError(`--${flag} must be comma-separated ${what}, got '${String(value)}'`);
  return value.split(',').map(Number);
}

/** Flags that only a variant reads. */
const VARIANT_FLAGS = [
  ['early-exit-rank', 'early-exit'],
  ['early-exit-after', 'early-exit'],
  ['capacity-factor', 'local-capacity'],
  ['wrong-group-rank', 'wrong-group'],
  ['eval-batches', 'uneven-batches'],
  ['shared-first', 'second-stream'],
] as const;

/** The flags whose values `--routing case:FILE` takes from the file. */
const CASE_LAYOUT_FLAGS = ['ep', 'dp', 'pp', 'moe-layers', 'experts', 'top-k', 'tokens', 'dim', 'hidden', 'activation', 'unpacked'] as const;

/** Layout and explicit routing from a case file: its rank{r}.indices for every layer and micro-batch. */
async function routingFromCase(path: string, base: Partial<Scenario>): Promise<Partial<Scenario>> {
  let data;
  try {
    data = await loadCase(path);
  } catch (err) {
    throw new UsageError(`--routing case:${path}: ${(err as Error).message}`);
  }
  const { meta } = data;
  const layers = base.layers ?? DEFAULT_SCENARIO.layers;
  const microBatches = base.microBatches ?? DEFAULT_SCENARIO.microBatches;
  const explicit = data.ranks.map((r) => {
    const ids = Array.from(toIndexArray(r.indices_TK, 'indices'));
    return Array.from({ length: microBatches }, () => Array.from({ length: layers }, () => ids));
  });
  return {
    ep: meta.ep,
    dp: 1,
    experts: meta.numExperts,
    topK: meta.topK,
    dim: meta.dim,
    hidden: meta.hidden,
    activation: meta.activation,
    packed: meta.packed,
    tokens: Math.max(0, ...data.ranks.map((r) => r.indices_TK.shape[0] ?? 0)),
    routing: 'explicit',
    explicit,
  };
}
