// Our own GEMM, GotoBLAS-style: B packed in KC×NC blocks of NR-wide panels, A in MC×KC
// blocks of MR-tall panels, an MR×NR register-tile micro-kernel. f32 uses an AVX2+FMA
// intrinsic kernel when the CPU has it (checked at run time), a portable one otherwise;
// f64 uses a loop kernel that GCC clones for Haswell and baseline x86-64.
//
// Threads split C into disjoint row or column ranges; every element is summed in the same
// k order whatever the split, so results do not depend on the thread count.
#include "gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "blas.h"
#include "common.h"

namespace ep {

int cpuThreads() {
  static const int n = [] {
    const char* e = std::getenv("EP_ACTORS_THREADS");
    int v = e ? std::atoi(e) : 0;
    if (v <= 0) v = static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, std::min(v, 64));
  }();
  return n;
}

namespace {

template <typename T> struct Tile;
template <> struct Tile<float> { static constexpr int MR = 6, NR = 16, KC = 256, MC = 96, NC = 1024; };
template <> struct Tile<double> { static constexpr int MR = 4, NR = 8, KC = 256, MC = 64, NC = 512; };

bool hasAvx2Fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// ---- micro-kernels: acc[MR×NR] = Σ_k a[k][:] ⊗ b[k][:], then C = acc (+ C) ----

__attribute__((target("avx2,fma"))) void kernelF32Avx2(int kc, const float* a, const float* b, float* c, int ldc,
                                                        bool acc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kc; k++) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 ar = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(ar, b0, c00); c01 = _mm256_fmadd_ps(ar, b1, c01);
    ar = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ar, b0, c10); c11 = _mm256_fmadd_ps(ar, b1, c11);
    ar = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ar, b0, c20); c21 = _mm256_fmadd_ps(ar, b1, c21);
    ar = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ar, b0, c30); c31 = _mm256_fmadd_ps(ar, b1, c31);
    ar = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ar, b0, c40); c41 = _mm256_fmadd_ps(ar, b1, c41);
    ar = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ar, b0, c50); c51 = _mm256_fmadd_ps(ar, b1, c51);
    a += 6;
    b += 16;
  }
  const __m256 rows[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < 6; r++) {
    float* cr = c + static_cast<long>(r) * ldc;
    __m256 v0 = rows[r][0], v1 = rows[r][1];
    if (acc) {
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cr));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cr + 8));
    }
    _mm256_storeu_ps(cr, v0);
    _mm256_storeu_ps(cr + 8, v1);
  }
}

void kernelF32Generic(int kc, const float* a, const float* b, float* c, int ldc, bool acc) {
  constexpr int MR = Tile<float>::MR, NR = Tile<float>::NR;
  float t[MR][NR] = {};
  for (int k = 0; k < kc; k++, a += MR, b += NR)
    for (int r = 0; r < MR; r++)
      for (int j = 0; j < NR; j++) t[r][j] += a[r] * b[j];
  for (int r = 0; r < MR; r++)
    for (int j = 0; j < NR; j++) c[r * ldc + j] = acc ? c[r * ldc + j] + t[r][j] : t[r][j];
}

__attribute__((target_clones("arch=haswell", "default"))) void kernelF64(int kc, const double* a, const double* b,
                                                                         double* c, int ldc, bool acc) {
  constexpr int MR = Tile<double>::MR, NR = Tile<double>::NR;
  double t[MR][NR] = {};
  for (int k = 0; k < kc; k++, a += MR, b += NR)
    for (int r = 0; r < MR; r++)
      for (int j = 0; j < NR; j++) t[r][j] += a[r] * b[j];
  for (int r = 0; r < MR; r++)
    for (int j = 0; j < NR; j++) c[r * ldc + j] = acc ? c[r * ldc + j] + t[r][j] : t[r][j];
}

void microKernel(int kc, const float* a, const float* b, float* c, int ldc, bool acc) {
  if (hasAvx2Fma()) kernelF32Avx2(kc, a, b, c, ldc, acc);
  else kernelF32Generic(kc, a, b, c, ldc, acc);
}
void microKernel(int kc, const double* a, const double* b, double* c, int ldc, bool acc) {
  kernelF64(kc, a, b, c, ldc, acc);
}

// ---- packing: panels hold op(A) / op(B) in micro-kernel order, zero-padded at edges ----

template <typename T>
void packA(bool ta, const T* A, int lda, int i0, int mc, int k0, int kc, T* out) {
  constexpr int MR = Tile<T>::MR;
  for (int p = 0; p < mc; p += MR) {
    const int rows = std::min(MR, mc - p);
    T* dst = out + static_cast<long>(p) * kc;
    for (int k = 0; k < kc; k++)
      for (int r = 0; r < MR; r++) {
        const long i = i0 + p + r, kk = k0 + k;
        dst[k * MR + r] = r < rows ? (ta ? A[kk * lda + i] : A[i * lda + kk]) : T(0);
      }
  }
}

template <typename T>
void packB(bool tb, const T* B, int ldb, int k0, int kc, int j0, int nc, T* out) {
  constexpr int NR = Tile<T>::NR;
  for (int q = 0; q < nc; q += NR) {
    const int cols = std::min(NR, nc - q);
    T* dst = out + static_cast<long>(q) * kc;
    for (int k = 0; k < kc; k++)
      for (int j = 0; j < NR; j++) {
        const long kk = k0 + k, jj = j0 + q + j;
        dst[k * NR + j] = j < cols ? (tb ? B[jj * ldb + kk] : B[kk * ldb + jj]) : T(0);
      }
  }
}

