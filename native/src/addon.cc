#include "addon.h"
#include <cerrno>
#include <cstring>
#include <ctime>
#ifdef __linux__
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <string>

#include "blas.h"
#include "experts.h"
#include "gemm.h"

namespace ep {

Napi::Error nativeError(Napi::Env env, const std::string& code, const std::string& msg) {
  auto* self = env.GetInstanceData<EpAddon>();
  if (self && !self->errorCtor.IsEmpty()) {
    Napi::Object e = self->errorCtor.New({Napi::String::New(env, msg), Napi::String::New(env, code)});
    return Napi::Error(env, e);
  }
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

void throwNative(Napi::Env env, const std::string& code, const std::string& msg) { throw nativeError(env, code, msg); }

static const char* typeName(napi_typedarray_type t) {
  switch (t) {
    case napi_float32_array: return "Float32Array";
    case napi_float64_array: return "Float64Array";
    case napi_int32_array: return "Int32Array";
    case napi_uint16_array: return "Uint16Array";
    case napi_uint8_array: return "Uint8Array";
    default: return "another typed array";
  }
}

void* typedData(Napi::Env env, Napi::Value v, napi_typedarray_type want, long len, const char* what, size_t* outLen) {
  if (!v.IsTypedArray()) throwNative(env, "BAD_ARGUMENT", std::string(what) + " must be a " + typeName(want));
  auto ta = v.As<Napi::TypedArray>();
  if (ta.TypedArrayType() != want)
    throwNative(env, "BAD_ARGUMENT", std::string(what) + " must be a " + typeName(want) + ", got " + typeName(ta.TypedArrayType()));
  if (len >= 0 && static_cast<long>(ta.ElementLength()) != len)
    throwNative(env, "BAD_ARGUMENT", std::string(what) + " holds " + std::to_string(ta.ElementLength()) +
                                         " elements, expected " + std::to_string(len));
  if (outLen) *outLen = ta.ElementLength();
  return viewBytes(env, ta);
}

uint8_t* viewBytes(Napi::Env env, const Napi::TypedArray& ta) {
  // Not ta.ArrayBuffer().Data(): node-addon-api's ArrayBuffer refuses a SharedArrayBuffer.
  void* data = nullptr;
  if (napi_get_typedarray_info(env, ta, nullptr, nullptr, &data, nullptr, nullptr) != napi_ok)
    throwNative(env, "BAD_ARGUMENT", "cannot read a typed array's memory");
  return static_cast<uint8_t*>(data);
}

namespace {

int intField(Napi::Env env, Napi::Object o, const char* k) {
  Napi::Value v = o.Get(k);
  if (!v.IsNumber()) throwNative(env, "BAD_ARGUMENT", std::string("job.") + k + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d < 0 || d > 2147483647.0 || d != static_cast<int>(d))
    throwNative(env, "BAD_ARGUMENT", std::string("job.") + k + " must be a non-negative 32-bit integer");
  return static_cast<int>(d);
}

template <typename T> constexpr napi_typedarray_type floatType() {
  return std::is_same_v<T, float> ? napi_float32_array : napi_float64_array;
}

template <typename T> T* floatArray(Napi::Env env, Napi::Object o, const char* k, long len) {
  return static_cast<T*>(typedData(env, o.Get(k), floatType<T>(), len, (std::string("job.") + k).c_str()));
}

template <typename T> std::vector<T*> floatList(Napi::Env env, Napi::Object o, const char* k, size_t n, long len) {
  Napi::Value v = o.Get(k);
  if (!v.IsArray()) throwNative(env, "BAD_ARGUMENT", std::string("job.") + k + " must be an array of typed arrays");
  auto arr = v.As<Napi::Array>();
  if (arr.Length() != n)
    throwNative(env, "BAD_ARGUMENT", std::string("job.") + k + " has " + std::to_string(arr.Length()) +
                                         " entries for " + std::to_string(n) + " experts");
  std::vector<T*> out;
  for (uint32_t i = 0; i < n; i++) {
    std::string what = std::string("job.") + k + "[" + std::to_string(i) + "]";
    out.push_back(static_cast<T*>(typedData(env, arr.Get(i), floatType<T>(), len, what.c_str())));
  }
  return out;
}

/** Reads a job object (see src/native/backend.ts) into an ExpertJob, checking every length. */
template <typename T> ExpertJob<T> parseJob(Napi::Env env, Napi::Object o, bool backward) {
  ExpertJob<T> j;
  std::string act = o.Get("act").ToString();
  if (act == "silu") j.act = Act::Silu;
  else if (act == "gelu") j.act = Act::Gelu;
  else if (act == "relu") j.act = Act::Relu;
  else throwNative(env, "BAD_ARGUMENT", "unknown activation '" + act + "'");
  j.unpacked = o.Get("layout").ToString().Utf8Value() == "unpacked";
  j.D = intField(env, o, "d");
  j.H = intField(env, o, "h");
  size_t ncounts = 0;
  const int* counts = static_cast<const int*>(typedData(env, o.Get("counts"), napi_int32_array, -1, "job.counts", &ncounts));
  j.counts.assign(counts, counts + ncounts);
  long R = 0;
  for (int c : j.counts) {
    if (c < 0) throwNative(env, "BAD_ARGUMENT", "job.counts holds a negative count");
    R += c;
  }
  const size_t n = ncounts;
  const long D = j.D, H = j.H, W = D * H;
  const bool gated = j.act == Act::Silu;
  j.x = floatArray<T>(env, o, "x", R * D);
  for (auto* p : floatList<T>(env, o, "up", n, W)) j.up.push_back(p);
  for (auto* p : floatList<T>(env, o, "down", n, W)) j.down.push_back(p);
  if (gated)
    for (auto* p : floatList<T>(env, o, "gate", n, W)) j.gate.push_back(p);
  j.saveUp = floatArray<T>(env, o, "saveUp", R * H);
  if (gated) j.saveGate = floatArray<T>(env, o, "saveGate", R * H);
  Napi::Value sig = o.Get("saveSigmoid");
  if (gated && !sig.IsNull() && !sig.IsUndefined())
    j.saveSigmoid = static_cast<double*>(typedData(env, sig, napi_float64_array, R * H, "job.saveSigmoid"));
  Napi::Value hidden = o.Get("saveHidden");
  if (!hidden.IsNull() && !hidden.IsUndefined()) j.saveHidden = floatArray<T>(env, o, "saveHidden", R * H);
  if (!backward) {
    j.y = floatArray<T>(env, o, "y", R * D);
  } else {
    j.gy = floatArray<T>(env, o, "gy", R * D);
    j.gx = floatArray<T>(env, o, "gx", R * D);
    j.gUp = floatList<T>(env, o, "gUp", n, W);
    j.gDown = floatList<T>(env, o, "gDown", n, W);
    if (gated) j.gGate = floatList<T>(env, o, "gGate", n, W);
  }
  j.useBlas = o.Get("blas").ToBoolean();
  j.threads = cpuThreads();
  return j;
}

// Jobs running at once in this process (ranks run concurrently as workers or on the pool)
// each hold one core; their GEMMs add helper threads only on cores no job holds (gemm.cc,
// threadsNow), so ranks × GEMM threads never oversubscribe the machine. Results do not
// depend on the thread count.
template <typename T> void runJob(ExpertJob<T>& j, bool backward) {
  JobSlot slot;
  j.threads = cpuThreads();
  if (backward) expertBackward(j);
  else expertForward(j);
}

/** Runs a job on libuv's pool; never touches JavaScript off the main thread. */
template <typename T> class ExpertWorker : public Napi::AsyncWorker {
 public:
  ExpertWorker(Napi::Env env, Napi::Object job, ExpertJob<T> j, bool backward)
      : Napi::AsyncWorker(env, "ep-actors:expert"),
        deferred_(Napi::Promise::Deferred::New(env)),
        keep_(Napi::Persistent(job)),
        job_(std::move(j)),
        backward_(backward) {}
  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      runJob(job_, backward_);
    } catch (const Failure& f) {
      code_ = f.code;
      msg_ = f.what();
    } catch (const std::exception& e) {
      code_ = "NATIVE_ERROR";
      msg_ = e.what();
    }
  }
  void OnOK() override {
    if (code_.empty()) deferred_.Resolve(Env().Undefined());
    else deferred_.Reject(nativeError(Env(), code_, msg_).Value());
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference keep_;  // keeps every input and output array alive until done
  ExpertJob<T> job_;
  bool backward_;
  std::string code_, msg_;
};

template <typename F> auto guarded(Napi::Env env, F&& f) {
  try {
    return f();
  } catch (const Failure& e) {
    throw nativeError(env, e.code, e.what());
  }
}

Napi::Value runExpert(const Napi::CallbackInfo& info, bool backward) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwNative(env, "BAD_ARGUMENT", "expected a job object");
  Napi::Object job = info[0].As<Napi::Object>();
  const bool f64 = job.Get("dtype").ToString().Utf8Value() == "f64";
  const bool sync = info[1].ToBoolean();
  auto go = [&](auto tag) -> Napi::Value {
    using T = decltype(tag);
    ExpertJob<T> j = parseJob<T>(env, job, backward);
    if (sync) {
      guarded(env, [&] { runJob(j, backward); return 0; });
      return env.Undefined();
    }
    auto* w = new ExpertWorker<T>(env, job, std::move(j), backward);
    Napi::Promise p = w->promise();
    w->Queue();
    return p;
  };
  return f64 ? go(double{}) : go(float{});
}

}  // namespace

