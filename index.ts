// Public API of ep-actors. Each area re-exports its own surface here.

export * from './src/tensor.js';
export * from './src/errors.js';
export * from './src/ep/types.js';

// EP layer, its communicators and case files
export { epForward, epBackward, localExpertRange, localExperts, placeLocalGrads } from './src/ep/layer.js';
export type { EpContext, EpSaved, EpForwardResult, EpBackwardResult } from './src/ep/layer.js';
export { parseCase, loadCase, runCase, runCaseRank, resultTensors, caseMetadata, syntheticCase, RESULT_TOLERANCE, CASE_DTYPES } from './src/case.js';
export type { CaseMeta, CaseData, RankInputs, RankResult, CaseResult, RankLoop, RunOptions, SyntheticSpec, CaseDtype } from './src/case.js';

// MoE math
export { tsBackend, erf, ACTIVATION_FNS, convertLayout, floatTensor } from './src/moe/experts.js';
export { softmaxTopK, sigmoidTopK, routerZLoss } from './src/moe/router.js';
export type { Routing, SoftmaxRouting } from './src/moe/router.js';
export { denseMoe } from './src/moe/dense.js';
export { seededRng, randInt, randomTensor, randomRouting } from './src/moe/random.js';
export type { Rng } from './src/moe/random.js';
export type { DenseResult } from './src/moe/dense.js';

// Codecs
export { encodeMessage, decodeMessage, CodecError, TENSOR_EXT_TYPES } from './src/codec/msgpack.js';
export { readSafetensors, writeSafetensors, readSafetensorsFile, writeSafetensorsFileAtomic, SafetensorsError } from './src/codec/safetensors.js';
export type { SafetensorsFile } from './src/codec/safetensors.js';
export { BACKEND_NAMES, parseBackend, loadBackend } from './src/backends.js';
export type { BackendName } from './src/backends.js';

// The protocol: the rank machine, the collective tracker, diagnoses, exporters
export { rankMachine, WRAP_POLICIES } from './machines/rankMachine.js';
export type { RankConfig, RankContext, RankEvent, Decision, WrapPolicy } from './machines/rankMachine.js';
export { VARIANT_NAMES, makeVariant } from './machines/variants.js';
export type { Variant, VariantName } from './machines/variants.js';
export { startRank, stepRank, issuedCollective, statePath } from './machines/snapshot.js';
export { CollectiveTracker } from './machines/ledger.js';
export type { LedgerEntry, Finding } from './machines/ledger.js';
export { communicators, commOf } from './machines/mesh.js';
export type { Mesh, CommunicatorSpec } from './machines/mesh.js';
export { diagnose, formatDiagnosis } from './machines/diagnosis.js';
export type { Diagnosis, VerdictKind } from './machines/diagnosis.js';
export { machineGraph, exportMachine, EXPORT_FORMATS } from './machines/exporters.js';

// Engines: the worker-thread runtime and the single-thread engine, scenarios, exploration
export { runActors } from './actors/supervisor.js';
export type { RuntimeOptions, RuntimeResult } from './actors/supervisor.js';
export { actorRanks } from './actors/caseRanks.js';
export { InProcessGroup, CollectiveError, createInProcessGroup, inProcessRanks } from './actors/inprocess.js';
export { validateScenario, DEFAULT_SCENARIO } from './machines/scenario.js';
export type { Scenario } from './machines/scenario.js';
export { simulateDes } from './sim/des.js';
export { explore } from './sim/explorer.js';
export { renderReport } from './sim/report/html.js';
export { reportFromDes } from './sim/report/fromDes.js';
