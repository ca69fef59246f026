// Fused gradient pack / unpack for flat all-reduce buckets.
//
// pack:   bucket[off_i : off_i + n_i] = cast(src_i * scale (+ residual))
//         (a null src_i contributes zeros: a parameter without a gradient);
//         with error feedback, residual <- (src * scale + residual) - bucket,
//         so what low-precision communication drops is sent next step.
// unpack: dst_i = cast(bucket[off_i : off_i + n_i])
// src / dst may be the bucket itself (in-place scaling or casting).
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

struct PackSegment {
  void* data = nullptr;  // the parameter's gradient (src for pack, dst for unpack); may be null for pack
  int64_t numel = 0;
  int64_t offset = 0;  // in bucket elements
};

struct BucketPackParams {
  const PackSegment* segments = nullptr;  // host array
  int64_t num_segments = 0;
  DType segment_dtype = DType::kFloat32;
  void* bucket = nullptr;
  DType bucket_dtype = DType::kFloat32;
  float scale = 1.0f;          // pack only
  float* residual = nullptr;   // pack only: fp32, bucket layout, or null
};

TK_DECLARE_CPU_KERNEL(void, bucket_pack, const BucketPackParams&)
TK_DECLARE_CPU_KERNEL(void, bucket_unpack, const BucketPackParams&)
void bucket_pack_cuda(const BucketPackParams& p, CUstream_st* stream);
void bucket_unpack_cuda(const BucketPackParams& p, CUstream_st* stream);

}  // namespace torchkiln
