// Grouped expert MLP forward and backward on the CPU, for both weight layouts.
// packed: up/gate [D,H], down [H,D] per expert, stored (in, out);
// unpacked: up/gate [H,D], down [D,H] per expert, Linear's (out, in) order.
#pragma once
#include <vector>

namespace ep {

enum class Act { Silu = 0, Gelu = 1, Relu = 2 };

template <typename T>
struct ExpertJob {
  Act act = Act::Silu;
  bool unpacked = false;
  int D = 0, H = 0;
  std::vector<int> counts;  // rows per local expert, in order; any may be 0
  const T* x = nullptr;     // [R, D]
  std::vector<const T*> up, gate, down;  // per expert; gate empty unless silu
  // forward outputs
  T* y = nullptr;      // [R, D]
  T* saveUp = nullptr;    // [R, H] x·up (pre-activation), kept for backward
  T* saveGate = nullptr;  // [R, H] x·gate (silu only)
  // [R, H] sigmoid(x·gate), optional: for the f32 SwiGLU's SIMD path the forward fills it and
  // the backward, given saveHidden too, reads it instead of evaluating exp again (ignored
  // where that path does not run).
  double* saveSigmoid = nullptr;
  // [R, H] the activation's output, optional: the forward fills it and the backward reads it
  // instead of evaluating the activation again (a pass over four [R, H] arrays per expert).
  T* saveHidden = nullptr;
  // backward inputs / outputs
  const T* gy = nullptr;  // [R, D]
  T* gx = nullptr;        // [R, D]
  std::vector<T*> gUp, gGate, gDown;  // same shapes as the weights
  bool useBlas = true;
  int threads = 1;
};

template <typename T> void expertForward(const ExpertJob<T>& job);
template <typename T> void expertBackward(const ExpertJob<T>& job);


// The EP layer's row bookkeeping (src/ep/layer.ts), with the layer's exact arithmetic:
// products and sums in double, one rounding into T, rows in order (deterministic).

/** gather: dst[i] = src[index[i]]; scatter: dst[index[i]] = src[i]; times scale[i] when given. */
template <typename T>
void moveRows(const T* src, long srcRows, long D, const int* index, long n, T* dst, long dstRows, const double* scale,
              bool scatter);
/**
 * dst[t] = Σ_k weight[p]·src[p] over p = positions[t·K + k] (weight 1 when null): summed in
 * double from 0 in k order, rounded once into T. Each token's positions must ascend.
 */
template <typename T>
void combineRows(const T* src, long S, long D, const int* positions, long tokens, long K, const double* weight, T* dst);
/** gr[p] = w[p] · g[token[p]] and gw[entry[p]] = <g[token[p]], ret[p]> (the combine's backward). */
template <typename T>
void routeGrad(const T* g, long tokens, long D, const T* ret, long S, const int* token, const int* entry, const double* w,
               T* gr, double* gw, long entries);

}  // namespace ep
