// The dp × ep mesh: where a global rank sits (rank = dpRank · ep + epRank) and the
// communicators it belongs to. Every engine, the transports and the reports read the
// mesh here, so its arithmetic is written once.

export interface Mesh {
  readonly ep: number;
  readonly dp: number;
}

export interface CommunicatorSpec {
  readonly id: string;
  /** 'group': a process group read from a post-mortem dump that is not one of the mesh's. */
  readonly kind: 'ep' | 'dp' | 'group';
  /** Global ranks in group-rank order. */
  readonly members: readonly number[];
}

/** An ep group per dp index, a dp group per ep index (global rank g = dpRank · ep + epRank). */
export function communicators(mesh: Mesh): CommunicatorSpec[] {
  const out: CommunicatorSpec[] = [];
  for (let d = 0; d < mesh.dp; d++) {
    out.push({ id: commId(mesh, 'ep', d), kind: 'ep', members: Array.from({ length: mesh.ep }, (_, e) => d * mesh.ep + e) });
  }
  if (mesh.dp > 1) {
    for (let e = 0; e < mesh.ep; e++) {
      out.push({ id: commId(mesh, 'dp', e), kind: 'dp', members: Array.from({ length: mesh.dp }, (_, d) => globalRank(mesh, d, e)) });
    }
  }
  return out;
}

function commId(mesh: Mesh, kind: 'ep' | 'dp', index: number): string {
  if (kind === 'ep') return mesh.dp > 1 ? `ep[dp=${index}]` : 'ep';
  return mesh.ep > 1 ? `dp[ep=${index}]` : 'dp';
}

/** The id of the `kind` communicator that global rank `rank` belongs to. */
export function commOf(mesh: Mesh, rank: number, kind: 'ep' | 'dp'): string {
  return kind === 'ep' ? commId(mesh, 'ep', dpRankOf(mesh, rank)) : commId(mesh, 'dp', epRankOf(mesh, rank));
}

export const epRankOf = (mesh: Pick<Mesh, 'ep'>, rank: number): number => rank % mesh.ep;
export const dpRankOf = (mesh: Pick<Mesh, 'ep'>, rank: number): number => Math.floor(rank / mesh.ep);
export const globalRank = (mesh: Pick<Mesh, 'ep'>, dpRank: number, epRank: number): number => dpRank * mesh.ep + epRank;

export const worldSize = (mesh: Mesh): number => mesh.ep * mesh.dp;