EpAddon::EpAddon(Napi::Env env, Napi::Object exports) {
  DefineAddon(exports, {
                           InstanceMethod("setErrorClass", &EpAddon::SetErrorClass),
                           InstanceMethod("info", &EpAddon::Info),
                           InstanceMethod("setThreads", &EpAddon::SetThreads),
                           InstanceMethod("expertForward", &EpAddon::ExpertForward),
                           InstanceMethod("expertBackward", &EpAddon::ExpertBackward),
                           InstanceMethod("gemm", &EpAddon::Gemm),
                           InstanceMethod("moveRows", &EpAddon::MoveRows),
                           InstanceMethod("combineRows", &EpAddon::CombineRows),
                           InstanceMethod("routeGrad", &EpAddon::RouteGrad),
                           InstanceMethod("futexWait", &EpAddon::FutexWait),
                           InstanceMethod("futexWake", &EpAddon::FutexWake),
                           InstanceMethod("shmCreate", &EpAddon::ShmCreate),
                           InstanceMethod("yieldThread", &EpAddon::YieldThread),
                           InstanceMethod("shmOpen", &EpAddon::ShmOpen),
                       });
  initCuda(env, exports);
  initNccl(env, exports, *this);
  // Worker exit: abort communicators and join their threads before the environment goes.
  // The hook is removed again if the addon is finalized first, so it never sees a freed this.
  env_ = env;
  napi_add_env_cleanup_hook(env, &EpAddon::cleanupHook, this);
}

