// One sequence of a packed (varlen) batch, as the CUDA kernels read it.
#pragma once
#include <cstdint>

namespace torchkiln {
namespace cuda {

// Sequence s is tokens [cu[s], cu[s + 1]) of a tensor holding `total`. The
// glue checks cu_seqlens on the host, except while a CUDA graph is being
// captured (reading device memory would break the capture), so the kernels
// clamp: the span stays inside [0, total) and its length (0 when the
// offsets decrease) stops at max_len, the planned longest sequence. Bad
// offsets then give wrong numbers, never an access outside the tensor.
struct PackedSpan {
  int64_t start;
  int len;
};
__device__ __forceinline__ PackedSpan packed_span(const int32_t* cu, int64_t s, int64_t total, int64_t max_len) {
  int64_t a = cu[s], b = cu[s + 1];
  a = a < 0 ? 0 : (a > total ? total : a);
  b = b < a ? a : (b > total ? total : b);
  const int64_t n = b - a < max_len ? b - a : max_len;
  return {a, static_cast<int>(n > 0 ? n : 0)};
}

}  // namespace cuda
}  // namespace torchkiln
