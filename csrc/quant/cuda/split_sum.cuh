// The second pass of a weight-only matmul whose k was split over blocks:
// out = sum over splits of workspace[z] (+ bias), the splits added in order,
// so the result does not depend on which block finished first.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/cuda/cuda_helpers.cuh"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace quant_cuda {

// workspace: splits x (m, n) fp32 partial sums.
template <class T>
__global__ void split_sum_kernel(const WeightOnlyParams p, int splits, const float* workspace) {
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.m * p.n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.n, col = i % p.n;
    float v = 0.0f;
    for (int z = 0; z < splits; ++z) v += workspace[z * total + i];
    out[row * p.out_row_stride + col] = cuda::from_float<T>(v + (bias ? cuda::to_float(bias[col]) : 0.0f));
  }
}

template <class T>
void launch_split_sum(const WeightOnlyParams& p, int splits, const float* workspace, CUstream_st* stream) {
  const int blocks = static_cast<int>(std::min<int64_t>(4096, cuda::ceil_div(p.m * p.n, 256)));
  TK_KERNEL_LAUNCH(blocks, 256, 0, stream, split_sum_kernel<T>)(p, splits, workspace);
  cuda::check_launch("weight-only split_sum");
}

}  // namespace quant_cuda
}  // namespace torchkiln