void EpAddon::cleanupHook(void* self) {
  auto* a = static_cast<EpAddon*>(self);
  a->hookRan = true;
  a->teardown();
}

EpAddon::~EpAddon() {
  if (!hookRan) napi_remove_env_cleanup_hook(env_, &EpAddon::cleanupHook, this);
  teardown();
}

void EpAddon::teardown() {
  if (tornDown) return;
  tornDown = true;
  for (auto it = onTeardown.rbegin(); it != onTeardown.rend(); ++it) (*it)();
  onTeardown.clear();
}

Napi::Value EpAddon::SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throwNative(info.Env(), "BAD_ARGUMENT", "setErrorClass expects the NativeError class");
  errorCtor = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

Napi::Value EpAddon::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  const auto& lib = blas::library();
  o.Set("blas", lib.name.empty() ? env.Null() : Napi::String::New(env, lib.name));
  o.Set("blasReason", Napi::String::New(env, lib.reason));
  o.Set("kernel", Napi::String::New(env, gemmKernelName()));
  o.Set("threads", Napi::Number::New(env, cpuThreads()));
#ifdef EP_WITH_CUDA
  o.Set("cudaBuilt", Napi::Boolean::New(env, true));
#else
  o.Set("cudaBuilt", Napi::Boolean::New(env, false));
