// One rank, wherever it runs (a worker thread under the supervisor, or a process placed
// by a launcher): it builds its communicators over its connections to its peers and its
// rank actor, and runs the real EP layer for whole training steps: every micro-batch
// forward over the layers, then backward in reverse, each collective asked of the rank
// machine first. What it reports goes to `post` (the supervisor, or the launcher's watch).
import { communicators, type CommKind } from '../machines/mesh.js';
import { firstReadyOf, rankConfig } from '../machines/scenario.js';
import { encodeMessage } from '../src/codec/msgpack.js';
import { epBackward, epForward, type EpContext, type EpSaved } from '../src/ep/layer.js';
import { ScratchPool } from '../src/ep/scratch.js';
import { loadBackend } from '../src/backends.js';
import type { Tensor } from '../src/tensor.js';
import { RankDriver } from './rankDriver.js';
import { MeshCommunicator, PortMesh, type PeerPort } from './transport.js';
import { stagingMemory } from './staging.js';
import { requireNative } from '../src/native/backend.js';
import type { Communicator, ExpertBackend } from '../src/ep/types.js';
import { hungExpert, type Variant } from '../machines/variants.js';
import { weightTensors } from '../src/moe/experts.js';
import { now, type WorkerJob, type WorkerMessage } from './messages.js';
import { rankInputs, type RankStepInputs } from './inputs.js';
import type { CaseRankOutput } from './caseRanks.js';

/**
 * ownsThread: the rank is alone on its thread (not when the thread hosts other ranks, which
 * a blocked thread would stall), so it may block it: for fast-lane chunks, and to run its
 * kernels on it.
 */
export async function runRank(job: WorkerJob, ports: ReadonlyMap<number, PeerPort>, post: (m: WorkerMessage) => void, ownsThread = true): Promise<void> {
  const s = job.scenario;
  const cfg = rankConfig(s, job.rank);
  const comms = communicators(s).filter((c) => c.members.includes(job.rank));
  const mesh = new PortMesh(job.rank, ports, comms, (message) =>
    post({ type: 'transport-error', rank: job.rank, message, at: now() }),
    ownsThread,
  );
  // The device first: the addon's per-thread CUDA stream is created on the current device.
  if (job.device !== undefined) requireNative().cudaSetDevice(job.device);
  const staging = await stagingMemory(job.exchange);
  const commOf = (kind: CommKind) => {
    const spec = comms.find((c) => c.kind === kind);
    return spec ? new MeshCommunicator(spec, job.rank, mesh, staging) : null;
  };
  const meshEp = commOf('ep');
  const dp = commOf('dp');
  const pp = commOf('pp');
  // NCCL carries the EP layer's all-to-alls when chosen; the collectives the rank machine
  // issues outside the layer (FSDP, the metric all-reduce) stay on the mesh.
  const ep = job.exchange === 'nccl' ? await ncclCommunicator(job, cfg.epRank) : meshEp;
  const inputs: RankStepInputs = rankInputs(job);
  // A rank alone on its thread runs its kernels there: handing each job to libuv's pool and
  // waking when it ends cost the EP step about 8% (docs/BENCHMARKS.md).
  const kernels = await loadBackend(job.backend, { onCallingThread: ownsThread });
  const backend = withKernelHang(cfg.variant, ownsThread ? sendingFirst(kernels, mesh) : kernels);
  // Row buffers reused across the rank's layers and steps; each forward is backpropagated once.
  const scratch = new ScratchPool();
  let how: 'done' | 'exited' = 'done';
  let driver: RankDriver | null = null;
  let output: CaseRankOutput | undefined;
  for (let step = 0; step < job.steps && how === 'done'; step++) {
    // A turn of the event loop each step: over the fast lane a whole step's collectives may
    // complete without one, and only there does a launched rank hear a signal, its peers'
    // reports and goodbyes, and its watchdog's timers.
    await new Promise((resolve) => setImmediate(resolve));
    const t0 = performance.now();
    post({ type: 'started', rank: job.rank, at: now() });
    driver = new RankDriver(cfg, firstReadyOf(s), { ep: meshEp, dp, pp }, post, job.inspect, job.record);
    for (const f of step === 0 ? job.faults : []) {
      if (f.rank !== job.rank) continue;
      if (f.kind === 'throw' || f.kind === 'stall' || f.kind === 'garbage-to-supervisor') driver.fault = f;
      else mesh.fault = { op: f.op, kind: f.kind };
    }
    const last = await runStep(job, driver, { comm: ep, backend, scratch, experts: inputs.experts, numExperts: s.experts, topK: s.topK, gradientScale: inputs.gradientScale, protocol: driver }, inputs);
    if (output) recycle(scratch, output); // only the last step's numbers are sent
    output = last;
    how = await driver.finish();
    post({ type: 'step', rank: job.rank, step, ms: performance.now() - t0 });
  }
  // Only the last step's numbers go home: encoding them every step cost a few ms per step.
  const result = output && encodeMessage(output);
  post({ type: 'finished', rank: job.rank, how, snapshot: driver!.wire(), result, at: now() });
}

