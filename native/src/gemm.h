// Row-major GEMM: C[M,N] (+)= op(A)[M,K] · op(B)[K,N], op = transpose when ta / tb.
// `accumulate` false overwrites C. Through OpenBLAS when loaded and allowed, else our own
// cache-blocked kernels. Results depend only on the inputs, the kernel path and the BLAS.
// `threads` caps the threads one call may use (threadsNow decides within the cap).
#pragma once
#include <cstdint>

namespace ep {

template <typename T>
void gemmOwn(bool ta, bool tb, int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
             bool accumulate, int threads);

template <typename T>
void gemm(bool ta, bool tb, int M, int N, int K, const T* A, int lda, const T* B, int ldb, T* C, int ldc,
          bool accumulate, bool useBlas, int threads);

/** Marks an expert job running on this thread for its lifetime (process-wide count). */
struct JobSlot {
  JobSlot();
  ~JobSlot();
  JobSlot(const JobSlot&) = delete;
  JobSlot& operator=(const JobSlot&) = delete;
};

/** Threads a GEMM starting now may use: this thread plus the cores no running job holds, at most cap. */
int threadsNow(int cap);

/** What this CPU offers the SIMD paths (checked once). */
bool hasAvx2Fma();
bool hasAvx512();

/** Which micro-kernel the own GEMM uses on this CPU: "avx2-fma" or "generic". */
const char* gemmKernelName();

}  // namespace ep
