#include "experts.h"

#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "gemm.h"

namespace ep {
namespace {

// Activations are evaluated in double and rounded once, so f32 results stay within a few
// ulps of a reference that computes them in double (the TypeScript backend does).
inline double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }
inline double gelu(double a) { return 0.5 * a * (1.0 + std::erf(a * M_SQRT1_2)); }
inline double geluGrad(double a) {
  return 0.5 * (1.0 + std::erf(a * M_SQRT1_2)) + a * std::exp(-0.5 * a * a) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
}

/** h = act(up) or silu(gate)·up, elementwise over n values. */
template <typename T> void activate(Act act, const T* up, const T* gate, T* h, long n) {
  switch (act) {
    case Act::Silu:
      for (long i = 0; i < n; i++) {
        const double g = gate[i];
        h[i] = static_cast<T>(g * sigmoid(g) * up[i]);
      }
      break;
    case Act::Gelu:
      for (long i = 0; i < n; i++) h[i] = static_cast<T>(gelu(up[i]));
      break;
    case Act::Relu:
      for (long i = 0; i < n; i++) h[i] = up[i] > 0 ? up[i] : T(0);
      break;
  }
}

/** From dh: dUp (in place over dh) and dGate (silu only). */
template <typename T> void activateBackward(Act act, const T* up, const T* gate, T* dh, T* dGate, long n) {
  switch (act) {
    case Act::Silu:
      for (long i = 0; i < n; i++) {
        const double g = gate[i], s = sigmoid(g), d = dh[i];
        dGate[i] = static_cast<T>(d * up[i] * s * (1.0 + g * (1.0 - s)));
        dh[i] = static_cast<T>(d * g * s);
      }
      break;
    case Act::Gelu:
      for (long i = 0; i < n; i++) dh[i] = static_cast<T>(dh[i] * geluGrad(up[i]));
      break;
    case Act::Relu:
      for (long i = 0; i < n; i++) dh[i] = up[i] > 0 ? dh[i] : T(0);
      break;
  }
}

template <typename T> void check(const ExpertJob<T>& job) {
  const size_t n = job.counts.size();
  const bool gated = job.act == Act::Silu;
  if (job.up.size() != n || job.down.size() != n || job.gate.size() != (gated ? n : 0))
    fail("BAD_ARGUMENT", "expert weight lists do not match the " + std::to_string(n) + " row counts");
  for (int c : job.counts)
    if (c < 0) fail("BAD_ARGUMENT", "negative row count " + std::to_string(c));
}

}  // namespace

template <typename T> void expertForward(const ExpertJob<T>& job) {
  check(job);
  const int D = job.D, H = job.H;
  const bool u = job.unpacked, gated = job.act == Act::Silu;
  std::vector<T> h;
  long r0 = 0;
  for (size_t e = 0; e < job.counts.size(); e++) {
    const int n = job.counts[e];
    if (n == 0) continue;
    const T* x = job.x + r0 * D;
    T* a = job.saveUp + r0 * H;
    T* g = gated ? job.saveGate + r0 * H : nullptr;
    // packed (in,out) [D,H]: x·W; unpacked (out,in) [H,D]: x·Wᵀ
    gemm<T>(false, u, n, H, D, x, D, job.up[e], u ? D : H, a, H, false, job.useBlas, job.threads);
    if (gated) gemm<T>(false, u, n, H, D, x, D, job.gate[e], u ? D : H, g, H, false, job.useBlas, job.threads);
    h.resize(static_cast<size_t>(n) * H);
    activate(job.act, a, g, h.data(), static_cast<long>(n) * H);
    gemm<T>(false, u, n, D, H, h.data(), H, job.down[e], u ? H : D, job.y + r0 * D, D, false, job.useBlas, job.threads);
    r0 += n;
  }
}

