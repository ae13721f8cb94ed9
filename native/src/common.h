// Shared by the addon's translation units: the failure type compute code throws (a string
// code plus a message) that the binding turns into the JavaScript NativeError.
#pragma once
#include <stdexcept>
#include <string>

namespace ep {

struct Failure : std::runtime_error {
  std::string code;
  Failure(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

[[noreturn]] inline void fail(const char* code, const std::string& msg) { throw Failure(code, msg); }

/** Threads a CPU kernel may use: setCpuThreads' count, else EP_ACTORS_THREADS, else the machine's cores. */
int cpuThreads();

/** Caps every CPU kernel of this process (all its worker threads) at n threads; n <= 0 restores the default. */
void setCpuThreads(int n);

}  // namespace ep
