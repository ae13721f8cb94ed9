// CPU-only build (no nvcc, or EP_ACTORS_NO_CUDA=1): every CUDA entry point says so.
#include "addon.h"

namespace ep {

static Napi::Value notBuilt(const Napi::CallbackInfo& info) {
  throwNative(info.Env(), "CUDA_NOT_BUILT",
              "the native addon was built without CUDA (nvcc not found at install, or EP_ACTORS_NO_CUDA=1)");
}

void initCuda(Napi::Env env, Napi::Object exports) {
  for (const char* name : {"cudaInfo", "cudaSetDevice", "cudaExpertForward", "cudaExpertBackward", "cudaPermute",
                           "cudaScatterAdd", "cudaBench", "cudaAlloc", "cudaFree", "cudaUpload", "cudaDownload", "cudaCopy"})
    exports.Set(name, Napi::Function::New(env, notBuilt, name));
}

}  // namespace ep
