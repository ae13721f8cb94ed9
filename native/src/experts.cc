#include "experts.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <type_traits>
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
template <typename T> void activateScalar(Act act, const T* up, const T* gate, T* h, long n) {
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
template <typename T> void activateBackwardScalar(Act act, const T* up, const T* gate, T* dh, T* dGate, long n) {
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

// ---- SwiGLU in f32 with SIMD over double lanes, so values match the scalar path ----
// libm's exp, one value at a time, cost about as much as a third of the expert GEMMs; this
// exp is a Cody-Waite reduction and a degree-13 Taylor polynomial (|r| <= ln2/2, error
// below 1e-17 before rounding), then 2^n built in the exponent bits. The AVX-512 and AVX2
// versions run the same operations in the same order (8 or 4 lanes), so they agree bit for bit.

constexpr double kExpPoly[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                               1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
                               1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
                               1.0,                1.0};
constexpr double kLog2e = 1.4426950408889634, kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
// n + 1.5·2^52 holds n in its low mantissa bits; subtracting the bias's bits leaves n as int64.
constexpr double kRoundMagic = 6755399441055744.0;

__attribute__((target("avx2,fma"))) inline __m256d exp4(__m256d x) {
  // exp(±708) stays a normal double; beyond, sigmoid is 0 or 1 to double precision anyway.
  x = _mm256_min_pd(_mm256_max_pd(x, _mm256_set1_pd(-708.0)), _mm256_set1_pd(708.0));
  const __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kLn2Hi), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(kLn2Lo), r);
  __m256d p = _mm256_set1_pd(kExpPoly[0]);
  for (int i = 1; i < 14; i++) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kExpPoly[i]));
  const __m256d magic = _mm256_set1_pd(kRoundMagic);
  const __m256i ni = _mm256_sub_epi64(_mm256_castpd_si256(_mm256_add_pd(n, magic)), _mm256_castpd_si256(magic));
  const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(ni, _mm256_set1_epi64x(1023)), 52);
  return _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
}

__attribute__((target("avx512f"))) inline __m512d exp8(__m512d x) {
  x = _mm512_min_pd(_mm512_max_pd(x, _mm512_set1_pd(-708.0)), _mm512_set1_pd(708.0));
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kLn2Hi), x);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(kLn2Lo), r);
  __m512d p = _mm512_set1_pd(kExpPoly[0]);
  for (int i = 1; i < 14; i++) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(kExpPoly[i]));
  const __m512d magic = _mm512_set1_pd(kRoundMagic);
  const __m512i ni = _mm512_sub_epi64(_mm512_castpd_si512(_mm512_add_pd(n, magic)), _mm512_castpd_si512(magic));
  const __m512i bits = _mm512_slli_epi64(_mm512_add_epi64(ni, _mm512_set1_epi64(1023)), 52);
  return _mm512_mul_pd(p, _mm512_castsi512_pd(bits));
}

__attribute__((target("avx2,fma"))) inline __m256d sigmoid4(__m256d g) {
  const __m256d one = _mm256_set1_pd(1.0);
  return _mm256_div_pd(one, _mm256_add_pd(one, exp4(_mm256_sub_pd(_mm256_setzero_pd(), g))));
}

__attribute__((target("avx512f"))) inline __m512d sigmoid8(__m512d g) {
  const __m512d one = _mm512_set1_pd(1.0);
  return _mm512_div_pd(one, _mm512_add_pd(one, exp8(_mm512_sub_pd(_mm512_setzero_pd(), g))));
}

// h = silu(gate)·up over n floats, and s = sigmoid(gate) in double when s is given (the
// backward keeps it for its second pass instead of evaluating exp again). Each returns how
// many it did (a multiple of its width); the caller goes on with the narrower path. The
// AVX-512 and AVX2 bodies are separate functions so AVX2-only CPUs never meet an EVEX op.

