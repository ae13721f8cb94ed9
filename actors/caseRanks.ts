// Running a case file's ranks as worker-thread actors: each worker gets its rank's slice
// (msgpack), runs the EP layer under its rank machine, and sends its results home.
import type { CaseData, RankLoop, RankResult } from '../src/case.js';
import { encodeMessage, decodeMessage } from '../src/codec/msgpack.js';
import type { ExpertWeights, PackedExperts } from '../src/ep/types.js';
import { localExperts } from '../src/ep/layer.js';
import { convertLayout } from '../src/moe/experts.js';
import type { Tensor, FloatDType } from '../src/tensor.js';
import { caseScenario } from '../machines/scenario.js';
import { formatDiagnosis } from '../machines/diagnosis.js';
import type { CaseRankJob } from './inputs.js';
import { runActors, type RuntimeOptions } from './supervisor.js';

/** What a rank of a case run sends home when its step ends (actors/rankRun.ts). */
export interface CaseRankOutput {
  readonly out: Tensor;
  readonly gradX: Tensor;
  readonly gradWeights: Tensor;
  readonly grads: ExpertWeights;
  readonly rowsSent: number;
  readonly rowsReceived: number;
}

export class RuntimeVerdictError extends Error {
  override name = 'RuntimeVerdictError';
}

/** Each rank's slice of a case (its experts and tensors), msgpack-encoded for its worker. */
export function casePayloads(data: CaseData): Uint8Array[] {
  const { meta } = data;
  return data.ranks.map((r, rank) => {
    const job: CaseRankJob = {
      experts: localExperts(data.experts, meta.ep, rank) as PackedExperts<'f32'>,
      packed: meta.packed,
      gradientScale: meta.gradientScale,
      x_TD: r.x_TD as Tensor<'f32'>,
      weights_TK: r.weights_TK as Tensor<'f32'>,
      indices_TK: r.indices_TK as Tensor<'i64'>,
      gradOut_TD: r.gradOut_TD as Tensor<'f32'>,
    };
    return encodeMessage(job);
  });
}

export function actorRanks(opts: Pick<RuntimeOptions, 'backend' | 'exchange' | 'timeoutMs' | 'steps'> = {}): RankLoop {
  return async <F extends FloatDType>(data: CaseData<F>) => {
    const run = await runActors(caseScenario(data.meta), { ...opts, casePayloads: casePayloads(data) });
    if (run.diagnosis.verdict !== 'ok') throw new RuntimeVerdictError(`the case did not complete on the actor runtime:\n${formatDiagnosis(run.diagnosis)}`);
    return run.results.map((bytes, rank) => rankResult<F>(bytes, rank));
  };
}

/** A rank's results from the msgpack its step sent home (expert grads in packed layout). */
export function rankResult<F extends FloatDType>(bytes: Uint8Array | undefined, rank: number): RankResult<F> {
  if (!bytes) throw new RuntimeVerdictError(`rank ${rank} finished without sending its results`);
  const o = decodeMessage(bytes) as CaseRankOutput;
  return {
    out_TD: o.out as Tensor<F>,
    gradX_TD: o.gradX as Tensor<F>,
    gradWeights_TK: o.gradWeights as Tensor<F>,
    grads: (o.grads.layout === 'packed' ? o.grads : convertLayout(o.grads, 'packed')) as PackedExperts<F>,
    rowsSent: o.rowsSent,
    rowsReceived: o.rowsReceived,
  };
}
