// The rank actor inside a worker: the rank machine running as an xstate actor, answering
// the EP layer's protocol hooks. The real layer code asks it before every collective; the
// machine's state says whether the rank issues it, skips it (a guard removed it), or whether
// the call is one the protocol does not allow here (a violation). Collectives outside the
// EP layer (FSDP on the data-parallel communicator, the step's metric all-reduce) are
// issued by the driver itself.
import { createActor, getInitialMicrosteps, type Actor, type InspectionEvent } from 'xstate';
import { rankMachine, type RankConfig } from '../machines/rankMachine.js';
import { collectiveDtype, statePath, type IssuedCollective, type RankSnapshot } from '../machines/snapshot.js';
import { admission, completedEvent, computedEvent, describeAction, nextAction, routedEvent, type FirstReady } from '../machines/driver.js';
import type { LayerProtocol } from '../src/ep/layer.js';
import type { CollectiveTag } from '../src/ep/types.js';
import { Tensor, toIndexArray } from '../src/tensor.js';
import type { MeshCommunicator } from './transport.js';
import type { CommKind } from '../machines/mesh.js';
import { now, type Fault, type SnapshotWire, type WorkerMessage } from './messages.js';

export class ProtocolViolation extends Error {
  override name = 'ProtocolViolation';
}

export class RankDriver implements LayerProtocol {
  private readonly actor: Actor<typeof rankMachine>;
  private readonly record: boolean;
  /** Microstep paths not yet sent to the supervisor. */
  private paths: string[] = [];
  /** Set by fault injection: what goes wrong when the layer reaches an op. */
  fault: Extract<Fault, { kind: 'throw' | 'stall' | 'garbage-to-supervisor' }> | null = null;

  constructor(
    readonly cfg: RankConfig,
    /** The scenario's completion orders (variant completion-order), as every engine follows them. */
    private readonly firstReady: FirstReady,
    private readonly comms: Readonly<Record<CommKind, MeshCommunicator | null>>,
    private readonly post: (m: WorkerMessage) => void,
    inspect: boolean,
    record = true,
  ) {
    // Paths record every microstep (eventless choice states too), as the engine's reports do.
    // They are batched and go out ahead of the rank's next message to the supervisor, so a
    // large run does not flood the supervisor with one message per microstep.
    const onInspect = (ev: InspectionEvent) => {
      if (record && ev.type === '@xstate.microstep') this.paths.push(statePath(ev.snapshot as RankSnapshot));
      if (inspect) this.post({ type: 'inspect', rank: cfg.rank, event: inspectionJson(ev) });
    };
    this.record = record;
    this.actor = createActor(rankMachine, { input: cfg, inspect: record || inspect ? onInspect : undefined });
    if (record) for (const [snap] of getInitialMicrosteps(rankMachine, cfg)) this.paths.push(statePath(snap));
    this.actor.start();
  }

  get snapshot(): RankSnapshot {
    return this.actor.getSnapshot();
  }

  /** 'done' or 'exited' once the machine reached a final state, else null. */
  get finished(): 'done' | 'exited' | null {
    const s = this.snapshot;
    if (s.status !== 'done') return null;
    return statePath(s) === 'exited' ? 'exited' : 'done';
  }

  /** Send the paths recorded since the last message (before any message that changes the supervisor's view). */
  flushPaths(): void {
    if (!this.record || this.paths.length === 0) return;
    this.post({ type: 'paths', rank: this.cfg.rank, paths: this.paths });
    this.paths = [];
  }

  wire(): SnapshotWire {
    const s = this.snapshot;
    return { value: s.value, context: s.context };
  }

  async routed(tokens: number, sendCounts: readonly number[]): Promise<void> {
    await this.drainOwnCollectives();
    this.expect('route', 'routing a layer');
    this.actor.send(routedEvent(tokens, sendCounts));
  }

  async admit(tag: CollectiveTag): Promise<boolean> {
    const f = this.fault;
    if (f && f.op === tag.op && (f.kind !== 'throw' || f.layer === undefined || f.layer === tag.layer)) {
      this.fault = null;
      if (f.kind === 'throw') throw new Error(`injected fault: rank ${this.cfg.rank} throws in ${tag.op} of layer ${tag.layer}`);
      if (f.kind === 'stall') return new Promise<never>(() => {});
      this.post({ type: 'issue', rank: this.cfg.rank } as unknown as WorkerMessage);
    }
    await this.drainOwnCollectives();
    const a = admission(this.snapshot, tag);
    if (a.kind === 'violation') throw this.violation(a.message);
    if (a.kind === 'skip') return false;
    this.announce(a.collective);
    return true;
  }

