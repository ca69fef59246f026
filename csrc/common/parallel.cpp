#include "common/parallel.h"

#include <ATen/Parallel.h>

namespace torchkiln {

void parallel_for_impl(int64_t begin, int64_t end, int64_t grain, RangeBody body, const void* ctx) {
  at::parallel_for(begin, end, grain, [&](int64_t lo, int64_t hi) { body(ctx, lo, hi); });
}

int num_threads() { return at::get_num_threads(); }

}  // namespace torchkiln
