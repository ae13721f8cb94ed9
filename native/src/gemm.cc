// Our own GEMM, GotoBLAS-style: B packed in KC×NC blocks of NR-wide panels, A in MC×KC
// blocks of MR-tall panels, an MR×NR register-tile micro-kernel. f32 uses an AVX2+FMA
// intrinsic kernel when the CPU has it (checked at run time), a portable one otherwise;
// f64 uses a loop kernel that GCC clones for Haswell and baseline x86-64.
//
// Threads split C into disjoint row or column ranges; every element is summed in the same
// k order whatever the split, so results do not depend on the thread count. How many
// threads a GEMM uses is decided when it starts (threadsNow): one per running job, plus
// the cores no job holds.
#include "gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "blas.h"
#include "common.h"

namespace ep {

namespace {
int defaultThreads() {
  static const int n = [] {
    const char* e = std::getenv("EP_ACTORS_THREADS");
    int v = e ? std::atoi(e) : 0;
    if (v <= 0) v = static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, std::min(v, 64));
  }();
  return n;
}
// Process-wide, as the cores are: a benchmark pins every rank thread to one kernel thread.
std::atomic<int> threadCap{0};
}  // namespace

int cpuThreads() {
  const int cap = threadCap.load(std::memory_order_relaxed);
  return cap > 0 ? cap : defaultThreads();
}

void setCpuThreads(int n) { threadCap.store(n > 0 ? std::min(n, 64) : 0, std::memory_order_relaxed); }

bool hasAvx2Fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

bool hasAvx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

