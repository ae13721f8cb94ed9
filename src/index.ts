// Public API of ep-actors. Each area re-exports its own surface here.

export * from './tensor.js';
export * from './errors.js';
export * from './ep/types.js';

// EP layer, its communicators and case files
export { epForward, epBackward, localExpertRange, localExperts, placeLocalGrads } from './ep/layer.js';
export type { EpContext, EpSaved, EpForwardResult, EpBackwardResult } from './ep/layer.js';
export { InProcessGroup, CollectiveError, createInProcessGroup } from './ep/inprocess.js';
export { parseCase, loadCase, runCase, runRank, inProcessRanks, resultTensors, caseMetadata, syntheticCase } from './case.js';
export type { CaseMeta, CaseData, RankInputs, RankResult, CaseResult, RankLoop, RunOptions, SyntheticSpec } from './case.js';

// MoE math
export { tsBackend, erf, ACTIVATION_FNS, convertLayout, floatTensor } from './moe/experts.js';
export { softmaxTopK, sigmoidTopK, routerZLoss } from './moe/router.js';
export type { Routing, SoftmaxRouting } from './moe/router.js';
export { denseMoe } from './moe/dense.js';
export { seededRng, randInt, randomTensor, randomRouting } from './moe/random.js';
export type { Rng } from './moe/random.js';
export type { DenseResult } from './moe/dense.js';