#endif
  return o;
}

Napi::Value EpAddon::ExpertForward(const Napi::CallbackInfo& info) { return runExpert(info, false); }
Napi::Value EpAddon::ExpertBackward(const Napi::CallbackInfo& info) { return runExpert(info, true); }

// setThreads(n): every CPU kernel of the process uses at most n threads (0: the default).
Napi::Value EpAddon::SetThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) {
    Napi::TypeError::New(env, "setThreads(n) needs a number").ThrowAsJavaScriptException();
    return env.Undefined();
  }
  setCpuThreads(info[0].As<Napi::Number>().Int32Value());
  return env.Undefined();
}

// gemm({dtype, ta, tb, m, n, k, a, b, c, accumulate, impl: 'own' | 'blas' | 'auto', threads?})
Napi::Value EpAddon::Gemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsObject()) throwNative(env, "BAD_ARGUMENT", "expected a gemm spec object");
  Napi::Object o = info[0].As<Napi::Object>();
  const bool ta = o.Get("ta").ToBoolean(), tb = o.Get("tb").ToBoolean(), acc = o.Get("accumulate").ToBoolean();
  const int M = intField(env, o, "m"), N = intField(env, o, "n"), K = intField(env, o, "k");
  const std::string impl = o.Get("impl").ToString();
  // Optional cap on threads (benchmarks compare one thread against one-thread OpenBLAS).
  const int threads = o.Get("threads").IsUndefined() ? cpuThreads() : std::max(1, intField(env, o, "threads"));
  if (impl == "blas" && !blas::library().sgemm)
    throwNative(env, "BLAS_UNAVAILABLE", "impl 'blas' asked for, but " + blas::library().reason);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* A = floatArray<T>(env, o, "a", static_cast<long>(M) * K);
    const T* B = floatArray<T>(env, o, "b", static_cast<long>(K) * N);
    T* C = floatArray<T>(env, o, "c", static_cast<long>(M) * N);
    const int lda = ta ? M : K, ldb = tb ? K : N;
    guarded(env, [&] {
      if (impl == "own") gemmOwn<T>(ta, tb, M, N, K, A, lda, B, ldb, C, N, acc, threads);
      else gemm<T>(ta, tb, M, N, K, A, lda, B, ldb, C, N, acc, true, threads);
      return 0;
    });
  };
  if (o.Get("dtype").ToString().Utf8Value() == "f64") go(double{});
  else go(float{});
  return env.Undefined();
}

static bool isF64(const Napi::Value& v) {
  return v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_float64_array;
}

static long rowSizeArg(Napi::Env env, const Napi::Value& v) {
  if (!v.IsNumber()) throwNative(env, "BAD_ARGUMENT", "rowSize must be a number");
  const long rs = v.As<Napi::Number>().Int64Value();
  if (rs <= 0) throwNative(env, "BAD_ARGUMENT", "rowSize must be positive");
  return rs;
}

static const double* optionalF64(Napi::Env env, const Napi::Value& v, long len, const char* what) {
  if (v.IsNull() || v.IsUndefined()) return nullptr;
  return static_cast<const double*>(typedData(env, v, napi_float64_array, len, what));
}

