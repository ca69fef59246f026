// Timing for the once-per-process measurements that pick a code path
// (cpu_gemm_choice.cpp, quant/gemm_choice.cpp).
#pragma once
#include <algorithm>
#include <chrono>

namespace torchkiln {

// Best of three calls of f after a warm-up call, in seconds. The warm-up
// pays for first-use costs (thread pool start, ATen's kernel selection and
// oneDNN primitive creation) that the choice should not see.
template <class F>
double best_call_seconds(const F& f) {
  f();
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace torchkiln
