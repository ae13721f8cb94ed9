// JavaScript bindings of the CUDA kernels (native/cuda/ep_cuda.h). Calls run on the
// calling thread, on that thread's own stream: each rank is a worker thread, so each rank
// has its stream. Every CUDA error becomes a NativeError CUDA_ERROR_<NAME> with CUDA's text.
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "addon.h"
#include "ep_cuda.h"

namespace ep {
namespace {

/** cudaErrorNoDevice → CUDA_ERROR_NO_DEVICE */
std::string codeOf(int err) {
  std::string n = epc_error_name(err);
  if (n.rfind("cudaError", 0) == 0) n = n.substr(9);
  std::string out = "CUDA_ERROR";
  for (char c : n) {
    if (c >= 'A' && c <= 'Z') out += '_';
    out += static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c);
  }
  return out;
}

void ck(Napi::Env env, int err, const char* what) {
  if (err != 0)
    throwNative(env, codeOf(err), std::string(what) + ": " + epc_error_string(err) + " (" + epc_error_name(err) + ")");
}

/** Fails with CUDA_NO_DEVICE unless a device is usable: the first thing every entry checks. */
void needDevice(Napi::Env env) {
  int n = 0;
  const int err = epc_device_count(&n);
  if (err != 0)
    throwNative(env, "CUDA_NO_DEVICE",
                std::string("no CUDA device: cudaGetDeviceCount failed: ") + epc_error_string(err) + " (" + epc_error_name(err) + ")");
  if (n == 0) throwNative(env, "CUDA_NO_DEVICE", "no CUDA device: cudaGetDeviceCount found 0 devices");
}

struct DevBuf {
  void* p = nullptr;
  DevBuf() = default;
  DevBuf(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p(o.p) { o.p = nullptr; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    std::swap(p, o.p);
    return *this;
  }
  ~DevBuf() {
    if (p) epc_free(p);
  }
};

uint16_t toBf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x7fffffu)) return static_cast<uint16_t>((b >> 16) | 0x40);
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/** Host f32 → device buffer in the kernel dtype (bf16 rounded to nearest even). */
DevBuf upload(Napi::Env env, const float* src, size_t n, int dtype) {
  DevBuf d;
  if (dtype == EPC_BF16) {
    std::vector<uint16_t> h(n);
    for (size_t i = 0; i < n; i++) h[i] = toBf16(src[i]);
    ck(env, epc_malloc(&d.p, n * 2), "cudaMalloc");
    ck(env, epc_upload(d.p, h.data(), n * 2), "upload");
  } else {
    ck(env, epc_malloc(&d.p, n * 4), "cudaMalloc");
    ck(env, epc_upload(d.p, src, n * 4), "upload");
  }
  return d;
}

DevBuf alloc(Napi::Env env, size_t bytes) {
  DevBuf d;
  ck(env, epc_malloc(&d.p, bytes), "cudaMalloc");
  return d;
}

float* f32(Napi::Env env, Napi::Object o, const char* k, long len) {
  return static_cast<float*>(typedData(env, o.Get(k), napi_float32_array, len, (std::string("job.") + k).c_str()));
}

std::vector<float*> f32List(Napi::Env env, Napi::Object o, const char* k, size_t n, long len) {
  Napi::Value v = o.Get(k);
  if (!v.IsArray() || v.As<Napi::Array>().Length() != n)
    throwNative(env, "BAD_ARGUMENT", std::string("job.") + k + " must list one array per expert");
  std::vector<float*> out;
  for (uint32_t i = 0; i < n; i++) {
    const std::string what = std::string("job.") + k + "[" + std::to_string(i) + "]";
    out.push_back(static_cast<float*>(typedData(env, v.As<Napi::Array>().Get(i), napi_float32_array, len, what.c_str())));
  }
  return out;
}

