// OpenBLAS (or any CBLAS) found with dlopen at run time, so nothing is needed at install.
// EP_ACTORS_BLAS=off disables it; EP_ACTORS_BLAS=/path/lib.so names the library to try.
#pragma once
#include <string>

namespace ep::blas {

enum Trans { NoTrans = 111, Trans = 112 };
constexpr int RowMajor = 101;
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
using DgemmFn = void (*)(int, int, int, int, int, int, double, const double*, int, const double*, int, double, double*, int);

struct Library {
  SgemmFn sgemm = nullptr;
  DgemmFn dgemm = nullptr;
  std::string name;   // the soname that loaded, empty if none
  std::string reason; // why none loaded
  bool singleThreaded = false; // openblas_set_num_threads(1) was applied
};

/** Loaded once per process (thread-safe); later calls return the same library. */
const Library& library();

}  // namespace ep::blas
