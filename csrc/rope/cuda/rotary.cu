// RoPE CUDA kernel: one block per token; threads cover (head, pair).
// Each thread reads both elements of its pair before writing either, so the
// in-place case (out == in) needs no extra synchronisation.
#include "common/cuda/cuda_helpers.cuh"
#include "rope/rotary.h"

namespace torchkiln {
namespace {

using cuda::from_float;
using cuda::to_float;

template <class T, class CS>
__global__ void rotary_kernel(RotaryParams p) {
  const int64_t t = blockIdx.x;
  const int64_t b = t / p.seq_len, s = t % p.seq_len;
  const int64_t pos = p.positions[b * p.pos_batch_stride + s * p.pos_seq_stride];
  if (pos < 0 || pos >= p.max_position) return;  // never read past the table
  const T* x = static_cast<const T*>(p.in) + b * p.in_batch_stride + s * p.in_seq_stride;
  T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + s * p.out_seq_stride;
  const CS* cos = static_cast<const CS*>(p.cos) + pos * p.cs_row_stride;
  const CS* sin = static_cast<const CS*>(p.sin) + pos * p.cs_row_stride;
  const int64_t half = p.rot_dim / 2;
  const float sign = p.inverse ? -1.0f : 1.0f;
  for (int64_t i = threadIdx.x; i < p.heads * half; i += blockDim.x) {
    const int64_t h = i / half, k = i % half;
    const int64_t ia = p.interleaved ? 2 * k : k;
    const int64_t ib = p.interleaved ? 2 * k + 1 : k + half;
    const T* xh = x + h * p.in_head_stride;
    T* oh = out + h * p.out_head_stride;
    const float c = to_float(cos[k]), sn = sign * to_float(sin[k]);
    const float a = to_float(xh[ia]), bb = to_float(xh[ib]);
    oh[ia] = from_float<T>(a * c - bb * sn);
    oh[ib] = from_float<T>(bb * c + a * sn);
  }
  if (static_cast<const void*>(x) != static_cast<void*>(out)) {
    const int64_t pass = p.head_dim - p.rot_dim;
    for (int64_t i = threadIdx.x; i < p.heads * pass; i += blockDim.x) {
      const int64_t h = i / pass, j = p.rot_dim + i % pass;
      out[h * p.out_head_stride + j] = x[h * p.in_head_stride + j];
    }
  }
}

}  // namespace

void rotary_fwd_cuda(const RotaryParams& p, CUstream_st* stream) {
  const int64_t tokens = p.batch * p.seq_len;
  const int64_t work = p.heads * (p.rot_dim / 2);
  const int threads = work >= 256 ? 256 : static_cast<int>((work + 31) / 32 * 32);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.cs_dtype == DType::kFloat32)
      TK_KERNEL_LAUNCH(tokens, threads, 0, stream, rotary_kernel<T, float>)(p);
    else
      TK_KERNEL_LAUNCH(tokens, threads, 0, stream, rotary_kernel<T, T>)(p);
  });
  cuda::check_launch("rotary_fwd");
}

}  // namespace torchkiln