int actOf(Napi::Env env, const std::string& a) {
  if (a == "silu") return EPC_SILU;
  if (a == "gelu") return EPC_GELU;
  if (a == "relu") return EPC_RELU;
  throwNative(env, "BAD_ARGUMENT", "unknown activation '" + a + "'");
}

/**
 * cudaExpertForward(job, precision) / cudaExpertBackward(job, precision): the CPU job
 * format (f32 arrays, see src/native/backend.ts); precision 'f32' or 'bf16' (inputs and
 * weights rounded to bf16 on upload, f32 accumulation and outputs).
 */
Napi::Value expert(const Napi::CallbackInfo& info, bool backward) {
  Napi::Env env = info.Env();
  needDevice(env);
  if (!info[0].IsObject()) throwNative(env, "BAD_ARGUMENT", "expected a job object");
  Napi::Object o = info[0].As<Napi::Object>();
  const int dtype = info[1].IsString() && info[1].As<Napi::String>().Utf8Value() == "bf16" ? EPC_BF16 : EPC_F32;
  epc_expert_job j{};
  j.dtype = dtype;
  j.act = actOf(env, o.Get("act").ToString());
  j.unpacked = o.Get("layout").ToString().Utf8Value() == "unpacked";
  j.D = o.Get("d").ToNumber().Int32Value();
  j.H = o.Get("h").ToNumber().Int32Value();
  size_t E = 0;
  const int* counts = static_cast<const int*>(typedData(env, o.Get("counts"), napi_int32_array, -1, "job.counts", &E));
  j.E = static_cast<int>(E);
  j.counts = counts;
  if (j.D <= 0 || j.H <= 0) throwNative(env, "BAD_ARGUMENT", "job.d and job.h must be positive");
  long R = 0;
  for (size_t e = 0; e < E; e++) {
    // a negative count would shift every later expert's rows (and grid) outside its buffers
    if (counts[e] < 0) throwNative(env, "BAD_ARGUMENT", "job.counts[" + std::to_string(e) + "] is negative");
    R += counts[e];
  }
  const long D = j.D, H = j.H, W = D * H;
  const bool gated = j.act == EPC_SILU;

  DevBuf x = upload(env, f32(env, o, "x", R * D), R * D, dtype);
  std::vector<DevBuf> ws;
  std::vector<const void*> up, gate, down;
  auto weights = [&](const char* k, std::vector<const void*>& dst) {
    for (float* p : f32List(env, o, k, E, W)) {
      ws.push_back(upload(env, p, W, dtype));
      dst.push_back(ws.back().p);
    }
  };
  weights("up", up);
  weights("down", down);
  if (gated) weights("gate", gate);
  j.d_x = x.p;
  j.d_up = up.data();
  j.d_down = down.data();
  j.d_gate = gated ? gate.data() : nullptr;
  float* saveUp = f32(env, o, "saveUp", R * H);
  float* saveGate = gated ? f32(env, o, "saveGate", R * H) : nullptr;
  DevBuf dSaveUp, dSaveGate;
  if (!backward) {
    dSaveUp = alloc(env, R * H * 4);
    if (gated) dSaveGate = alloc(env, R * H * 4);
    DevBuf y = alloc(env, R * D * 4);
    j.d_y = static_cast<float*>(y.p);
    j.d_saveUp = static_cast<float*>(dSaveUp.p);
    j.d_saveGate = static_cast<float*>(dSaveGate.p);
    ck(env, epc_expert_forward(&j), "expert forward");
    ck(env, epc_download(f32(env, o, "y", R * D), y.p, R * D * 4), "download y");
    ck(env, epc_download(saveUp, dSaveUp.p, R * H * 4), "download saved");
    if (gated) ck(env, epc_download(saveGate, dSaveGate.p, R * H * 4), "download saved");
    return env.Undefined();
  }
  dSaveUp = upload(env, saveUp, R * H, EPC_F32);
  if (gated) dSaveGate = upload(env, saveGate, R * H, EPC_F32);
  DevBuf gy = upload(env, f32(env, o, "gy", R * D), R * D, EPC_F32);
  DevBuf gx = alloc(env, R * D * 4);
  j.d_saveUp = static_cast<float*>(dSaveUp.p);
  j.d_saveGate = static_cast<float*>(dSaveGate.p);
  j.d_gy = static_cast<const float*>(gy.p);
  j.d_gx = static_cast<float*>(gx.p);
  std::vector<DevBuf> gs;
  std::vector<float*> gUp, gGate, gDown;
  std::vector<float*> hUp = f32List(env, o, "gUp", E, W), hDown = f32List(env, o, "gDown", E, W);
  std::vector<float*> hGate = gated ? f32List(env, o, "gGate", E, W) : std::vector<float*>{};
  auto grads = [&](size_t n, std::vector<float*>& dst) {
    for (size_t i = 0; i < n; i++) {
      gs.push_back(alloc(env, W * 4));
      dst.push_back(static_cast<float*>(gs.back().p));
    }
  };
  grads(E, gUp);
  grads(E, gDown);
  if (gated) grads(E, gGate);
  j.d_gUp = gUp.data();
  j.d_gDown = gDown.data();
  j.d_gGate = gated ? gGate.data() : nullptr;
  ck(env, epc_expert_backward(&j), "expert backward");
  ck(env, epc_download(f32(env, o, "gx", R * D), gx.p, R * D * 4), "download gx");
  for (size_t e = 0; e < E; e++) {
    ck(env, epc_download(hUp[e], gUp[e], W * 4), "download grads");
    ck(env, epc_download(hDown[e], gDown[e], W * 4), "download grads");
    if (gated) ck(env, epc_download(hGate[e], gGate[e], W * 4), "download grads");
  }
  return env.Undefined();
}

