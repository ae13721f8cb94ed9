#!/usr/bin/env bash
# One command that verifies and measures production mode on a GPU machine (see GPU.md):
# prints versions, runs the GPU tests, benchmarks against PyTorch on the same card, writes
# logs and results.md into $GPU_CHECK_OUT (default ./gpu-results), prints the table last.
# Self-contained: it brings Node (.device/node.xz), dist/, node_modules/ and the addon built
# beforehand with nvcc (native/build/Release). Prepare on the build machine with:
#   npm install && mkdir -p .device && xz -T2 -c "$(command -v node)" > .device/node.xz
# On a machine without a GPU it stops after the versions and the CUDA device check.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${GPU_CHECK_OUT:-./gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT/native.json" "$OUT/torch.json"  # a table from an earlier run must not pass for this one's
LOG="$OUT/gpu-check.log"
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
stop() { say "gpu-check stopped: $*"; exit 1; }

# Node: the one on PATH, else the packed binary.
if ! command -v node >/dev/null 2>&1; then
  [ -f "$ROOT/.device/node.xz" ] || stop "no node on PATH and no .device/node.xz to unpack"
  NODE_DIR=$(mktemp -d)
  mkdir -p "$NODE_DIR/bin"
  xz -dc "$ROOT/.device/node.xz" >"$NODE_DIR/bin/node" && chmod +x "$NODE_DIR/bin/node" || stop "could not unpack .device/node.xz"
  export PATH="$NODE_DIR/bin:$PATH"
fi
[ -f "$ROOT/dist/test/gpu/gpucheck.js" ] || stop "dist/ is missing: run npm install (it compiles TypeScript) before carrying the tree"
[ -f "$ROOT/native/build/Release/ep_actors_native.node" ] || stop "the addon is not built: run node native/build.mjs with nvcc present"

# NCCL ships as the Python package nvidia-nccl-cu13 on the GPU machines: nvidia/nccl/lib
# (the other cu13 wheels use nvidia/cu13/lib, so that is looked at too).
if [ -z "${EP_ACTORS_NCCL:-}" ]; then
  NCCL_LIB=$(python3 -c 'import nvidia, os; print(next((f for p in nvidia.__path__ for d in ("nccl", "cu13") for f in [os.path.join(p, d, "lib", "libnccl.so.2")] if os.path.isfile(f)), ""))' 2>/dev/null || true)
  [ -n "$NCCL_LIB" ] && export EP_ACTORS_NCCL="$NCCL_LIB"
fi

say "== versions"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "node: $(node --version)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
  (command -v nvcc >/dev/null && nvcc --version | tail -1) || echo "nvcc: not on PATH"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "grouped_mm", hasattr(torch, "_grouped_mm"))' 2>&1 || echo "torch: not importable"
  echo "EP_ACTORS_NCCL: ${EP_ACTORS_NCCL:-unset (libnccl.so.2 from the library path)}"
  node -e 'import("'"$ROOT"'/dist/src/native/backend.js").then(m => { const a = m.requireNative(); console.log("addon:", JSON.stringify(a.info())); try { console.log("cuda:", JSON.stringify(a.cudaInfo())); } catch (e) { console.log("cuda:", e.code, e.message); } try { console.log("nccl:", JSON.stringify(a.ncclVersion())); } catch (e) { console.log("nccl:", e.code, e.message); } })'
} 2>&1 | tee -a "$LOG"

node -e 'import("'"$ROOT"'/dist/src/native/backend.js").then(m => m.requireNative().cudaInfo())' >/dev/null 2>&1 \
  || stop "no usable CUDA device here (see the cuda: line above); the GPU tests and benchmarks need one"

# Both parts together stay under the 10 minutes a loaned machine allows one command, so a
# hang in one still leaves time for the other and for the table. -k: a rank blocked in
# NCCL may not end on SIGTERM.
say "== GPU tests and our CUDA benchmarks"
(cd "$ROOT" && timeout -k 10 300 node dist/test/gpu/gpucheck.js run "$OUT") 2>&1 | tee -a "$LOG"
TESTS=${PIPESTATUS[0]}

say "== PyTorch on the same card"
timeout -k 10 150 python3 "$ROOT/native/gpu_bench_torch.py" "$OUT/torch.json" >>"$LOG" 2>&1 || say "PyTorch benchmark failed (see $LOG)"

say "== results (also in $OUT/results.md)"
if [ -f "$OUT/native.json" ]; then
  node "$ROOT/dist/test/gpu/gpucheck.js" table "$OUT" | tee -a "$LOG"
else
  # gpucheck.js writes native.json only at its end: a timeout or crash leaves the lines it printed
  say "no native.json: the GPU tests did not finish (exit $TESTS); the checks that did:"
  grep -E '^(PASS|FAIL|SKIP|bench) ' "$LOG" | tee "$OUT/results.md"
fi
exit "$TESTS"
