// Torch-free access to torch's intra-op thread pool for CPU kernels.
// Kernels stay free of ATen headers (and so of per-ISA ODR clashes on ATen's
// inline functions); parallel.cpp forwards to at::parallel_for, so
// torch.set_num_threads governs every kernel and no second pool exists.
#pragma once
#include <cstdint>

namespace torchkiln {

using RangeBody = void (*)(const void* ctx, int64_t begin, int64_t end);

void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, RangeBody body, const void* ctx);
int num_threads();

// Runs f(lo, hi) on disjoint sub-ranges of [begin, end) of at least `grain`
// items each (fewer only for the last). Exceptions propagate to the caller.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_impl(
      begin, end, grain,
      [](const void* ctx, int64_t lo, int64_t hi) { (*static_cast<const F*>(ctx))(lo, hi); }, &f);
}

}  // namespace torchkiln