Napi::Value CudaInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  needDevice(env);
  int n = 0;
  ck(env, epc_device_count(&n), "cudaGetDeviceCount");
  Napi::Object o = Napi::Object::New(env);
  Napi::Array names = Napi::Array::New(env);
  int rt = 0, drv = 0;
  for (int d = 0; d < n; d++) {
    char name[256];
    int major = 0, minor = 0;
    ck(env, epc_device_info(d, name, sizeof name, &major, &minor, &rt, &drv), "cudaGetDeviceProperties");
    names.Set(d, Napi::String::New(env, std::string(name) + " (sm_" + std::to_string(major * 10 + minor) + ")"));
  }
  o.Set("devices", n);
  o.Set("names", names);
  o.Set("runtimeVersion", rt);
  o.Set("driverVersion", drv);
  return o;
}

Napi::Value CudaSetDevice(const Napi::CallbackInfo& info) {
  needDevice(info.Env());
  ck(info.Env(), epc_set_device(info[0].ToNumber().Int32Value()), "cudaSetDevice");
  return info.Env().Undefined();
}

/** cudaPermute(keys: Int32Array [T·K], E, x: Float32Array [T,D], K) → {order, pos, counts, rows}. */
Napi::Value CudaPermute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  needDevice(env);
  size_t S = 0, xl = 0;
  const int* keys = static_cast<const int*>(typedData(env, info[0], napi_int32_array, -1, "keys", &S));
  const int E = info[1].ToNumber().Int32Value();
  const float* x = static_cast<const float*>(typedData(env, info[2], napi_float32_array, -1, "x", &xl));
  const int K = info[3].ToNumber().Int32Value();
  if (E <= 0 || K <= 0 || S % K) throwNative(env, "BAD_ARGUMENT", "keys must hold T·K expert ids, E and K positive");
  for (size_t i = 0; i < S; i++)
    if (keys[i] < 0 || keys[i] >= E) throwNative(env, "INDEX_OUT_OF_RANGE", "expert id " + std::to_string(keys[i]) + " outside [0, E)");
  const size_t T = S / K;
  if (T == 0 ? xl != 0 : xl % T) throwNative(env, "BAD_ARGUMENT", "x must be [T, D]");
  const int D = T ? static_cast<int>(xl / T) : 0;
  DevBuf dk = alloc(env, S * 4), order = alloc(env, S * 4), pos = alloc(env, S * 4), counts = alloc(env, E * 4);
  DevBuf dx = alloc(env, xl * 4), rows = alloc(env, S * D * 4);
  ck(env, epc_upload(dk.p, keys, S * 4), "upload keys");
  ck(env, epc_upload(dx.p, x, xl * 4), "upload x");
  ck(env, epc_sort_by_expert(static_cast<int*>(dk.p), static_cast<int>(S), E, static_cast<int*>(order.p), static_cast<int*>(pos.p),
                             static_cast<int*>(counts.p)), "dispatch sort");
  ck(env, epc_gather_rows(static_cast<float*>(dx.p), static_cast<int*>(order.p), static_cast<int>(S), K, D, static_cast<float*>(rows.p)),
     "dispatch gather");
  Napi::Object o = Napi::Object::New(env);
  auto out = [&](const char* k, auto arr, const DevBuf& b) {
    ck(env, epc_download(arr.Data(), b.p, arr.ByteLength()), "download");
    o.Set(k, arr);
  };
  out("order", Napi::Int32Array::New(env, S), order);
  out("pos", Napi::Int32Array::New(env, S), pos);
  out("counts", Napi::Int32Array::New(env, E), counts);
  out("rows", Napi::Float32Array::New(env, S * D), rows);
  return o;
}

