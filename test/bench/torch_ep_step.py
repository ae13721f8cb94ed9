#!/usr/bin/env python3
"""Baseline for `npm run bench`: one EP MoE step (forward + backward) of the seed's
algorithm on PyTorch + gloo, one CPU process per EP rank.

It follows shared/reference/expert_parallel.py step by step (stable sort by target rank,
counts all-to-all, dispatch, expert ids, per-expert loop, the received_tokens.sum()*0 edge,
combine, unsort, weighted scatter_add) with its own small packed SwiGLU module, because
KempnerForge's MoEMLP is not installed and Debian's PyTorch 1.13 has no DeviceMesh.

It also times the step's counts exchange alone (all_to_all_single of one int64 per peer,
back to back), the gloo baseline for our small-exchange latency.

Rank 0 prints one JSON line; if torch cannot be imported it prints {"skipped": ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import sys
import time

# OpenBLAS keeps its own thread pool, which torch.set_num_threads cannot reach when torch
# was built against generic BLAS (Debian's case). Pin it before torch loads it.
_threads = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), "1")
os.environ["OPENBLAS_NUM_THREADS"] = _threads
os.environ["OMP_NUM_THREADS"] = _threads

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except Exception as e:  # noqa: BLE001 - any import failure means "no baseline here"
    print(json.dumps({"skipped": f"python3 -c 'import torch' failed: {type(e).__name__}: {e}"}))
    sys.exit(0)


class PackedSwiGLU(torch.nn.Module):
    """This rank's slice of the packed experts, stored (in, out), no biases."""

    def __init__(self, n_local: int, dim: int, hidden: int, gen: torch.Generator):
        super().__init__()
        s_in, s_h = dim ** -0.5, hidden ** -0.5
        self.up_w = torch.nn.Parameter(torch.randn(n_local, dim, hidden, generator=gen) * s_in)
        self.gate_w = torch.nn.Parameter(torch.randn(n_local, dim, hidden, generator=gen) * s_in)
        self.down_w = torch.nn.Parameter(torch.randn(n_local, hidden, dim, generator=gen) * s_h)

    def expert(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return (torch.nn.functional.silu(x @ self.gate_w[i]) * (x @ self.up_w[i])) @ self.down_w[i]

    def zero_touch(self) -> torch.Tensor:
        return self.up_w.sum() * 0 + self.down_w.sum() * 0 + self.gate_w.sum() * 0


class A2A(torch.autograd.Function):
    """all_to_all_single whose backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits,
                               input_split_sizes=in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        gi = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(gi, g.contiguous(), output_split_sizes=in_splits,
                               input_split_sizes=out_splits, group=ctx.group)
        return gi, None, None, None


def ep_layer(x, weights, indices, moe: PackedSwiGLU, group, start: int, n_local: int, ep: int):
    n_tok, k = indices.shape
    flat_idx = indices.reshape(-1)
    flat_w = weights.reshape(-1)
    tok = torch.arange(n_tok).unsqueeze(1).expand(-1, k).reshape(-1)
    target = flat_idx // n_local
    # Stable, so each destination sees its entries in t-major order.
    order = torch.argsort(target, stable=True)
    send_rows = x[tok[order]]
    send = torch.bincount(target[order], minlength=ep)
    recv = torch.zeros_like(send)
    dist.all_to_all_single(recv, send, group=group)  # A: counts
    send_l, recv_l = send.tolist(), recv.tolist()
    got = A2A.apply(send_rows, recv_l, send_l, group)  # B: dispatch
    ids = torch.empty(sum(recv_l), 1)
    dist.all_to_all_single(ids, flat_idx[order].float().unsqueeze(-1),  # C: expert ids
                           output_split_sizes=recv_l, input_split_sizes=send_l, group=group)
    ids = ids.squeeze(-1).long()

    # The seed's non-grouped packed path (no grouped GEMM on CPU f32): one masked matmul
    # chain per local expert.
    local = torch.zeros_like(got)
    ran = False
    for i in range(n_local):
        mask = ids == start + i
        if not mask.any():
            continue
        local[mask] = moe.expert(got[mask], i)
        ran = True
    if not ran:
        local = local + moe.zero_touch()
    # Keeps B' (dispatch backward) issued on a rank that received nothing.
    local = local + got.sum() * 0
    back = A2A.apply(local, send_l, recv_l, group)  # D: combine

    unsort = torch.argsort(order)
    rows = back[unsort] * flat_w[order][unsort].unsqueeze(-1)
    out = torch.zeros(n_tok, x.shape[-1], dtype=x.dtype)
    out.scatter_add_(0, tok.unsqueeze(-1).expand_as(rows), rows)
    return out


def blas_info() -> str:
    cfg = torch.__config__.show()
    m = re.search(r"BLAS_INFO=[^,\s]+", cfg)
    info = m.group(0) if m else "BLAS_INFO=?"
    # Generic BLAS means whatever libblas.so.3 resolves to; name the library actually mapped.
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({ln.split()[-1] for ln in f if "blas" in ln.lower() and "/" in ln})
        if libs:
            info += " -> " + " ".join(os.path.realpath(p) for p in libs)
    except OSError:
        pass
    return info


def worker(rank: int, args, port: int):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.ep)
    group = dist.new_group(list(range(args.ep)))
    n_local = args.experts // args.ep
    start = rank * n_local

    gen = torch.Generator().manual_seed(1234 + rank)
    moe = PackedSwiGLU(n_local, args.dim, args.hidden, gen)
    x = torch.randn(args.tokens, args.dim, generator=gen).requires_grad_()
    logits = torch.randn(args.tokens, args.experts, generator=gen)
    top_w, top_i = torch.softmax(logits, -1).topk(args.top_k, dim=-1)
    weights = top_w.clone().requires_grad_()
    grad_out = torch.randn(args.tokens, args.dim, generator=gen)

    def step():
        for p in (x, weights, *moe.parameters()):
            p.grad = None
        out = ep_layer(x, weights, top_i, moe, group, start, n_local, args.ep)
        out.backward(grad_out)

    # Steps back to back, as a training loop runs them and as ep-actors' ranks do: each rank
    # times its own steps, and a step is as slow as its slowest rank. A barrier around every
    # step would add its own latency to each (6-10 ms of gloo's on 4 processes, 2 cores).
    dist.barrier()
    own = []
    for it in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        step()
        own.append((time.perf_counter() - t0) * 1e3)
    slowest = torch.tensor(own, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    samples = slowest.tolist()[args.warmup:]

    # The counts exchange alone: slowest rank per exchange, back to back after a barrier.
    send = torch.ones(args.ep, dtype=torch.int64)
    recv = torch.zeros_like(send)
    counts = []
    dist.barrier()
    for it in range(20 + args.count_iters):
        t0 = time.perf_counter()
        dist.all_to_all_single(recv, send, group=group)
        dt = time.perf_counter() - t0
        if it >= 20:
            counts.append(dt * 1e6)
    worst = torch.tensor(counts, dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)

    if rank == 0:
        print(json.dumps({
            "counts_median_us": statistics.median(worst.tolist()),
            "median_ms": statistics.median(samples),
            "min_ms": min(samples),
            "iters": args.iters,
            "torch": torch.__version__,
            "blas": blas_info(),
            "ep": args.ep, "tokens": args.tokens, "dim": args.dim, "hidden": args.hidden,
            "experts": args.experts, "top_k": args.top_k, "threads": args.threads,
        }), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--count-iters", type=int, default=200, help="counts exchanges timed")
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenBLAS threads per process")
    args = ap.parse_args()
    if args.experts % args.ep != 0:
        ap.error(f"experts ({args.experts}) must be divisible by ep ({args.ep})")
    mp.spawn(worker, args=(args, free_port()), nprocs=args.ep, join=True)


if __name__ == "__main__":
    main()
