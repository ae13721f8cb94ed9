// The pp × dp × ep mesh: where a global rank sits (rank = (ppRank · dp + dpRank) · ep + epRank,
// pipeline stages outermost, as Megatron places them) and the communicators it belongs to.
// With pp = 1 the numbering and the communicators are the dp × ep mesh's. Every engine, the
// transports and the reports read the mesh here, so its arithmetic is written once.

export interface Mesh {
  readonly ep: number;
  readonly dp: number;
  /** Pipeline stages (absent: 1). */
  readonly pp?: number;
}

/** The parallel dimensions a rank machine issues collectives on. */
export type CommKind = 'ep' | 'dp' | 'pp';
export const COMM_KINDS: readonly CommKind[] = ['ep', 'dp', 'pp'];

export interface CommunicatorSpec {
  readonly id: string;
  /** 'group': a process group read from a post-mortem dump that is not one of the mesh's. */
  readonly kind: CommKind | 'group';
  /** Global ranks in group-rank order. */
  readonly members: readonly number[];
}

type Coords = Record<CommKind, number>;

export const ppOf = (mesh: Mesh): number => mesh.pp ?? 1;
const sizes = (mesh: Mesh): Coords => ({ ep: mesh.ep, dp: mesh.dp, pp: ppOf(mesh) });

export const epRankOf = (mesh: Pick<Mesh, 'ep'>, rank: number): number => rank % mesh.ep;
export const dpRankOf = (mesh: Pick<Mesh, 'ep' | 'dp'>, rank: number): number => Math.floor(rank / mesh.ep) % mesh.dp;
export const ppRankOf = (mesh: Pick<Mesh, 'ep' | 'dp'>, rank: number): number => Math.floor(rank / (mesh.ep * mesh.dp));
const coordsOf = (mesh: Mesh, rank: number): Coords => ({ ep: epRankOf(mesh, rank), dp: dpRankOf(mesh, rank), pp: ppRankOf(mesh, rank) });
const rankAt = (mesh: Mesh, c: Coords): number => (c.pp * mesh.dp + c.dp) * mesh.ep + c.ep;

export const worldSize = (mesh: Mesh): number => mesh.ep * mesh.dp * ppOf(mesh);

/**
 * One `kind` group per position in the other dimensions: ep groups, then dp groups (dp > 1),
 * then pp groups (pp > 1), each kind in the order of its lowest member.
 */
export function communicators(mesh: Mesh): CommunicatorSpec[] {
  const n = sizes(mesh);
  const out: CommunicatorSpec[] = [];
  for (const kind of COMM_KINDS) {
    if (kind !== 'ep' && n[kind] < 2) continue;
    for (let base = 0; base < worldSize(mesh); base++) {
      // Each group once: from its member at coordinate 0 in its own dimension.
      const at = coordsOf(mesh, base);
      if (at[kind] !== 0) continue;
      const members = Array.from({ length: n[kind] }, (_, i) => rankAt(mesh, { ...at, [kind]: i }));
      out.push({ id: commId(mesh, kind, at), kind, members });
    }
  }
  return out;
}

/**
 * `kind` and the coordinates of the dimensions it does not span that have more than one
 * index: 'ep', 'ep[dp=1]', 'dp[ep=2]', 'pp[dp=0,ep=3]', 'ep[dp=1,pp=0]'.
 */
function commId(mesh: Mesh, kind: CommKind, at: Coords): string {
  const n = sizes(mesh);
  const where = (['dp', 'ep', 'pp'] as const).filter((k) => k !== kind && n[k] > 1).map((k) => `${k}=${at[k]}`);
  return where.length ? `${kind}[${where.join(',')}]` : kind;
}

/** The id of the `kind` communicator that global rank `rank` belongs to. */
export function commOf(mesh: Mesh, rank: number, kind: CommKind): string {
  return commId(mesh, kind, coordsOf(mesh, rank));
}
