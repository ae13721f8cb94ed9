// NCCL, loaded with dlopen (EP_ACTORS_NCCL names the library, else libnccl.so.2 on the
// library path) and declared here: nothing NCCL is needed to build or load the addon.
// Each communicator owns a dedicated std::thread that makes every blocking NCCL call, so
// a rendezvous never occupies libuv's small shared pool. Operations wait with a deadline;
// on error or timeout the communicator is aborted (ncclCommAbort) and the promise rejects
// with a NativeError NCCL_<...>. The counts exchange carries a fingerprint of (position,
// op) from every rank, so ranks that diverge fail at the next exchange with a diagnosis.
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <thread>

#include "addon.h"
#ifdef EP_WITH_CUDA
#include "ep_cuda.h"
#endif

namespace ep {
namespace {

// ---- our declarations of the NCCL API subset we use (nccl.h, stable ABI since 2.x) ----
typedef struct ncclComm* ncclComm_t;
struct ncclUniqueId {
  char internal[128];
};
typedef int ncclResult_t;  // 0 success, 7 in progress
enum { ncclSuccess = 0, ncclInProgress = 7 };
enum { ncclInt64 = 4, ncclUint8 = 1 };

struct Nccl {
  void* handle = nullptr;
  std::string path, error;
  const char* (*getErrorString)(ncclResult_t) = nullptr;
  ncclResult_t (*getVersion)(int*) = nullptr;
  ncclResult_t (*getUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*commInitRank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*groupStart)() = nullptr;
  ncclResult_t (*groupEnd)() = nullptr;
  ncclResult_t (*send)(const void*, size_t, int, int, ncclComm_t, void*) = nullptr;
  ncclResult_t (*recv)(void*, size_t, int, int, ncclComm_t, void*) = nullptr;
  ncclResult_t (*commAbort)(ncclComm_t) = nullptr;
  ncclResult_t (*commDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*commGetAsyncError)(ncclComm_t, ncclResult_t*) = nullptr;
};

/** Loaded once per process; a failure is remembered with the path tried and dlerror(). */
const Nccl& nccl() {
  static std::once_flag once;
  static Nccl lib;
  std::call_once(once, [] {
    const char* env = std::getenv("EP_ACTORS_NCCL");
    lib.path = env && *env ? env : "libnccl.so.2";
    lib.handle = dlopen(lib.path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib.handle) {
      const char* e = dlerror();
      lib.error = "could not load NCCL from '" + lib.path + "' (set EP_ACTORS_NCCL to its path): " + (e ? e : "unknown error");
      return;
    }
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib.handle, name));
      if (!fn && lib.error.empty()) lib.error = lib.path + " lacks " + name;
    };
    sym(lib.getErrorString, "ncclGetErrorString");
    sym(lib.getVersion, "ncclGetVersion");
    sym(lib.getUniqueId, "ncclGetUniqueId");
    sym(lib.commInitRank, "ncclCommInitRank");
    sym(lib.groupStart, "ncclGroupStart");
    sym(lib.groupEnd, "ncclGroupEnd");
    sym(lib.send, "ncclSend");
    sym(lib.recv, "ncclRecv");
    sym(lib.commAbort, "ncclCommAbort");
    sym(lib.commDestroy, "ncclCommDestroy");
    sym(lib.commGetAsyncError, "ncclCommGetAsyncError");
  });
  return lib;
}

const Nccl& needNccl(Napi::Env env) {
  const Nccl& n = nccl();
  if (!n.error.empty()) throwNative(env, "NCCL_LIBRARY_NOT_FOUND", n.error);
  return n;
}

void nck(ncclResult_t r, const char* what) {
  if (r != ncclSuccess && r != ncclInProgress)
    fail("NCCL_ERROR", std::string(what) + " failed: " + nccl().getErrorString(r) + " (ncclResult " + std::to_string(r) + ")");
}

/** FNV-1a of the op name: what the fingerprint carries beside the position. */
int64_t opHash(const std::string& op) {
  uint64_t h = 1469598103934665603ull;
  for (char c : op) h = (h ^ static_cast<uint8_t>(c)) * 1099511628211ull;
  return static_cast<int64_t>(h >> 1);
}

/** A communicator and the one thread that makes its blocking calls, in order. */
class Comm {
 public:
  Comm() : th_([this] { loop(); }) {}
  ~Comm() { shutdown(); }
  ncclComm_t comm = nullptr;  // written under abortM_ (adopt), once init succeeded
  int rank = 0, size = 0;
  std::atomic<bool> aborted{false};

