// RMSNorm forward / backward, optionally fused with the residual add that
// precedes it in every pre-norm transformer block.
//
//   forward:  s = x (+ residual);  out = s * rsqrt(mean(s^2) + eps) * weight
//   backward: given dy, with r = rsqrt(mean(s^2) + eps) and dot = sum(dy*w*s):
//             ds = r * dy * w - s * r^3 * dot / H   (+ grad of the residual output)
//             dw = sum over rows of dy * s * r
//
// Tensors are seen as (rows, hidden) with contiguous rows; each row may start
// at any stride. Accumulation is fp32; inputs/outputs share one DType.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

struct RmsNormParams {
  const void* x = nullptr;  // (rows, hidden); `out` may be x itself (rows are read before written)
  int64_t x_row_stride = 0;
  // Fused add: s = x + residual is written to residual_out (which may alias
  // residual for the in-place variant) and normalised as stored, so the
  // result equals running the add and the norm separately.
  const void* residual = nullptr;
  int64_t residual_row_stride = 0;
  void* residual_out = nullptr;
  int64_t residual_out_row_stride = 0;
  const void* __restrict__ weight = nullptr;  // (hidden)
  void* out = nullptr;                        // (rows, hidden)
  int64_t out_row_stride = 0;
  int64_t rows = 0;
  int64_t hidden = 0;
  float eps = 1e-6f;
  DType dtype = DType::kFloat32;
};

struct RmsNormBwdParams {
  const void* __restrict__ grad_out = nullptr;  // (rows, hidden)
  int64_t grad_out_row_stride = 0;
  const void* __restrict__ x = nullptr;  // the normalised input s
  int64_t x_row_stride = 0;
  const void* __restrict__ weight = nullptr;
  // Optional gradient arriving at the fused add's residual output; added to ds.
  const void* grad_residual = nullptr;
  int64_t grad_residual_row_stride = 0;
  void* grad_x = nullptr;  // (rows, hidden), contiguous
  void* grad_weight = nullptr;  // (hidden)
  // fp32 scratch (num_partials, hidden): each partial sums dw over a slice of rows.
  float* dw_partial = nullptr;
  int64_t num_partials = 0;
  int64_t rows = 0;
  int64_t hidden = 0;
  float eps = 1e-6f;
  DType dtype = DType::kFloat32;
};

TK_DECLARE_CPU_KERNEL(void, rms_norm_fwd, const RmsNormParams&)
TK_DECLARE_CPU_KERNEL(void, rms_norm_bwd, const RmsNormBwdParams&)

void rms_norm_fwd_cuda(const RmsNormParams& p, CUstream_st* stream);
// Number of fp32 partial rows of dw the CUDA backward wants in dw_partial.
int64_t rms_norm_bwd_cuda_num_partials(int64_t rows, int64_t hidden);
void rms_norm_bwd_cuda(const RmsNormBwdParams& p, CUstream_st* stream);

}  // namespace torchkiln
