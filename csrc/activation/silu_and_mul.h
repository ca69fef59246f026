// SwiGLU gate: out = silu(x[..., :d]) * x[..., d:], silu(a) = a * sigmoid(a).
// Backward with sg = sigmoid(a):
//   da = dy * b * sg * (1 + a * (1 - sg)),  db = dy * a * sg
// Rows are contiguous inside, row starts strided; fp32 math.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

struct SiluAndMulParams {
  const void* __restrict__ x = nullptr;  // (rows, 2 * d)
  int64_t x_row_stride = 0;
  void* __restrict__ out = nullptr;  // (rows, d)
  int64_t out_row_stride = 0;
  int64_t rows = 0;
  int64_t d = 0;
  DType dtype = DType::kFloat32;
};

struct SiluAndMulBwdParams {
  const void* __restrict__ grad_out = nullptr;  // (rows, d)
  int64_t grad_out_row_stride = 0;
  const void* __restrict__ x = nullptr;  // (rows, 2 * d)
  int64_t x_row_stride = 0;
  void* __restrict__ grad_x = nullptr;  // (rows, 2 * d)
  int64_t grad_x_row_stride = 0;
  int64_t rows = 0;
  int64_t d = 0;
  DType dtype = DType::kFloat32;
};

TK_DECLARE_CPU_KERNEL(void, silu_and_mul_fwd, const SiluAndMulParams&)
TK_DECLARE_CPU_KERNEL(void, silu_and_mul_bwd, const SiluAndMulBwdParams&)
void silu_and_mul_fwd_cuda(const SiluAndMulParams& p, CUstream_st* stream);
void silu_and_mul_bwd_cuda(const SiluAndMulBwdParams& p, CUstream_st* stream);

}  // namespace torchkiln