/** cudaScatterAdd(src [S,D], pos: Int32Array [T·K], w: Float32Array [T·K], K) → out [T,D]: the combine. */
Napi::Value CudaScatterAdd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  needDevice(env);
  size_t sl = 0, S = 0;
  const float* src = static_cast<const float*>(typedData(env, info[0], napi_float32_array, -1, "src", &sl));
  const int* pos = static_cast<const int*>(typedData(env, info[1], napi_int32_array, -1, "pos", &S));
  const float* w = static_cast<const float*>(typedData(env, info[2], napi_float32_array, static_cast<long>(S), "w"));
  const int K = info[3].ToNumber().Int32Value();
  if (K <= 0 || S % K || (S ? sl % S : sl)) throwNative(env, "BAD_ARGUMENT", "src must be [T·K, D] and pos, w [T·K]");
  const size_t D = S ? sl / S : 0, T = S / K;
  for (size_t i = 0; i < S; i++)
    if (pos[i] < 0 || static_cast<size_t>(pos[i]) >= S) throwNative(env, "INDEX_OUT_OF_RANGE", "pos[" + std::to_string(i) + "] outside [0, S)");
  DevBuf dsrc = upload(env, src, sl, EPC_F32), dpos = alloc(env, S * 4), dw = upload(env, w, S, EPC_F32), dout = alloc(env, T * D * 4);
  ck(env, epc_upload(dpos.p, pos, S * 4), "upload pos");
  ck(env, epc_weighted_combine(static_cast<float*>(dsrc.p), static_cast<int*>(dpos.p), static_cast<float*>(dw.p), static_cast<int>(T), K,
                               static_cast<int>(D), static_cast<float*>(dout.p)), "weighted combine");
  Napi::Float32Array out = Napi::Float32Array::New(env, T * D);
  ck(env, epc_download(out.Data(), dout.p, T * D * 4), "download");
  return out;
}

