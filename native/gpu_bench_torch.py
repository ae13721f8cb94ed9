"""PyTorch side of native/gpu-check.sh: the same shapes as src/native/gpucheck.ts, timed
with CUDA events. Grouped GEMM: torch._grouped_mm forward (x·W per expert) and backward
(dx = dy·Wᵀ and dW = xᵀ·dy per expert); dispatch: stable sort by expert + index_select;
combine: gather back, weight, sum over top-k. Writes JSON to the path given."""
import json
import sys

import torch

SHAPES = [dict(name="realistic", tokens=4096, topK=8, experts=32, d=7168, h=2048),
          dict(name="small", tokens=1024, topK=2, experts=8, d=256, h=512)]


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main(out_path):
    res = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)}
    dev = "cuda"
    for s in SHAPES:
        E, rows, D, H = s["experts"], s["tokens"] * s["topK"] // s["experts"], s["d"], s["h"]
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * rows
        for prec, dt in (("bf16", torch.bfloat16), ("f32", torch.float32)):
            x = torch.randn(E * rows, D, device=dev, dtype=dt)
            w = torch.randn(E, D, H, device=dev, dtype=dt) * 0.05
            dy = torch.randn(E * rows, H, device=dev, dtype=dt)
            try:
                fwd = timed(lambda: torch._grouped_mm(x, w, offs=offs), 10)
                wt = w.transpose(-2, -1)
                xt = x.t()
                dyc = dy

                def bwd():
                    torch._grouped_mm(dyc, wt, offs=offs)
                    torch._grouped_mm(xt, dyc, offs=offs)
                bwd_ms = timed(bwd, 10)
                res[f"gemm.{prec}.{s['name']}"] = {"forwardMs": fwd, "backwardMs": bwd_ms}
            except Exception as e:  # torch._grouped_mm may not take every dtype
                res[f"gemm.{prec}.{s['name']}"] = {"error": str(e)[:300]}
        T, K = s["tokens"], s["topK"]
        x = torch.randn(T, D, device=dev)
        keys = torch.randint(0, E, (T * K,), device=dev)
        w = torch.rand(T * K, device=dev)

        def dispatch():
            order = torch.sort(keys, stable=True).indices
            return x.index_select(0, order // K), order
        rows_sorted, order = dispatch()
        pos = torch.empty_like(order)
        pos[order] = torch.arange(order.numel(), device=dev)

        def combine():
            back = rows_sorted.index_select(0, pos) * w.unsqueeze(-1)
            return back.view(T, K, D).sum(1)
        res[f"permute.{s['name']}"] = {"dispatchMs": timed(dispatch, 20), "combineMs": timed(combine, 20)}
    with open(out_path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])