__attribute__((target("avx512f"))) long siluForwardAvx512(const float* up, const float* gate, float* h, double* s, long n) {
  long i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d g = _mm512_cvtps_pd(_mm256_loadu_ps(gate + i)), u = _mm512_cvtps_pd(_mm256_loadu_ps(up + i));
    const __m512d sg = sigmoid8(g);
    if (s) _mm512_storeu_pd(s + i, sg);
    // (g · s) · up, as the scalar path rounds it
    _mm256_storeu_ps(h + i, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(g, sg), u)));
  }
  return i;
}

__attribute__((target("avx2,fma"))) long siluForwardAvx2(const float* up, const float* gate, float* h, double* s, long n) {
  long i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d g = _mm256_cvtps_pd(_mm_loadu_ps(gate + i)), u = _mm256_cvtps_pd(_mm_loadu_ps(up + i));
    const __m256d sg = sigmoid4(g);
    if (s) _mm256_storeu_pd(s + i, sg);
    _mm_storeu_ps(h + i, _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(g, sg), u)));
  }
  return i;
}

// From dh and the forward's s: dGate = dh·up·s·(1 + g·(1 − s)) and dUp = dh·g·s over dh,
// multiplied in the scalar path's order.

__attribute__((target("avx512f"))) long siluBackwardAvx512(const float* up, const float* gate, const double* s, float* dh, float* dGate,
                                                         long n) {
  const __m512d one = _mm512_set1_pd(1.0);
  long i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d g = _mm512_cvtps_pd(_mm256_loadu_ps(gate + i)), u = _mm512_cvtps_pd(_mm256_loadu_ps(up + i));
    const __m512d d = _mm512_cvtps_pd(_mm256_loadu_ps(dh + i)), sg = _mm512_loadu_pd(s + i);
    const __m512d t = _mm512_add_pd(one, _mm512_mul_pd(g, _mm512_sub_pd(one, sg)));
    _mm256_storeu_ps(dGate + i, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(_mm512_mul_pd(d, u), sg), t)));
    _mm256_storeu_ps(dh + i, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(d, g), sg)));
  }
  return i;
}

__attribute__((target("avx2,fma"))) long siluBackwardAvx2(const float* up, const float* gate, const double* s, float* dh, float* dGate,
                                                        long n) {
  const __m256d one = _mm256_set1_pd(1.0);
  long i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256d g = _mm256_cvtps_pd(_mm_loadu_ps(gate + i)), u = _mm256_cvtps_pd(_mm_loadu_ps(up + i));
    const __m256d d = _mm256_cvtps_pd(_mm_loadu_ps(dh + i)), sg = _mm256_loadu_pd(s + i);
    const __m256d t = _mm256_add_pd(one, _mm256_mul_pd(g, _mm256_sub_pd(one, sg)));
    _mm_storeu_ps(dGate + i, _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(_mm256_mul_pd(d, u), sg), t)));
    _mm_storeu_ps(dh + i, _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_mul_pd(d, g), sg)));
  }
  return i;
}

/** The SwiGLU SIMD path applies: f32 silu on a CPU with AVX2 and FMA. */
template <typename T> bool siluSimd(Act act) {
  return std::is_same_v<T, float> && act == Act::Silu && hasAvx2Fma();
}

/** h = act(up) or silu(gate)·up; for the SIMD SwiGLU, also s = sigmoid(gate) when s is given. */
template <typename T> void activate(Act act, const T* up, const T* gate, T* h, double* s, long n) {
  if constexpr (std::is_same_v<T, float>) {
    if (siluSimd<T>(act)) {
      long done = hasAvx512() ? siluForwardAvx512(up, gate, h, s, n) : 0;
      done += siluForwardAvx2(up + done, gate + done, h + done, s ? s + done : nullptr, n - done);
      activateScalar(act, up + done, gate + done, h + done, n - done);
      return;
    }
  }
  activateScalar(act, up, gate, h, n);
}

