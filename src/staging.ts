// What a staged exchange's memory offers (actors/staging.ts): here in src so the memories
// that live in src (the GPU's, src/native/cuda.ts) implement it without importing actors.

/** A staged region as a peer receives it: a SharedArrayBuffer, or a device pointer of this process. */
export type StagedHandle = SharedArrayBuffer | bigint;

/** Where a receiver finds one piece of its result. */
export type Piece = { readonly handle: StagedHandle; readonly offset: number; readonly bytes: number } | { readonly local: Uint8Array };

export interface StagingMemory {
  readonly name: 'shared' | 'device-copy';
  /** Copies `bytes` into memory peers can read and returns its handle. */
  stage(bytes: Uint8Array): StagedHandle;
  /** Fills `out` with the pieces, in order (they add up to its length). */
  gather(out: Uint8Array, pieces: readonly Piece[]): void;
  /** Every peer is done reading the region: it may be reused or freed. */
  unstage(handle: StagedHandle): void;
  /** Whether a value a peer sent can be one of this memory's handles. */
  isHandle(value: unknown): value is StagedHandle;
}