// moveRows(src, rowSize, index: Int32Array, dst, scale: Float64Array | null, scatter: boolean)
Napi::Value EpAddon::MoveRows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const long rs = rowSizeArg(env, info[1]);
  size_t n = 0, srcLen = 0, dstLen = 0;
  const int* idx = static_cast<const int*>(typedData(env, info[2], napi_int32_array, -1, "index", &n));
  const double* scale = optionalF64(env, info[4], static_cast<long>(n), "scale");
  const bool scatter = info[5].ToBoolean();
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(typedData(env, info[0], floatType<T>(), -1, "src", &srcLen));
    T* dst = static_cast<T*>(typedData(env, info[3], floatType<T>(), -1, "dst", &dstLen));
    if (srcLen % rs || dstLen % rs) throwNative(env, "BAD_ARGUMENT", "src and dst lengths must be multiples of rowSize");
    if (static_cast<long>(n) > static_cast<long>((scatter ? srcLen : dstLen) / rs))
      throwNative(env, "BAD_ARGUMENT", "index has more entries than the " + std::string(scatter ? "src" : "dst") + " rows");
    guarded(env, [&] {
      moveRows<T>(src, srcLen / rs, rs, idx, n, dst, dstLen / rs, scale, scatter);
      return 0;
    });
  };
  if (isF64(info[0])) go(double{});
  else go(float{});
  return env.Undefined();
}

// combineRows(src [S,rowSize], rowSize, positions: Int32Array [tokens·K], K, weight: Float64Array [S] | null, dst [tokens,rowSize])
Napi::Value EpAddon::CombineRows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const long rs = rowSizeArg(env, info[1]);
  if (!info[3].IsNumber() || info[3].As<Napi::Number>().Int64Value() <= 0) throwNative(env, "BAD_ARGUMENT", "K must be a positive number");
  const long K = info[3].As<Napi::Number>().Int64Value();
  size_t nPos = 0, srcLen = 0, dstLen = 0;
  const int* positions = static_cast<const int*>(typedData(env, info[2], napi_int32_array, -1, "positions", &nPos));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(typedData(env, info[0], floatType<T>(), -1, "src", &srcLen));
    T* dst = static_cast<T*>(typedData(env, info[5], floatType<T>(), -1, "dst", &dstLen));
    if (srcLen % rs || dstLen % rs) throwNative(env, "BAD_ARGUMENT", "src and dst lengths must be multiples of rowSize");
    const long S = static_cast<long>(srcLen) / rs, tokens = static_cast<long>(dstLen) / rs;
    if (static_cast<long>(nPos) != tokens * K) throwNative(env, "BAD_ARGUMENT", "positions must hold K per dst row");
    const double* w = optionalF64(env, info[4], S, "weight");
    guarded(env, [&] {
      combineRows<T>(src, S, rs, positions, tokens, K, w, dst);
      return 0;
    });
  };
  if (isF64(info[0])) go(double{});
  else go(float{});
  return env.Undefined();
}

// routeGrad(g [T,D], D, ret [S,D], token: Int32Array [S], entry: Int32Array [S], w: Float64Array [S], gr [S,D], gw: Float64Array)
Napi::Value EpAddon::RouteGrad(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const long D = rowSizeArg(env, info[1]);
  size_t S = 0, gLen = 0, gwLen = 0;
  const int* token = static_cast<const int*>(typedData(env, info[3], napi_int32_array, -1, "token", &S));
  const int* entry = static_cast<const int*>(typedData(env, info[4], napi_int32_array, static_cast<long>(S), "entry"));
  const double* w = static_cast<const double*>(typedData(env, info[5], napi_float64_array, static_cast<long>(S), "w"));
  double* gw = static_cast<double*>(typedData(env, info[7], napi_float64_array, -1, "gw", &gwLen));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(typedData(env, info[0], floatType<T>(), -1, "g", &gLen));
    if (gLen % D) throwNative(env, "BAD_ARGUMENT", "g length is not a multiple of D");
    const T* ret = static_cast<const T*>(typedData(env, info[2], floatType<T>(), static_cast<long>(S) * D, "ret"));
    T* gr = static_cast<T*>(typedData(env, info[6], floatType<T>(), static_cast<long>(S) * D, "gr"));
    guarded(env, [&] {
      routeGrad<T>(g, gLen / D, D, ret, S, token, entry, w, gr, gw, gwLen);
      return 0;
    });
  };
  if (isF64(info[0])) go(double{});
  else go(float{});
  return env.Undefined();
}