/** From dh: dUp (in place over dh) and dGate; the SIMD SwiGLU reads the s its activate kept. */
template <typename T> void activateBackward(Act act, const T* up, const T* gate, const double* s, T* dh, T* dGate, long n) {
  if constexpr (std::is_same_v<T, float>) {
    if (siluSimd<T>(act)) {
      long done = hasAvx512() ? siluBackwardAvx512(up, gate, s, dh, dGate, n) : 0;
      done += siluBackwardAvx2(up + done, gate + done, s + done, dh + done, dGate + done, n - done);
      activateBackwardScalar(act, up + done, gate + done, dh + done, dGate + done, n - done);
      return;
    }
  }
  activateBackwardScalar(act, up, gate, dh, dGate, n);
}

/** Per-thread scratch rows, kept between calls (fresh multi-MB vectors per expert meant
 *  an mmap, page faults and a munmap every time). */
template <typename T> T* scratch(int which, size_t n) {
  thread_local std::vector<T> bufs[4];
  auto& b = bufs[which];
  if (b.size() < n) b.resize(n);
  return b.data();
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
    T* h = job.saveHidden ? job.saveHidden + r0 * H : scratch<T>(0, static_cast<size_t>(n) * H);
    double* s = job.saveSigmoid && siluSimd<T>(job.act) ? job.saveSigmoid + r0 * H : nullptr;
    activate<T>(job.act, a, g, h, s, static_cast<long>(n) * H);
    gemm<T>(false, u, n, D, H, h, H, job.down[e], u ? H : D, job.y + r0 * D, D, false, job.useBlas, job.threads);
    r0 += n;
  }
}

template <typename T> void expertBackward(const ExpertJob<T>& job) {
  check(job);
  const int D = job.D, H = job.H;
  const bool u = job.unpacked, gated = job.act == Act::Silu;
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
    T* dh = scratch<T>(1, nh);
    T* dg = gated ? scratch<T>(2, nh) : nullptr;
    // h and, for the SIMD SwiGLU, s: the forward's when it kept both, else evaluated again
    const bool simd = siluSimd<T>(job.act);
    double* s = simd && job.saveSigmoid ? job.saveSigmoid + r0 * H : nullptr;
    const T* h;
    if (job.saveHidden && (!simd || s)) {
      h = job.saveHidden + r0 * H;
    } else {
      T* evaluated = scratch<T>(0, nh);
      if (simd) s = scratch<double>(3, nh);
      activate<T>(job.act, a, g, evaluated, s, nh);
      h = evaluated;
    }
    // dDown: packed [H,D] = hᵀ·gy; unpacked [D,H] = gyᵀ·h
    if (u) gemm<T>(true, false, D, H, n, gy, D, h, H, job.gDown[e], H, false, job.useBlas, job.threads);
    else gemm<T>(true, false, H, D, n, h, H, gy, D, job.gDown[e], D, false, job.useBlas, job.threads);
    // dh = gy·downᵀ: packed down [H,D] is transposed, unpacked [D,H] is not
    gemm<T>(false, !u, n, H, D, gy, D, job.down[e], u ? H : D, dh, H, false, job.useBlas, job.threads);
    activateBackward<T>(job.act, a, g, s, dh, dg, nh);
    // dUp: packed [D,H] = xᵀ·dA; unpacked [H,D] = dAᵀ·x (same for gate)
    auto wgrad = [&](const T* d, T* out) {
      if (u) gemm<T>(true, false, H, D, n, d, H, x, D, out, D, false, job.useBlas, job.threads);
      else gemm<T>(true, false, D, H, n, x, D, d, H, out, H, false, job.useBlas, job.threads);
    };
    wgrad(dh, job.gUp[e]);
    if (gated) wgrad(dg, job.gGate[e]);
    // gx = dA·upᵀ (+ dG·gateᵀ): packed up [D,H] is transposed, unpacked [H,D] is not
    T* gx = job.gx + r0 * D;
    gemm<T>(false, !u, n, D, H, dh, H, job.up[e], u ? D : H, gx, D, false, job.useBlas, job.threads);
    if (gated) gemm<T>(false, !u, n, D, H, dg, H, job.gate[e], u ? D : H, gx, D, true, job.useBlas, job.threads);
    r0 += n;
  }
}