/** Kernels that may block the thread: what the rank's connections hold back leaves first. */
function sendingFirst(backend: ExpertBackend, mesh: PortMesh): ExpertBackend {
  return {
    name: backend.name,
    forward: (w, x, rows, scratch) => {
      mesh.sendNow();
      return backend.forward(w, x, rows, scratch);
    },
    backward: (w, x, rows, fwd, gradY, scratch) => {
      mesh.sendNow();
      return backend.backward(w, x, rows, fwd, gradY, scratch);
    },
  };
}

/**
 * Under kernel-hang, the expert backward as an unpadded grouped GEMM: when a local expert
 * received no rows its K = 0 GEMM never returns (torchtitan #1118), so the layer's backward
 * awaits forever and only the supervisor's compute limit (or a launcher's watchdog) ends it.
 */
function withKernelHang(variant: Variant, backend: ExpertBackend): ExpertBackend {
  if (!variant.kernelHang) return backend;
  return {
    name: backend.name,
    forward: (w, x, rows, scratch) => backend.forward(w, x, rows, scratch),
    // A hung kernel keeps its thread alive: a timer that holds the event loop, not a bare pending promise.
    backward: (w, x, rows, fwd, gradY, scratch) =>
      hungExpert(variant, rows) === null ? backend.backward(w, x, rows, fwd, gradY, scratch) : new Promise<never>(() => setInterval(() => {}, 2 ** 30)),
  };
}

async function ncclCommunicator(job: WorkerJob, epRank: number): Promise<Communicator> {
  if (!job.ncclId || job.device === undefined) throw new Error(`rank ${job.rank}: the nccl exchange needs a unique id and a device from the supervisor`);
  const { NcclCommunicator } = await import('../src/native/nccl.js');
  return NcclCommunicator.init({ id: job.ncclId, rank: epRank, size: job.scenario.ep, device: job.device });
}

/** One training step: every micro-batch forward over the stage's MoE layers, then backward in reverse. */
async function runStep(job: WorkerJob, driver: RankDriver, base: Omit<EpContext, 'layer' | 'microBatch'>, inputs: RankStepInputs): Promise<CaseRankOutput | undefined> {
  const s = job.scenario;
  // Case runs (one layer, one micro-batch) send their numbers home; generated steps only their verdict.
  let output: CaseRankOutput | undefined;

  step: for (let mb = 0; mb < s.microBatches; mb++) {
    const saved: { ctx: EpContext; saved: EpSaved; out: Tensor }[] = [];
    for (let layer = 0; layer < driver.cfg.layers; layer++) {
      if (await driver.stopped()) break step; // the machine stopped this rank (early exit, a shorter shard)
      const ctx: EpContext = { ...base, layer, microBatch: mb };
      const { weights_TK, indices_TK } = inputs.routing(mb, layer);
      const fwd = await epForward(ctx, inputs.x(mb, layer), weights_TK, indices_TK);
      saved.push({ ctx, saved: fwd.saved, out: fwd.out_TD });
    }
    if (await driver.stopped()) break;
    for (let layer = driver.cfg.layers - 1; layer >= 0; layer--) {
      const { ctx, saved: sv, out } = saved[layer]!;
      const bwd = await epBackward(ctx, sv, inputs.gradOut(mb, layer));
      const numbers = { out, gradX: bwd.gradX_TD, gradWeights: bwd.gradWeights_TK, grads: bwd.grads };
      if (!job.casePayload) recycle(base.scratch, numbers);
      else {
        if (output) recycle(base.scratch, output);
        output = { ...numbers, rowsSent: sv.sortOrder_S.length, rowsReceived: sv.byExpert_R.length };
      }
    }
  }
  return output;
}

/**
 * A layer's outputs nothing reads any more (the step trains nothing with them, and only the
 * last step's go home) back to the pool they came from: fresh ones each step meant about
 * 7 MB of new buffers per rank and step, and the garbage collections they start.
 */
function recycle(scratch: ScratchPool | undefined, numbers: Pick<CaseRankOutput, 'out' | 'gradX' | 'gradWeights' | 'grads'>): void {
  scratch?.give(numbers.out, numbers.gradX, numbers.gradWeights, ...weightTensors(numbers.grads));
}