// Atomics.wait and Atomics.notify on a shared word, as one futex system call each: V8's own
// go through a process-wide mutex and a condition variable per waiter, which cost most of
// the fast lane's sleeps and wake-ups (docs/BENCHMARKS.md). Private futexes where the word
// is in this process's memory (a SharedArrayBuffer its threads share); shared ones where it
// is in a segment of shmCreate that other processes map. A futex waiter is woken only by
// futexWake, never by Atomics.notify: one lane uses one pair.
namespace {
int* futexWord(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t len = 0;
  auto* words = static_cast<int*>(typedData(env, info[0], napi_int32_array, -1, "futex words", &len));
  if (!info[1].IsNumber()) throwNative(env, "BAD_ARGUMENT", "futex index must be a number");
  const double i = info[1].As<Napi::Number>().DoubleValue();
  if (!(i >= 0 && i < static_cast<double>(len)) || i != static_cast<long>(i))
    throwNative(env, "BAD_ARGUMENT", "futex index " + std::to_string(i) + " is outside [0, " + std::to_string(len) + ")");
  return words + static_cast<long>(i);
}

#ifdef __linux__
/** FUTEX_WAIT or FUTEX_WAKE, private unless the optional argument at `at` is true. */
int futexOp(const Napi::CallbackInfo& info, size_t at, int op) {
  const bool shared = info.Length() > at && info[at].IsBoolean() && info[at].As<Napi::Boolean>().Value();
  return shared ? op : (op | FUTEX_PRIVATE_FLAG);
}

/** An ArrayBuffer over `bytes` of a mapping, unmapped (and `fd` closed, if any) when it is collected. */
Napi::ArrayBuffer mappedBuffer(Napi::Env env, void* at, size_t bytes, int fd) {
  struct Mapping {
    size_t bytes;
    int fd;
  };
  return Napi::ArrayBuffer::New(
      env, at, bytes,
      [](Napi::Env, void* data, Mapping* m) {
        munmap(data, m->bytes);
        if (m->fd >= 0) close(m->fd);
        delete m;
      },
      new Mapping{bytes, fd});
}

constexpr unsigned kSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

size_t segmentBytes(const Napi::CallbackInfo& info, size_t at) {
  const double b = info.Length() > at && info[at].IsNumber() ? info[at].As<Napi::Number>().DoubleValue() : -1;
  if (!(b >= 8 && b <= 1024.0 * 1024 * 1024) || b != static_cast<double>(static_cast<size_t>(b)))
    throwNative(info.Env(), "BAD_ARGUMENT", "a shared segment's size must be a whole number of bytes in [8, 1 GiB]");
  return static_cast<size_t>(b);
}
#endif
}  // namespace

Napi::Value EpAddon::FutexWait(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int* word = futexWord(info);
  if (!info[2].IsNumber() || !info[3].IsNumber()) throwNative(env, "BAD_ARGUMENT", "futexWait expects (words, index, expected, timeoutMs, shared?)");
  const int expected = info[2].As<Napi::Number>().Int32Value();
  const double ms = info[3].As<Napi::Number>().DoubleValue();
  if (!(ms >= 0 && ms <= 60000)) throwNative(env, "BAD_ARGUMENT", "futexWait timeout must be within [0, 60000] ms");
  timespec t{static_cast<time_t>(ms / 1000), static_cast<long>((ms - 1000 * static_cast<long>(ms / 1000)) * 1e6)};
#ifdef __linux__
  const long r = syscall(SYS_futex, word, futexOp(info, 4, FUTEX_WAIT), expected, &t, nullptr, 0);
#else
  throwNative(env, "NOT_SUPPORTED", "futexWait needs Linux");
  const long r = 0;
#endif
  // EINTR and spurious wake-ups read as 'ok': the caller looks at its words again either way.
  const char* how = r == 0 || errno == EINTR ? "ok" : errno == EAGAIN ? "not-equal" : errno == ETIMEDOUT ? "timed-out" : nullptr;
  if (!how) throwNative(env, "NATIVE_ERROR", std::string("futex wait failed: ") + std::strerror(errno));
  return Napi::String::New(env, how);
}