  void post(std::function<void()> task) {
    std::lock_guard<std::mutex> l(m_);
    q_.push_back(std::move(task));
    cv_.notify_one();
  }
  /** Aborting from this (any) thread unblocks a call in flight on the comm thread. */
  void abort() {
    std::lock_guard<std::mutex> l(abortM_);
    if (!aborted.exchange(true) && comm) nccl().commAbort(comm);
  }
  /** Takes the communicator init made; one aborted while init ran is aborted now. */
  void adopt(ncclComm_t made) {
    std::lock_guard<std::mutex> l(abortM_);
    comm = made;
    if (aborted) nccl().commAbort(made);
  }
  /** NCCL's asynchronous error; never asks a communicator that ncclCommAbort has freed. */
  ncclResult_t asyncError() {
    std::lock_guard<std::mutex> l(abortM_);
    ncclResult_t r = ncclSuccess;
    if (!aborted && comm) nccl().commGetAsyncError(comm, &r);
    return r;
  }
  void shutdown() {
    {
      std::lock_guard<std::mutex> l(m_);
      if (stop_) return;
      stop_ = true;
      cv_.notify_one();
    }
    if (th_.joinable()) th_.join();
    if (comm && !aborted) nccl().commDestroy(comm);
    comm = nullptr;
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> l(m_);
        cv_.wait(l, [&] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;
        task = std::move(q_.front());
        q_.pop_front();
      }
      task();
    }
  }
  std::mutex m_, abortM_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
  bool stop_ = false;
  std::thread th_;
};

#ifdef EP_WITH_CUDA
/** Waits for the comm thread's stream, polling NCCL's async error; aborts on error or deadline. */
void waitStream(Comm& c, double timeoutMs, const char* what) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double, std::milli>(timeoutMs);
  for (;;) {
    const int q = epc_query();
    if (q != 0 && q != 600) {
      c.abort();
      fail("CUDA_ERROR", std::string(what) + ": " + epc_error_string(q) + " (" + epc_error_name(q) + ")");
    }
    const ncclResult_t async = c.asyncError();
    // An abort ends NCCL's kernels early, so a drained stream alone does not mean the data came.
    if (c.aborted) fail("NCCL_ABORTED", std::string(what) + ": the communicator was aborted");
    if (async != ncclSuccess && async != ncclInProgress) {
      c.abort();
      fail("NCCL_ERROR", std::string(what) + ": " + nccl().getErrorString(async) + "; communicator aborted");
    }
    if (q == 0) return;
    if (std::chrono::steady_clock::now() > deadline) {
      c.abort();
      fail("NCCL_TIMEOUT", std::string(what) + " did not finish within " + std::to_string(static_cast<long>(timeoutMs)) +
                               " ms; communicator aborted");
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

/** Uneven all-to-all of bytes as grouped ncclSend/ncclRecv on the comm thread's stream. */
void allToAll(Comm& c, const uint8_t* send, const std::vector<size_t>& sendBytes, uint8_t* recv,
              const std::vector<size_t>& recvBytes) {
  // ncclCommAbort freed the communicator: a later call must not reach NCCL with it
  if (c.aborted) fail("NCCL_ABORTED", "all-to-all on an aborted communicator");
  void* s = nullptr;
  const int e = epc_stream(&s);
  if (e) fail("CUDA_ERROR", std::string("stream: ") + epc_error_string(e));
  const Nccl& n = nccl();
  nck(n.groupStart(), "ncclGroupStart");
  try {
    size_t so = 0, ro = 0;
    for (int p = 0; p < c.size; p++) {
      if (sendBytes[p]) nck(n.send(send + so, sendBytes[p], ncclUint8, p, c.comm, s), "ncclSend");
      if (recvBytes[p]) nck(n.recv(recv + ro, recvBytes[p], ncclUint8, p, c.comm, s), "ncclRecv");
      so += sendBytes[p];
      ro += recvBytes[p];
    }
  } catch (...) {
    n.groupEnd();  // a group left open would swallow this thread's next NCCL calls
    throw;
  }
  nck(n.groupEnd(), "ncclGroupEnd");
}
#endif

/** Resolves or rejects a promise from the comm thread through a thread-safe function. */
struct Pending {
  Napi::Promise::Deferred deferred;
  Napi::ThreadSafeFunction tsfn;
  std::string code, msg;
  std::function<Napi::Value(Napi::Env)> result;
};

std::shared_ptr<Pending> pending(Napi::Env env) {
  auto p = std::make_shared<Pending>(Pending{Napi::Promise::Deferred::New(env), {}, {}, {}, {}});
  p->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "ep-actors:nccl", 0, 1);
  return p;
}

/** Runs `work` on the comm thread; its failure or result settles the promise on the JS thread. */
Napi::Value schedule(Napi::Env env, Comm& c, std::function<std::function<Napi::Value(Napi::Env)>()> work) {
  auto p = pending(env);
  c.post([p, work = std::move(work)] {
    try {
      p->result = work();
    } catch (const Failure& f) {
      p->code = f.code;
      p->msg = f.what();
    } catch (const std::exception& e) {
      p->code = "NCCL_ERROR";
      p->msg = e.what();
    }
    p->tsfn.BlockingCall([p](Napi::Env env, Napi::Function) {
      if (p->code.empty()) p->deferred.Resolve(p->result ? p->result(env) : env.Undefined());
      else p->deferred.Reject(nativeError(env, p->code, p->msg).Value());
    });
    p->tsfn.Release();
  });
  return p->deferred.Promise();
}

struct NcclState {
  std::map<int, std::unique_ptr<Comm>> comms;
  int next = 1;
  Comm& get(Napi::Env env, Napi::Value h) {
    auto it = comms.find(h.ToNumber().Int32Value());
    if (it == comms.end()) throwNative(env, "BAD_ARGUMENT", "no such NCCL communicator (destroyed?)");
    return *it->second;
  }
};

}  // namespace