namespace {

template <typename T> struct Tile;
template <> struct Tile<float> { static constexpr int MR = 6, NR = 16, KC = 256, MC = 96, NC = 1024; };
template <> struct Tile<double> { static constexpr int MR = 4, NR = 8, KC = 256, MC = 64, NC = 512; };

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

// Two vertically adjacent 6×16 tiles at once (two packed A panels), one 16-wide zmm per
// row: twelve independent accumulators keep both FMA ports busy where a 6×16 tile cannot.
// Every element is the same FMA chain over k as in kernelF32Avx2, so results are identical.
__attribute__((target("avx512f"))) void kernelF32Avx512Pair(int kc, const float* a0, const float* a1, const float* b,
                                                             float* c, int ldc, bool acc) {
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m512 c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  for (int k = 0; k < kc; k++) {
    const __m512 bk = _mm512_load_ps(b);
    c0 = _mm512_fmadd_ps(_mm512_set1_ps(a0[0]), bk, c0);
    c1 = _mm512_fmadd_ps(_mm512_set1_ps(a0[1]), bk, c1);
    c2 = _mm512_fmadd_ps(_mm512_set1_ps(a0[2]), bk, c2);
    c3 = _mm512_fmadd_ps(_mm512_set1_ps(a0[3]), bk, c3);
    c4 = _mm512_fmadd_ps(_mm512_set1_ps(a0[4]), bk, c4);
    c5 = _mm512_fmadd_ps(_mm512_set1_ps(a0[5]), bk, c5);
    c6 = _mm512_fmadd_ps(_mm512_set1_ps(a1[0]), bk, c6);
    c7 = _mm512_fmadd_ps(_mm512_set1_ps(a1[1]), bk, c7);
    c8 = _mm512_fmadd_ps(_mm512_set1_ps(a1[2]), bk, c8);
    c9 = _mm512_fmadd_ps(_mm512_set1_ps(a1[3]), bk, c9);
    c10 = _mm512_fmadd_ps(_mm512_set1_ps(a1[4]), bk, c10);
    c11 = _mm512_fmadd_ps(_mm512_set1_ps(a1[5]), bk, c11);
    a0 += 6;
    a1 += 6;
    b += 16;
  }
  const __m512 rows[12] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  for (int r = 0; r < 12; r++) {
    float* cr = c + static_cast<long>(r) * ldc;
    _mm512_storeu_ps(cr, acc ? _mm512_add_ps(rows[r], _mm512_loadu_ps(cr)) : rows[r]);
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

/** Two full tiles, rows [0, MR) from panel a0 and [MR, 2·MR) from a1, where the CPU has a kernel for that; false if not. */
bool pairKernel(int kc, const float* a0, const float* a1, const float* b, float* c, int ldc, bool acc) {
  static_assert(Tile<float>::MR == 6 && Tile<float>::NR == 16, "kernelF32Avx512Pair is written for 6×16 tiles");
  if (!hasAvx512()) return false;
  kernelF32Avx512Pair(kc, a0, a1, b, c, ldc, acc);
  return true;
}
bool pairKernel(int, const double*, const double*, const double*, double*, int, bool) { return false; }

// ---- packing: panels hold op(A) / op(B) in micro-kernel order, zero-padded at edges ----
// Each case reads its source contiguously and has no per-element branches (one generic
// loop had both, which showed in the Aᵀ/Bᵀ GEMMs of the backward).

template <typename T>
void packA(bool ta, const T* A, int lda, int i0, int mc, int k0, int kc, T* out) {
  constexpr int MR = Tile<T>::MR;
  for (int p = 0; p < mc; p += MR) {
    const int rows = std::min(MR, mc - p);
    T* dst = out + static_cast<long>(p) * kc;
    if (ta) {  // op(A)(i, k) = A[k, i]: each k holds the panel's rows side by side
      const T* src = A + static_cast<long>(k0) * lda + i0 + p;
      for (int k = 0; k < kc; k++, src += lda) {
        T* d = dst + static_cast<long>(k) * MR;
        for (int r = 0; r < rows; r++) d[r] = src[r];
        for (int r = rows; r < MR; r++) d[r] = T(0);
      }
    } else {  // op(A)(i, k) = A[i, k]: one source row per panel row
      for (int r = 0; r < rows; r++) {
        const T* src = A + static_cast<long>(i0 + p + r) * lda + k0;
        for (int k = 0; k < kc; k++) dst[static_cast<long>(k) * MR + r] = src[k];
      }
      for (int r = rows; r < MR; r++)
        for (int k = 0; k < kc; k++) dst[static_cast<long>(k) * MR + r] = T(0);
    }
  }
}

template <typename T>
void packB(bool tb, const T* B, int ldb, int k0, int kc, int j0, int nc, T* out) {
  constexpr int NR = Tile<T>::NR;
  for (int q = 0; q < nc; q += NR) {
    const int cols = std::min(NR, nc - q);
    T* dst = out + static_cast<long>(q) * kc;
    if (!tb) {  // op(B)(k, j) = B[k, j]: each k copies NR contiguous values
      const T* src = B + static_cast<long>(k0) * ldb + j0 + q;
      for (int k = 0; k < kc; k++, src += ldb) {
        T* d = dst + static_cast<long>(k) * NR;
        if (cols == NR) std::memcpy(d, src, sizeof(T) * NR);
        else {
          for (int j = 0; j < cols; j++) d[j] = src[j];
          for (int j = cols; j < NR; j++) d[j] = T(0);
        }
      }
    } else {  // op(B)(k, j) = B[j, k]: one source row per panel column
      for (int j = 0; j < cols; j++) {
        const T* src = B + static_cast<long>(j0 + q + j) * ldb + k0;
        for (int k = 0; k < kc; k++) dst[static_cast<long>(k) * NR + j] = src[k];
      }
      for (int j = cols; j < NR; j++)
        for (int k = 0; k < kc; k++) dst[static_cast<long>(k) * NR + j] = T(0);
    }
  }
}

/** Packing buffers kept per thread and grown on demand: a fresh 1 MB buffer per GEMM call
 *  cost an mmap, page faults and a munmap every time. */
template <typename T> T* scratch(int which, size_t n) {
  struct Buf {
    T* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[2];
  Buf& b = bufs[which];
  if (b.n < n) {
    std::free(b.p);
    b.p = static_cast<T*>(std::aligned_alloc(64, ((n * sizeof(T) + 63) / 64) * 64));
    b.n = b.p ? n : 0;
    if (!b.p) fail("OUT_OF_MEMORY", "GEMM packing buffer allocation failed");
  }
  return b.p;
}

/** One thread's share: rows [m0, m1) and columns [n0, n1) of C. */
template <typename T>
void gemmSerial(bool ta, bool tb, int m0, int m1, int n0, int n1, int K, const T* A, int lda, const T* B, int ldb, T* C,
                int ldc, bool accumulate) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR, KC = Tile<T>::KC, MC = Tile<T>::MC, NC = Tile<T>::NC;
  T* const bp = scratch<T>(0, static_cast<size_t>(KC) * (NC + NR));
  T* const ap = scratch<T>(1, static_cast<size_t>(KC) * (MC + MR));
  alignas(64) T edge[MR * NR];
  for (int jc = n0; jc < n1; jc += NC) {
    const int nc = std::min(NC, n1 - jc);
    for (int pc = 0; pc < K; pc += KC) {
      const int kc = std::min(KC, K - pc);
      const bool acc = accumulate || pc > 0;
      packB(tb, B, ldb, pc, kc, jc, nc, bp);
      for (int ic = m0; ic < m1; ic += MC) {
        const int mc = std::min(MC, m1 - ic);
        packA(ta, A, lda, ic, mc, pc, kc, ap);
        for (int jr = 0; jr < nc; jr += NR) {
          const int nr = std::min(NR, nc - jr);
          for (int ir = 0; ir < mc; ir += MR) {
            const int mr = std::min(MR, mc - ir);
            T* c = C + static_cast<long>(ic + ir) * ldc + jc + jr;
            const T* a = ap + static_cast<long>(ir) * kc;
            const T* b = bp + static_cast<long>(jr) * kc;
            if (nr == NR && ir + 2 * MR <= mc && pairKernel(kc, a, a + static_cast<long>(MR) * kc, b, c, ldc, acc)) {
              ir += MR;  // the pair did the next panel too
            } else if (mr == MR && nr == NR) {
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

/** Runs fn(lo, hi) over [0, extent) in t parts cut at multiples of `unit`; part 0 on this thread. */
template <typename F> void splitRange(int t, int extent, int unit, F&& fn) {
  const int units = (extent + unit - 1) / unit;
  t = std::max(1, std::min(t, units));
  if (t == 1) {
    fn(0, extent);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(t);
  auto part = [&](int w) {
    const int lo = std::min(extent, units * w / t * unit), hi = std::min(extent, units * (w + 1) / t * unit);
    try {
      if (lo < hi) fn(lo, hi);
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

/** Threads worth using for an M×N×K product: each should get at least ~4 MFLOP, or spawning costs more than it saves. */
int threadsForFlops(int threads, int M, int N, int K) {
  const double flops = 2.0 * M * N * K;
  return std::max(1, std::min(threads, static_cast<int>(flops / 4e6)));
}

std::atomic<int> busyJobs{0};

}  // namespace

JobSlot::JobSlot() { ++busyJobs; }
JobSlot::~JobSlot() { --busyJobs; }

int threadsNow(int cap) {
  // Every running job keeps one core busy; a GEMM adds helpers only on cores nobody holds,
  // so 4 ranks on 2 cores run one thread each (as torch's one thread per process does)
  // while a lone job still gets the whole machine. Asked at each GEMM, not once per job.
  const int idle = cpuThreads() - busyJobs.load(std::memory_order_relaxed);
  return std::max(1, std::min({cap, cpuThreads(), 1 + std::max(0, idle)}));
}

template <typename T>
void gemmOwn(bool ta, bool tb, int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
             bool accumulate, int threads) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int i = 0; i < M; i++) std::fill(C + static_cast<long>(i) * ldc, C + static_cast<long>(i) * ldc + N, T(0));
    return;
  }
  // Every element is summed in the same k order whatever the split: results do not depend on t.
  const int t = threadsForFlops(threadsNow(threads), M, N, K);
  if (M >= N)
    splitRange(t, M, Tile<T>::MR, [&](int lo, int hi) { gemmSerial(ta, tb, lo, hi, 0, N, K, A, lda, B, ldb, C, ldc, accumulate); });
  else
    splitRange(t, N, Tile<T>::NR, [&](int lo, int hi) { gemmSerial(ta, tb, 0, M, lo, hi, K, A, lda, B, ldb, C, ldc, accumulate); });
}

template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc, bool accumulate,
          bool useBlas, int threads) {
  if (M <= 0 || N <= 0) return;
  const auto& lib = blas::library();
  if (useBlas && K > 0 && lib.sgemm) {
    const int a = ta ? blas::Trans : blas::NoTrans, b = tb ? blas::Trans : blas::NoTrans;
    const T beta = accumulate ? T(1) : T(0);
    auto call = [&](int m, int n, const T* pa, const T* pb, T* pc) {
      if constexpr (std::is_same_v<T, float>) lib.sgemm(blas::RowMajor, a, b, m, n, K, 1.0f, pa, lda, pb, ldb, beta, pc, ldc);
      else lib.dgemm(blas::RowMajor, a, b, m, n, K, 1.0, pa, lda, pb, ldb, beta, pc, ldc);
    };
    // With OpenBLAS pinned to one thread, C is cut into fixed blocks of 512 rows (or columns)
    // that threads share out. The cut depends on the shape only: OpenBLAS's result for a row
    // changes with the block it lands in, so a cut by thread count would not be deterministic.
    constexpr int block = 512;
    const bool byRows = M >= N;
    const int extent = byRows ? M : N, blocks = (extent + block - 1) / block;
    const int t = lib.singleThreaded ? threadsForFlops(threadsNow(threads), M, N, K) : 1;
    splitRange(t, blocks, 1, [&](int b0, int b1) {
      for (int bi = b0; bi < b1; bi++) {
        const int lo = bi * block, hi = std::min(extent, lo + block);
        if (byRows) call(hi - lo, N, ta ? A + lo : A + static_cast<long>(lo) * lda, B, C + static_cast<long>(lo) * ldc);
        else call(M, hi - lo, A, tb ? B + static_cast<long>(lo) * ldb : B + lo, C + lo);
      }
    });
    return;
  }
  gemmOwn(ta, tb, M, N, K, A, lda, B, ldb, C, ldc, accumulate, threads);
}

const char* gemmKernelName() { return hasAvx512() ? "avx512" : hasAvx2Fma() ? "avx2-fma" : "generic"; }

template void gemmOwn<float>(bool, bool, int, int, int, const float*, int, const float*, int, float*, int, bool, int);
template void gemmOwn<double>(bool, bool, int, int, int, const double*, int, const double*, int, double*, int, bool, int);
template void gemm<float>(bool, bool, int, int, int, const float*, int, const float*, int, float*, int, bool, bool, int);
template void gemm<double>(bool, bool, int, int, int, const double*, int, const double*, int, double*, int, bool, bool,
                           int);

}  // namespace ep
