// CUDA pack / unpack of gradient buckets: one grid-stride kernel per
// gradient (a bucket holds tens of parameters; launches are cheap next to
// the all-reduce), cast, averaging scale and error feedback fused.
#include <algorithm>

#include "comm/bucket_pack.h"
#include "common/cuda/cuda_helpers.cuh"

namespace torchkiln {
namespace {

using cuda::from_float;
using cuda::to_float;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

// src and dst may be one buffer (a bucket of gradient views scaled in place):
// not __restrict__; each element is read and written by one thread.
template <class S, class B>
__global__ void pack_kernel(const S* src, B* dst, float* __restrict__ residual, int64_t n, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = src ? to_float(src[i]) * scale : 0.0f;
    if (residual) {
      v += residual[i];
      const B q = from_float<B>(v);
      dst[i] = q;
      residual[i] = v - to_float(q);
    } else {
      dst[i] = from_float<B>(v);
    }
  }
}

template <class S, class B>
__global__ void unpack_kernel(const B* __restrict__ src, S* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = from_float<S>(to_float(src[i]));
}

int blocks_for(int64_t n) { return static_cast<int>(std::min(kMaxBlocks, cuda::ceil_div(n, kThreads))); }

// Calls launch(S{}, B{}, segment) for every non-empty segment, with S and B
// the CUDA storage types of the gradients and of the bucket.
template <class F>
void for_each_segment(const BucketPackParams& p, const F& launch) {
  cuda::dispatch_dtype(p.segment_dtype, [&](auto s_tag) {
    cuda::dispatch_dtype(p.bucket_dtype, [&](auto b_tag) {
      for (int64_t s = 0; s < p.num_segments; ++s)
        if (p.segments[s].numel > 0) launch(s_tag, b_tag, p.segments[s]);
    });
  });
}

}  // namespace

void bucket_pack_cuda(const BucketPackParams& p, CUstream_st* stream) {
  for_each_segment(p, [&](auto s_tag, auto b_tag, const PackSegment& seg) {
    using S = decltype(s_tag);
    using B = decltype(b_tag);
    TK_KERNEL_LAUNCH(blocks_for(seg.numel), kThreads, 0, stream, pack_kernel<S, B>)(
        static_cast<const S*>(seg.data), static_cast<B*>(p.bucket) + seg.offset,
        p.residual ? p.residual + seg.offset : nullptr, seg.numel, p.scale);
    cuda::check_launch("bucket_pack");
  });
}

void bucket_unpack_cuda(const BucketPackParams& p, CUstream_st* stream) {
  for_each_segment(p, [&](auto s_tag, auto b_tag, const PackSegment& seg) {
    using S = decltype(s_tag);
    using B = decltype(b_tag);
    TK_KERNEL_LAUNCH(blocks_for(seg.numel), kThreads, 0, stream, unpack_kernel<S, B>)(
        static_cast<const B*>(p.bucket) + seg.offset, static_cast<S*>(seg.data), seg.numel);
    cuda::check_launch("bucket_unpack");
  });
}

}  // namespace torchkiln