void initNccl(Napi::Env env, Napi::Object exports, EpAddon& addon) {
  auto state = std::make_shared<NcclState>();
  // A worker that ends aborts its communicators and joins their threads.
  addon.onTeardown.push_back([state] {
    for (auto& [h, c] : state->comms) {
      c->abort();
      c->shutdown();
    }
    state->comms.clear();
  });

  exports.Set("ncclVersion", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    const Nccl& n = needNccl(info.Env());
    int v = 0;
    const ncclResult_t r = n.getVersion(&v);
    if (r) throwNative(info.Env(), "NCCL_ERROR", std::string("ncclGetVersion: ") + n.getErrorString(r));
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("code", v);
    o.Set("path", n.path);
    return o;
  }));

  exports.Set("ncclLibraryPath", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    return Napi::String::New(info.Env(), nccl().path);
  }));

  exports.Set("ncclGetUniqueId", Napi::Function::New(env, [](const Napi::CallbackInfo& info) -> Napi::Value {
    const Nccl& n = needNccl(info.Env());
    ncclUniqueId id;
    const ncclResult_t r = n.getUniqueId(&id);
    if (r) throwNative(info.Env(), "NCCL_ERROR", std::string("ncclGetUniqueId: ") + n.getErrorString(r));
    Napi::Uint8Array out = Napi::Uint8Array::New(info.Env(), sizeof id.internal);
    std::memcpy(out.Data(), id.internal, sizeof id.internal);
    return out;
  }));

  // ncclCommInit(id: Uint8Array(128), size, rank, device) → Promise<handle>
  exports.Set("ncclCommInit", Napi::Function::New(env, [state](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    needNccl(env);
#ifndef EP_WITH_CUDA
    throwNative(env, "CUDA_NOT_BUILT", "NCCL needs the CUDA build of the addon");
#endif
    ncclUniqueId id;
    std::memcpy(id.internal, typedData(env, info[0], napi_uint8_array, sizeof id.internal, "id"), sizeof id.internal);
    const int size = info[1].ToNumber().Int32Value(), rank = info[2].ToNumber().Int32Value(), dev = info[3].ToNumber().Int32Value();
    if (size < 1 || rank < 0 || rank >= size) throwNative(env, "BAD_ARGUMENT", "need 0 <= rank < size");
    const int h = state->next++;
    auto& c = *(state->comms[h] = std::make_unique<Comm>());
    c.rank = rank;
    c.size = size;
    return schedule(env, c, [&c, id, size, rank, dev, h]() -> std::function<Napi::Value(Napi::Env)> {
#ifdef EP_WITH_CUDA
      const int e = epc_set_device(dev);
      if (e) fail("CUDA_ERROR", std::string("cudaSetDevice: ") + epc_error_string(e));
#endif
      ncclComm_t made = nullptr;
      nck(nccl().commInitRank(&made, size, id, rank), "ncclCommInitRank");
      c.adopt(made);
      if (c.aborted) fail("NCCL_ABORTED", "the communicator was aborted while it was being created");
      return [h](Napi::Env env) { return Napi::Number::New(env, h); };
    });
  }));

  // ncclExchangeCounts(handle, counts: BigInt64Array [size], position, op, timeoutMs) → Promise<BigInt64Array>
  exports.Set("ncclExchangeCounts", Napi::Function::New(env, [state](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    Comm& c = state->get(env, info[0]);
    const int64_t* counts = static_cast<const int64_t*>(typedData(env, info[1], napi_bigint64_array, c.size, "counts"));
    const int64_t position = info[2].ToNumber().Int64Value();
    const std::string op = info[3].ToString();
    const double timeoutMs = info[4].IsNumber() ? info[4].ToNumber().DoubleValue() : 600000.0;
    std::vector<int64_t> send;
    for (int p = 0; p < c.size; p++) send.insert(send.end(), {counts[p], position, opHash(op)});
    return schedule(env, c, [&c, send, position, op, timeoutMs]() -> std::function<Napi::Value(Napi::Env)> {
#ifdef EP_WITH_CUDA
      const size_t bytes = send.size() * 8, per = 3 * 8;
      void *ds = nullptr, *dr = nullptr;
      int e = epc_malloc(&ds, bytes);
      if (!e) e = epc_malloc(&dr, bytes);
      if (!e) e = epc_upload(ds, send.data(), bytes);
      if (e) fail("CUDA_ERROR", std::string("counts exchange: ") + epc_error_string(e));
      std::vector<size_t> splits(c.size, per);
      std::vector<int64_t> got(send.size());
      try {
        allToAll(c, static_cast<uint8_t*>(ds), splits, static_cast<uint8_t*>(dr), splits);
        waitStream(c, timeoutMs, ("counts exchange (" + op + ")").c_str());
      } catch (...) {
        epc_free(ds);
        epc_free(dr);
        throw;
      }
      e = epc_download(got.data(), dr, bytes);
      epc_free(ds);
      epc_free(dr);
      if (e) fail("CUDA_ERROR", std::string("counts exchange: ") + epc_error_string(e));
      for (int p = 0; p < c.size; p++) {
        const int64_t pPos = got[p * 3 + 1], pOp = got[p * 3 + 2];
        if (pPos != position || pOp != opHash(op))
          fail("NCCL_DIVERGED", "ranks diverged: rank " + std::to_string(c.rank) + " is at collective #" + std::to_string(position) +
                                    " (" + op + ") but rank " + std::to_string(p) + " is at #" + std::to_string(pPos) +
                                    (pOp == opHash(op) ? " (same op)" : " (a different op)"));
      }
      std::vector<int64_t> recv(c.size);
      for (int p = 0; p < c.size; p++) recv[p] = got[p * 3];
      return [recv](Napi::Env env) {
        Napi::BigInt64Array out = Napi::BigInt64Array::New(env, recv.size());
        std::memcpy(out.Data(), recv.data(), recv.size() * 8);
        return out;
      };
#else
      fail("CUDA_NOT_BUILT", "NCCL needs the CUDA build of the addon");
#endif
    });
  }));

  // ncclAllToAll(handle, sendPtr: bigint, sendBytes: number[], recvPtr: bigint, recvBytes: number[], timeoutMs) → Promise<void>
  exports.Set("ncclAllToAll", Napi::Function::New(env, [state](const Napi::CallbackInfo& info) -> Napi::Value {
    Napi::Env env = info.Env();
    Comm& c = state->get(env, info[0]);
    bool lossless = false;
    auto bytesOf = [&](Napi::Value v, const char* what) {
      if (!v.IsArray() || v.As<Napi::Array>().Length() != static_cast<uint32_t>(c.size))
        throwNative(env, "BAD_ARGUMENT", std::string(what) + " must list one byte count per rank");
      std::vector<size_t> out;
      for (uint32_t i = 0; i < v.As<Napi::Array>().Length(); i++) out.push_back(static_cast<size_t>(v.As<Napi::Array>().Get(i).ToNumber().Int64Value()));
      return out;
    };
    auto* send = reinterpret_cast<uint8_t*>(info[1].As<Napi::BigInt>().Uint64Value(&lossless));
    auto sendBytes = bytesOf(info[2], "sendBytes");
    auto* recv = reinterpret_cast<uint8_t*>(info[3].As<Napi::BigInt>().Uint64Value(&lossless));
    auto recvBytes = bytesOf(info[4], "recvBytes");
    const double timeoutMs = info[5].IsNumber() ? info[5].ToNumber().DoubleValue() : 600000.0;
    return schedule(env, c, [&c, send, sendBytes, recv, recvBytes, timeoutMs]() -> std::function<Napi::Value(Napi::Env)> {
#ifdef EP_WITH_CUDA
      allToAll(c, send, sendBytes, recv, recvBytes);
      waitStream(c, timeoutMs, "all-to-all");
      return nullptr;
#else
      fail("CUDA_NOT_BUILT", "NCCL needs the CUDA build of the addon");
#endif
    });
  }));

  // ncclAbort(handle): from the JS thread (supervisor abort), unblocks a call in flight.
  exports.Set("ncclAbort", Napi::Function::New(env, [state](const Napi::CallbackInfo& info) -> Napi::Value {
    state->get(info.Env(), info[0]).abort();
    return info.Env().Undefined();
  }));

  exports.Set("ncclDestroy", Napi::Function::New(env, [state](const Napi::CallbackInfo& info) -> Napi::Value {
    const int h = info[0].ToNumber().Int32Value();
    state->get(info.Env(), info[0]).shutdown();
    state->comms.erase(h);
    return info.Env().Undefined();
  }));
}

}  // namespace ep