/** cudaBench('gemm', {precision, experts, rowsPerExpert, d, h, iters}) or ('permute', {tokens, topK, experts, d, iters}). */
Napi::Value CudaBench(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  needDevice(env);
  const std::string kind = info[0].ToString();
  Napi::Object p = info[1].As<Napi::Object>();
  auto num = [&](const char* k) { return p.Get(k).ToNumber().Int32Value(); };
  Napi::Object o = Napi::Object::New(env);
  float a = 0, b = 0;
  if (kind == "gemm") {
    const int dt = p.Get("precision").ToString().Utf8Value() == "bf16" ? EPC_BF16 : EPC_F32;
    ck(env, epc_bench_gemm(dt, num("experts"), num("rowsPerExpert"), num("d"), num("h"), num("iters"), &a, &b), "bench gemm");
    o.Set("forwardMs", a);
    o.Set("backwardMs", b);
  } else if (kind == "permute") {
    ck(env, epc_bench_permute(num("tokens"), num("topK"), num("experts"), num("d"), num("iters"), &a, &b), "bench permute");
    o.Set("dispatchMs", a);
    o.Set("combineMs", b);
  } else {
    throwNative(env, "BAD_ARGUMENT", "unknown bench '" + kind + "'");
  }
  return o;
}

// The device-copy transport's primitives: device pointers travel between rank workers as BigInt.
void* ptrArg(Napi::Env env, Napi::Value v, const char* what) {
  bool lossless = false;
  if (!v.IsBigInt()) throwNative(env, "BAD_ARGUMENT", std::string(what) + " must be a device pointer (bigint)");
  return reinterpret_cast<void*>(v.As<Napi::BigInt>().Uint64Value(&lossless));
}

Napi::Value CudaAlloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  needDevice(env);
  void* p = nullptr;
  ck(env, epc_malloc(&p, static_cast<size_t>(info[0].ToNumber().Int64Value())), "cudaMalloc");
  return Napi::BigInt::New(env, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)));
}

Napi::Value CudaFree(const Napi::CallbackInfo& info) {
  ck(info.Env(), epc_free(ptrArg(info.Env(), info[0], "ptr")), "cudaFree");
  return info.Env().Undefined();
}

Napi::Value CudaUpload(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto ta = info[1].As<Napi::TypedArray>();
  ck(env, epc_upload(ptrArg(env, info[0], "dst"), viewBytes(env, ta), ta.ByteLength()), "upload");
  return env.Undefined();
}

Napi::Value CudaDownload(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto ta = info[1].As<Napi::TypedArray>();
  ck(env, epc_download(viewBytes(env, ta), ptrArg(env, info[0], "src"), ta.ByteLength()), "download");
  return env.Undefined();
}

Napi::Value CudaCopy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ck(env, epc_copy(ptrArg(env, info[0], "dst"), ptrArg(env, info[1], "src"), static_cast<size_t>(info[2].ToNumber().Int64Value())), "device copy");
  return env.Undefined();
}

}  // namespace

void initCuda(Napi::Env env, Napi::Object exports) {
  exports.Set("cudaInfo", Napi::Function::New(env, CudaInfo, "cudaInfo"));
  exports.Set("cudaSetDevice", Napi::Function::New(env, CudaSetDevice, "cudaSetDevice"));
  exports.Set("cudaExpertForward", Napi::Function::New(env, [](const Napi::CallbackInfo& i) { return expert(i, false); }, "cudaExpertForward"));
  exports.Set("cudaExpertBackward", Napi::Function::New(env, [](const Napi::CallbackInfo& i) { return expert(i, true); }, "cudaExpertBackward"));
  exports.Set("cudaPermute", Napi::Function::New(env, CudaPermute, "cudaPermute"));
  exports.Set("cudaScatterAdd", Napi::Function::New(env, CudaScatterAdd, "cudaScatterAdd"));
  exports.Set("cudaBench", Napi::Function::New(env, CudaBench, "cudaBench"));
  exports.Set("cudaAlloc", Napi::Function::New(env, CudaAlloc, "cudaAlloc"));
  exports.Set("cudaFree", Napi::Function::New(env, CudaFree, "cudaFree"));
  exports.Set("cudaUpload", Napi::Function::New(env, CudaUpload, "cudaUpload"));
  exports.Set("cudaDownload", Napi::Function::New(env, CudaDownload, "cudaDownload"));
  exports.Set("cudaCopy", Napi::Function::New(env, CudaCopy, "cudaCopy"));
}

}  // namespace ep
