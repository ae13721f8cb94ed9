// The addon object: one per Node environment (main thread or worker), so nothing here is
// global. It holds the NativeError class handed over from TypeScript and the NCCL state.
#pragma once
#include <napi.h>

#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"

namespace ep {

class EpAddon : public Napi::Addon<EpAddon> {
 public:
  EpAddon(Napi::Env env, Napi::Object exports);
  ~EpAddon();
  Napi::FunctionReference errorCtor;
  /** Run at environment teardown (worker exit): abort communicators, join threads. */
  std::vector<std::function<void()>> onTeardown;

 private:
  Napi::Value SetErrorClass(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value SetThreads(const Napi::CallbackInfo& info);
  Napi::Value ExpertForward(const Napi::CallbackInfo& info);
  Napi::Value ExpertBackward(const Napi::CallbackInfo& info);
  Napi::Value Gemm(const Napi::CallbackInfo& info);
  Napi::Value MoveRows(const Napi::CallbackInfo& info);
  Napi::Value CombineRows(const Napi::CallbackInfo& info);
  Napi::Value FutexWait(const Napi::CallbackInfo& info);
  Napi::Value FutexWake(const Napi::CallbackInfo& info);
  Napi::Value ShmCreate(const Napi::CallbackInfo& info);
  Napi::Value YieldThread(const Napi::CallbackInfo& info);
  Napi::Value ShmOpen(const Napi::CallbackInfo& info);
  Napi::Value RouteGrad(const Napi::CallbackInfo& info);
  void teardown();
  static void cleanupHook(void* self);
  napi_env env_ = nullptr;
  bool tornDown = false;
  bool hookRan = false;
};

/** The JavaScript NativeError (or a plain Error before init) with `code` and `message`. */
Napi::Error nativeError(Napi::Env env, const std::string& code, const std::string& msg);
[[noreturn]] void throwNative(Napi::Env env, const std::string& code, const std::string& msg);

/** The first byte of a typed array's view, whether an ArrayBuffer or a SharedArrayBuffer backs it. */
uint8_t* viewBytes(Napi::Env env, const Napi::TypedArray& ta);

/** A typed array's data, checked to be `want` (napi_float32_array, ...) and `len` long (-1: any). */
void* typedData(Napi::Env env, Napi::Value v, napi_typedarray_type want, long len, const char* what, size_t* outLen = nullptr);

void initCuda(Napi::Env env, Napi::Object exports);
void initNccl(Napi::Env env, Napi::Object exports, EpAddon& addon);

}  // namespace ep