template <typename T> void expertBackward(const ExpertJob<T>& job) {
  check(job);
  const int D = job.D, H = job.H;
  const bool u = job.unpacked, gated = job.act == Act::Silu;
  std::vector<T> h, dh, dg;
  long r0 = 0;
  for (size_t e = 0; e < job.counts.size(); e++) {
    const int n = job.counts[e];
    const long wsz = static_cast<long>(D) * H;
    if (n == 0) {  // no rows: the gradients are zero by definition
      std::fill(job.gUp[e], job.gUp[e] + wsz, T(0));
      std::fill(job.gDown[e], job.gDown[e] + wsz, T(0));
      if (gated) std::fill(job.gGate[e], job.gGate[e] + wsz, T(0));
      continue;
    }
    const long nh = static_cast<long>(n) * H;
    const T* x = job.x + r0 * D;
    const T* gy = job.gy + r0 * D;
    const T* a = job.saveUp + r0 * H;
    const T* g = gated ? job.saveGate + r0 * H : nullptr;
    h.resize(nh);
    dh.resize(nh);
    activate(job.act, a, g, h.data(), nh);
    // dDown: packed [H,D] = hᵀ·gy; unpacked [D,H] = gyᵀ·h
    if (u) gemm<T>(true, false, D, H, n, gy, D, h.data(), H, job.gDown[e], H, false, job.useBlas, job.threads);
    else gemm<T>(true, false, H, D, n, h.data(), H, gy, D, job.gDown[e], D, false, job.useBlas, job.threads);
    // dh = gy·downᵀ: packed down [H,D] is transposed, unpacked [D,H] is not
    gemm<T>(false, !u, n, H, D, gy, D, job.down[e], u ? H : D, dh.data(), H, false, job.useBlas, job.threads);
    if (gated) dg.resize(nh);
    activateBackward(job.act, a, g, dh.data(), gated ? dg.data() : nullptr, nh);
    // dUp: packed [D,H] = xᵀ·dA; unpacked [H,D] = dAᵀ·x (same for gate)
    auto wgrad = [&](const T* d, T* out) {
      if (u) gemm<T>(true, false, H, D, n, d, H, x, D, out, D, false, job.useBlas, job.threads);
      else gemm<T>(true, false, D, H, n, x, D, d, H, out, H, false, job.useBlas, job.threads);
    };
    wgrad(dh.data(), job.gUp[e]);
    if (gated) wgrad(dg.data(), job.gGate[e]);
    // gx = dA·upᵀ (+ dG·gateᵀ): packed up [D,H] is transposed, unpacked [H,D] is not
    T* gx = job.gx + r0 * D;
    gemm<T>(false, !u, n, D, H, dh.data(), H, job.up[e], u ? D : H, gx, D, false, job.useBlas, job.threads);
    if (gated) gemm<T>(false, !u, n, D, H, dg.data(), H, job.gate[e], u ? D : H, gx, D, true, job.useBlas, job.threads);
    r0 += n;
  }
}

template <typename T> void gatherRows(const T* src, long rows, long rowSize, const int* index, long n, T* dst) {
  for (long i = 0; i < n; i++) {
    const long r = index[i];
    if (r < 0 || r >= rows)
      fail("INDEX_OUT_OF_RANGE", "row index " + std::to_string(r) + " at position " + std::to_string(i) +
                                     " outside [0, " + std::to_string(rows) + ")");
    std::copy(src + r * rowSize, src + (r + 1) * rowSize, dst + i * rowSize);
  }
}

template <typename T>
void scatterAddWeighted(const T* src, long m, long rowSize, const int* index, const T* weight, T* out, long outRows) {
  for (long i = 0; i < m; i++) {
    const long r = index[i];
    if (r < 0 || r >= outRows)
      fail("INDEX_OUT_OF_RANGE", "target row " + std::to_string(r) + " at position " + std::to_string(i) +
                                     " outside [0, " + std::to_string(outRows) + ")");
    const T w = weight ? weight[i] : T(1);
    const T* s = src + i * rowSize;
    T* o = out + r * rowSize;
    for (long j = 0; j < rowSize; j++) o[j] += w * s[j];
  }
}

template void expertForward<float>(const ExpertJob<float>&);
template void expertForward<double>(const ExpertJob<double>&);
template void expertBackward<float>(const ExpertJob<float>&);
template void expertBackward<double>(const ExpertJob<double>&);
template void gatherRows<float>(const float*, long, long, const int*, long, float*);
template void gatherRows<double>(const double*, long, long, const int*, long, double*);
template void scatterAddWeighted<float>(const float*, long, long, const int*, const float*, float*, long);
template void scatterAddWeighted<double>(const double*, long, long, const int*, const double*, double*, long);

}  // namespace ep