Napi::Value EpAddon::FutexWake(const Napi::CallbackInfo& info) {
  int* word = futexWord(info);
#ifdef __linux__
  const long r = syscall(SYS_futex, word, futexOp(info, 2, FUTEX_WAKE), 1, nullptr, nullptr, 0);
#else
  throwNative(info.Env(), "NOT_SUPPORTED", "futexWake needs Linux");
  const long r = 0;
#endif
  return Napi::Number::New(info.Env(), r < 0 ? 0 : static_cast<double>(r));
}

// Gives this thread's core to another runnable thread, if any: a rank that waits for a peer
// sharing its core lets it run (and write) at once, rather than sleeping in a futex.
Napi::Value EpAddon::YieldThread(const Napi::CallbackInfo& info) {
#ifdef __linux__
  sched_yield();
#endif
  return info.Env().Undefined();
}

// Memory that ranks in other processes on this host map too (the fast lane between launched
// ranks): an anonymous memory file, sealed at its size so that no one can shrink it under a
// mapping (a read past the end would be SIGBUS), named by its descriptor under /proc so that
// a peer of the same user opens it, and gone once the last process that maps it lets go.
Napi::Value EpAddon::ShmCreate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef __linux__
  const size_t bytes = segmentBytes(info, 0);
  const int fd = memfd_create("ep-actors-lane", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) throwNative(env, "NATIVE_ERROR", std::string("memfd_create failed: ") + std::strerror(errno));
  void* at = MAP_FAILED;
  if (ftruncate(fd, static_cast<off_t>(bytes)) == 0 && fcntl(fd, F_ADD_SEALS, kSeals) == 0)
    at = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (at == MAP_FAILED) {
    const int e = errno;
    close(fd);
    throwNative(env, "NATIVE_ERROR", std::string("cannot make a shared segment: ") + std::strerror(e));
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("buffer", mappedBuffer(env, at, bytes, fd));
  out.Set("path", Napi::String::New(env, "/proc/" + std::to_string(getpid()) + "/fd/" + std::to_string(fd)));
  return out;
#else
  throwNative(env, "NOT_SUPPORTED", "shared segments need Linux");
#endif
}

// Maps a peer's segment by the path its shmCreate returned. Only a sealed memory file of
// exactly `bytes` is taken: a path that names anything else (another host's process, a
// reused pid, a regular file) is refused rather than written into.
Napi::Value EpAddon::ShmOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
#ifdef __linux__
  if (!info[0].IsString()) throwNative(env, "BAD_ARGUMENT", "shmOpen expects (path, bytes)");
  const std::string path = info[0].As<Napi::String>().Utf8Value();
  const size_t bytes = segmentBytes(info, 1);
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) throwNative(env, "NATIVE_ERROR", "cannot open shared segment " + path + ": " + std::strerror(errno));
  struct stat st {};
  const int seals = fcntl(fd, F_GET_SEALS);
  std::string why;
  if (seals < 0 || (static_cast<unsigned>(seals) & kSeals) != kSeals) why = "it is not a sealed shared segment";
  else if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != bytes)
    why = "it holds " + std::to_string(st.st_size) + " bytes, not " + std::to_string(bytes);
  void* at = why.empty() ? mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
  if (why.empty() && at == MAP_FAILED) why = std::strerror(errno);
  close(fd);  // the mapping keeps the segment
  if (!why.empty()) throwNative(env, "BAD_ARGUMENT", "cannot map shared segment " + path + ": " + why);
  return mappedBuffer(env, at, bytes, -1);
#else
  throwNative(env, "NOT_SUPPORTED", "shared segments need Linux");
#endif
}

}  // namespace ep

using ep::EpAddon;
NODE_API_ADDON(EpAddon)
