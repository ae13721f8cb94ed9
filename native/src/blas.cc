#include "blas.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace ep::blas {

static Library load() {
  Library lib;
  const char* env = std::getenv("EP_ACTORS_BLAS");
  std::string want = env ? env : "";
  if (want == "off" || want == "0" || want == "none") {
    lib.reason = "disabled by EP_ACTORS_BLAS=" + want;
    return lib;
  }
  std::vector<std::string> names;
  if (!want.empty()) names.push_back(want);
  else names = {"libopenblas.so.0", "libopenblas.so", "libcblas.so.3", "libblas.so.3"};
  std::string tried;
  for (const auto& n : names) {
    // RTLD_LOCAL keeps its symbols from clashing with anything else in the process.
    void* h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      tried += (tried.empty() ? "" : "; ") + std::string(dlerror());
      continue;
    }
    auto s = reinterpret_cast<SgemmFn>(dlsym(h, "cblas_sgemm"));
    auto d = reinterpret_cast<DgemmFn>(dlsym(h, "cblas_dgemm"));
    if (!s || !d) {
      tried += (tried.empty() ? "" : "; ") + n + " has no cblas_sgemm/cblas_dgemm";
      dlclose(h);
      continue;
    }
    lib.sgemm = s;
    lib.dgemm = d;
    lib.name = n;
    // One BLAS thread per call: ranks run concurrently and gemm() splits large GEMMs itself
    // over idle cores. Left to its default (a thread per core in every call), OpenBLAS
    // stacked its threads on top of 4 concurrent ranks on 2 cores: the EP step took 2.8 s
    // with it against 1.7 s on our own kernels.
    using SetThreads = void (*)(int);
    if (auto set = reinterpret_cast<SetThreads>(dlsym(h, "openblas_set_num_threads"))) {
      set(1);
      lib.singleThreaded = true;
    }
    return lib;  // never dlclose: worker threads may still be calling into it
  }
  lib.reason = "no CBLAS library found (" + tried + ")";
  return lib;
}

const Library& library() {
  static std::once_flag once;
  static Library lib;
  std::call_once(once, [] { lib = load(); });
  return lib;
}

}  // namespace ep::blas