template <typename T>
void moveRows(const T* src, long srcRows, long D, const int* index, long n, T* dst, long dstRows, const double* scale,
              bool scatter) {
  const long lim = scatter ? dstRows : srcRows;
  for (long i = 0; i < n; i++) {
    const long r = index[i];
    if (r < 0 || r >= lim)
      fail("INDEX_OUT_OF_RANGE", "row index " + std::to_string(r) + " at position " + std::to_string(i) + " outside [0, " +
                                     std::to_string(lim) + ")");
    const T* s = src + (scatter ? i : r) * D;
    T* o = dst + (scatter ? r : i) * D;
    if (scale) {
      const double f = scale[i];
      for (long d = 0; d < D; d++) o[d] = static_cast<T>(f * static_cast<double>(s[d]));
    } else {
      std::memcpy(o, s, sizeof(T) * D);
    }
  }
}

template <typename T>
void combineRows(const T* src, long S, long D, const int* positions, long tokens, long K, const double* weight, T* dst) {
  thread_local std::vector<double> acc;
  acc.resize(D);
  for (long t = 0; t < tokens; t++) {
    std::fill(acc.begin(), acc.end(), 0.0);
    long prev = -1;
    for (long k = 0; k < K; k++) {
      const long p = positions[t * K + k];
      if (p <= prev || p >= S)
        fail("INDEX_OUT_OF_RANGE", "position " + std::to_string(p) + " of token " + std::to_string(t) +
                                       (p >= S ? " outside [0, " + std::to_string(S) + ")" : " is not after the token's previous one"));
      prev = p;
      const T* s = src + p * D;
      if (weight) {
        const double w = weight[p];
        for (long d = 0; d < D; d++) acc[d] += w * static_cast<double>(s[d]);
      } else {
        for (long d = 0; d < D; d++) acc[d] += static_cast<double>(s[d]);
      }
    }
    T* o = dst + t * D;
    for (long d = 0; d < D; d++) o[d] = static_cast<T>(acc[d]);
  }
}

template <typename T>
void routeGrad(const T* g, long tokens, long D, const T* ret, long S, const int* token, const int* entry, const double* w,
               T* gr, double* gw, long entries) {
  for (long p = 0; p < S; p++) {
    const long t = token[p], e = entry[p];
    if (t < 0 || t >= tokens || e < 0 || e >= entries)
      fail("INDEX_OUT_OF_RANGE", "token " + std::to_string(t) + " / entry " + std::to_string(e) + " at position " +
                                     std::to_string(p) + " out of range");
    const T* gt = g + t * D;
    const T* rp = ret + p * D;
    T* o = gr + p * D;
    const double wp = w[p];
    double dot = 0;  // summed in d order, one rounding per step, as the TypeScript loop does
    for (long d = 0; d < D; d++) {
      const double gv = gt[d];
      o[d] = static_cast<T>(wp * gv);
      dot += gv * static_cast<double>(rp[d]);
    }
    gw[e] = dot;
  }
}

template void moveRows<float>(const float*, long, long, const int*, long, float*, long, const double*, bool);
template void moveRows<double>(const double*, long, long, const int*, long, double*, long, const double*, bool);
template void combineRows<float>(const float*, long, long, const int*, long, long, const double*, float*);
template void combineRows<double>(const double*, long, long, const int*, long, long, const double*, double*);
template void routeGrad<float>(const float*, long, long, const float*, long, const int*, const int*, const double*, float*,
                               double*, long);
template void routeGrad<double>(const double*, long, long, const double*, long, const int*, const int*, const double*,
                                double*, double*, long);

template void expertForward<float>(const ExpertJob<float>&);
template void expertForward<double>(const ExpertJob<double>&);
template void expertBackward<float>(const ExpertJob<float>&);
template void expertBackward<double>(const ExpertJob<double>&);

}  // namespace ep
