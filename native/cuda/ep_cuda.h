// C interface between the addon (g++) and the CUDA kernels (nvcc). Every function returns
// a cudaError_t value (0 = success); epc_error_name / epc_error_string describe it.
// Pointers named d_* are device memory; counts and sizes are host values.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

const char* epc_error_name(int err);
const char* epc_error_string(int err);

int epc_device_count(int* n);
int epc_device_info(int dev, char* name, size_t nameLen, int* major, int* minor, int* runtimeVersion, int* driverVersion);
int epc_set_device(int dev);

/** The calling thread's stream (one per rank: each rank runs on its own worker thread). */
int epc_stream(void** stream);
int epc_malloc(void** d_ptr, size_t bytes);
int epc_free(void* d_ptr);
int epc_upload(void* d_dst, const void* src, size_t bytes);
int epc_download(void* dst, const void* d_src, size_t bytes);
/** Device-to-device copy on the calling thread's stream (the device-copy transport). */
int epc_copy(void* d_dst, const void* d_src, size_t bytes);
int epc_sync(void);
/** 0 when the calling thread's stream is idle, cudaErrorNotReady (600) while work is pending. */
int epc_query(void);

enum { EPC_F32 = 0, EPC_BF16 = 1 };
enum { EPC_SILU = 0, EPC_GELU = 1, EPC_RELU = 2 };

/**
 * Grouped expert MLP on device memory. x [R,D] in `dtype`; weights per expert in `dtype`
 * packed (in,out) (up/gate [D,H], down [H,D]) or, when unpacked, (out,in) (up/gate [H,D],
 * down [D,H]); d_up[e] etc. are device pointers. Outputs and saved pre-activations are f32.
 */
typedef struct {
  int dtype, act, unpacked, D, H, E;
  const int* counts;  // host, E entries
  const void* d_x;
  const void* const* d_up;
  const void* const* d_gate;  // NULL unless silu
  const void* const* d_down;
  float* d_y;         // [R,D]
  float* d_saveUp;    // [R,H]
  float* d_saveGate;  // [R,H], silu only
  // backward
  const float* d_gy;  // [R,D]
  float* d_gx;        // [R,D]
  float* const* d_gUp;  // per expert, shapes as the weights, f32
  float* const* d_gGate;
  float* const* d_gDown;
} epc_expert_job;

int epc_expert_forward(const epc_expert_job* job);
int epc_expert_backward(const epc_expert_job* job);

/**
 * Dispatch permutation on the device: keys[s] = global expert id of entry s (S = T·K
 * entries, t-major). A stable counting sort by expert id orders entries by destination
 * rank, then by local expert. Writes order[p] = entry at sorted position p, pos[s] = its
 * position, and counts[e] (device, E ints).
 */
int epc_sort_by_expert(const int* d_keys, int S, int E, int* d_order, int* d_pos, int* d_counts);
/** dst[p] = src[rowOf[p] / div] for rows of `cols` f32 (div = K maps entries to tokens). */
int epc_gather_rows(const float* d_src, const int* d_rowOf, int n, int div, int cols, float* d_dst);
/** out[t] = Σ_k w[t·K+k] · src[pos[t·K+k]]: the combine, fixed order (deterministic). */
int epc_weighted_combine(const float* d_src, const int* d_pos, const float* d_w, int T, int K, int cols, float* d_out);

/** Timing helpers for gpu-check: grouped GEMM fwd/bwd and dispatch/combine at a shape. */
int epc_bench_gemm(int dtype, int E, int rowsPerExpert, int D, int H, int iters, float* fwdMs, float* bwdMs);
int epc_bench_permute(int T, int K, int E, int D, int iters, float* dispatchMs, float* combineMs);

#ifdef __cplusplus
}
#endif
