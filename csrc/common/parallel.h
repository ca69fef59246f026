// Torch-free access to torch's intra-op thread pool for CPU kernels.
// Kernels stay free of ATen headers (and so of per-ISA ODR clashes on ATen's
// inline functions); parallel.cpp forwards to at::parallel_for, so
// torch.set_num_threads governs every kernel and no second pool exists.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

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

// Runs f(state, i) for every i in [0, n), each thread taking the next i
// from a shared counter and keeping one state = make_state() for all of its
// tasks. Tasks of very different sizes then balance across threads when the
// caller numbers them largest first; parallel_for's fixed contiguous ranges
// gave one thread twice the other's work on a causal varlen batch.
template <class MakeState, class F>
void parallel_tasks(int64_t n, const MakeState& make_state, const F& f) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, num_threads());
  parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      f(state, i);
  });
}

// parallel_tasks over tasks 0 .. work.size() - 1 dealt in order of their
// estimated work, largest first (ties in task order): f(state, task).
template <class MakeState, class F>
void parallel_tasks_largest_first(const std::vector<int64_t>& work, const MakeState& make_state, const F& f) {
  std::vector<int64_t> order(work.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return work[a] > work[b]; });
  parallel_tasks(static_cast<int64_t>(order.size()), make_state,
                 [&](auto& state, int64_t i) { f(state, order[i]); });
}

}  // namespace torchkiln