template <typename T> struct AlignedBuf {
  T* p = nullptr;
  explicit AlignedBuf(size_t n) : p(static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64))) {
    if (!p) fail("OUT_OF_MEMORY", "GEMM packing buffer allocation failed");
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

/** One thread's share: rows [m0, m1) and columns [n0, n1) of C. */
template <typename T>
void gemmSerial(bool ta, bool tb, int m0, int m1, int n0, int n1, int K, const T* A, int lda, const T* B, int ldb, T* C,
                int ldc, bool accumulate) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR, KC = Tile<T>::KC, MC = Tile<T>::MC, NC = Tile<T>::NC;
  AlignedBuf<T> bp(static_cast<size_t>(KC) * (NC + NR));
  AlignedBuf<T> ap(static_cast<size_t>(KC) * (MC + MR));
  alignas(64) T edge[MR * NR];
  for (int jc = n0; jc < n1; jc += NC) {
    const int nc = std::min(NC, n1 - jc);
    for (int pc = 0; pc < K; pc += KC) {
      const int kc = std::min(KC, K - pc);
      const bool acc = accumulate || pc > 0;
      packB(tb, B, ldb, pc, kc, jc, nc, bp.p);
      for (int ic = m0; ic < m1; ic += MC) {
        const int mc = std::min(MC, m1 - ic);
        packA(ta, A, lda, ic, mc, pc, kc, ap.p);
        for (int jr = 0; jr < nc; jr += NR) {
          const int nr = std::min(NR, nc - jr);
          for (int ir = 0; ir < mc; ir += MR) {
            const int mr = std::min(MR, mc - ir);
            T* c = C + static_cast<long>(ic + ir) * ldc + jc + jr;
            const T* a = ap.p + static_cast<long>(ir) * kc;
            const T* b = bp.p + static_cast<long>(jr) * kc;
            if (mr == MR && nr == NR) {
              microKernel(kc, a, b, c, ldc, acc);
            } else {
              microKernel(kc, a, b, edge, NR, false);
              for (int r = 0; r < mr; r++)
                for (int j = 0; j < nr; j++) c[r * ldc + j] = acc ? c[r * ldc + j] + edge[r * NR + j] : edge[r * NR + j];
            }
          }
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void gemmOwn(bool ta, bool tb, int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
             bool accumulate, int threads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int i = 0; i < M; i++) std::fill(C + static_cast<long>(i) * ldc, C + static_cast<long>(i) * ldc + N, T(0));
    return;
  }
  // Each thread should get at least ~4 MFLOP, or spawning costs more than it saves.
  const double flops = 2.0 * M * N * K;
  int t = std::max(1, std::min(threads, static_cast<int>(flops / 4e6)));
  const bool byRows = M >= N;
  const int unit = byRows ? Tile<T>::MR : Tile<T>::NR;
  const int extent = byRows ? M : N;
  t = std::min(t, (extent + unit - 1) / unit);
  if (t <= 1) {
    gemmSerial(ta, tb, 0, M, 0, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
  const int units = (extent + unit - 1) / unit;
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(t);
  auto part = [&](int w) {
    const int lo = std::min(extent, units * w / t * unit), hi = std::min(extent, units * (w + 1) / t * unit);
    try {
      if (lo >= hi) return;
      if (byRows) gemmSerial(ta, tb, lo, hi, 0, N, K, A, lda, B, ldb, C, ldc, accumulate);
      else gemmSerial(ta, tb, 0, M, lo, hi, K, A, lda, B, ldb, C, ldc, accumulate);
    } catch (...) {
      errors[w] = std::current_exception();
    }
  };
  for (int w = 1; w < t; w++) pool.emplace_back(part, w);
  part(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc, bool accumulate,
          bool useBlas, int threads) {
  if (M <= 0 || N <= 0) return;
  const auto& lib = blas::library();
  if (useBlas && K > 0 && lib.sgemm) {
    const int a = ta ? blas::Trans : blas::NoTrans, b = tb ? blas::Trans : blas::NoTrans;
    const T beta = accumulate ? T(1) : T(0);
    if constexpr (std::is_same_v<T, float>) lib.sgemm(blas::RowMajor, a, b, M, N, K, 1.0f, A, lda, B, ldb, beta, C, ldc);
    else lib.dgemm(blas::RowMajor, a, b, M, N, K, 1.0, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  gemmOwn(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, accumulate, threads);
}

const char* gemmKernelName() { return hasAvx2Fma() ? "avx2-fma" : "generic"; }

template void gemmOwn<float>(bool, bool, int, int, int, const float*, int, const float*, int, float*, int, bool, int);
template void gemmOwn<double>(bool, bool, int, int, int, const double*, int, const double*, int, double*, int, bool, int);
template void gemm<float>(bool, bool, int, int, int, const float*, int, const float*, int, float*, int, bool, bool, int);
template void gemm<double>(bool, bool, int, int, int, const double*, int, const double*, int, double*, int, bool, bool,
                           int);

}  // namespace ep