  async completed(tag: CollectiveTag, received: Tensor): Promise<void> {
    const { numExperts, ep, epRank } = this.cfg;
    const nLocal = numExperts / ep;
    this.actor.send(
      completedEvent(tag.op, {
        recvCounts: () => Array.from(received.data as BigInt64Array, Number),
        rowsPerExpert: () => {
          const rows = new Array<number>(nLocal).fill(0);
          for (const e of toIndexArray(received, 'received expert ids')) rows[e - epRank * nLocal]!++;
          return rows;
        },
      }),
    );
    this.post({ type: 'completed', rank: this.cfg.rank, op: tag.op, next: describeAction(nextAction(this.snapshot)), at: now() });
  }

  async computed(phase: 'forward' | 'backward'): Promise<void> {
    await this.drainOwnCollectives();
    this.expect('compute', `finishing the ${phase} expert compute`);
    this.actor.send(computedEvent(this.snapshot, this.firstReady));
  }

  /**
   * Before the layer's next call: issue the collectives the driver issues itself, then say
   * whether the machine ended the rank's step there (early exit, a shorter shard), so the layer is not called.
   */
  async stopped(): Promise<boolean> {
    await this.drainOwnCollectives();
    return this.finished !== null;
  }

  /** After the step's code ends: run any trailing FSDP collectives, then the machine must be final. */
  async finish(): Promise<'done' | 'exited'> {
    await this.drainOwnCollectives();
    const how = this.finished;
    if (!how) throw this.violation(`rank ${this.cfg.rank} finished its step but the protocol is still in ${statePath(this.snapshot)}`);
    this.flushPaths();
    return how;
  }

  /** Issue the collectives the driver issues itself (FSDP, the metric all-reduce) while the machine waits in one. */
  private async drainOwnCollectives(): Promise<void> {
    for (let a = nextAction(this.snapshot); a.kind === 'collective' && a.issuer === 'driver'; a = nextAction(this.snapshot)) {
      const issued = a.collective;
      const comm = this.comms[issued.comm];
      if (!comm) throw this.violation(`rank ${this.cfg.rank} must issue ${issued.op} but the mesh has no ${issued.comm} communicator`);
      this.announce(issued);
      const tag = { op: issued.op, layer: issued.layer, microBatch: issued.microBatch };
      // Stand-in payloads of the collective's size: what matters here is who issues what.
      const size = issued.size ?? 0;
      let received: Tensor;
      if (issued.op === 'fsdp.all_gather' || issued.op === 'grad.all_gather') received = await comm.allGather(tag, Tensor.zeros('f32', [Math.ceil(size / comm.size)]));
      else if (issued.op === 'fsdp.reduce_scatter') received = await comm.reduceScatter(tag, Tensor.zeros('f32', [size]));
      else received = await comm.allReduce(tag, Tensor.zeros('f32', [size]));
      await this.completed(tag, received);
    }
  }

  private announce(issued: IssuedCollective): void {
    this.flushPaths();
    this.post({ type: 'issue', rank: this.cfg.rank, collective: issued, dtype: collectiveDtype(issued.op), snapshot: this.wire(), at: now() });
  }

  private expect(kind: 'route' | 'compute', what: string): void {
    const a = nextAction(this.snapshot);
    if (a.kind !== kind) throw this.violation(`rank ${this.cfg.rank} is ${what} but the protocol is in ${statePath(this.snapshot)}`);
  }

  private violation(message: string): ProtocolViolation {
    this.flushPaths();
    this.post({ type: 'violation', rank: this.cfg.rank, message, snapshot: this.wire(), at: now() });
    return new ProtocolViolation(message);
  }
}

/** An inspection event reduced to what survives a postMessage and reads well as JSON. */
function inspectionJson(ev: InspectionEvent): unknown {
  const base = { type: ev.type, actor: ev.actorRef.sessionId };
  if (ev.type === '@xstate.event') return { ...base, event: ev.event };
  if (ev.type === '@xstate.snapshot') return { ...base, event: ev.event, value: (ev.snapshot as RankSnapshot).value };
  return base;
}
