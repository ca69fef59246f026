// SwiGLU gate CUDA kernels: 2-D grid (column blocks x rows), fp32 math.
#include "activation/silu_and_mul.h"
#include "common/cuda/cuda_helpers.cuh"

namespace torchkiln {
namespace {

using cuda::from_float;
using cuda::to_float;

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float a) { return 1.0f / (1.0f + __expf(-a)); }

template <class T>
__global__ void silu_and_mul_fwd_kernel(SiluAndMulParams p) {
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const T* a = static_cast<const T*>(p.x) + r * p.x_row_stride;
    const T* b = a + p.d;
    T* out = static_cast<T*>(p.out) + r * p.out_row_stride;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < p.d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const float av = to_float(a[j]);
      out[j] = from_float<T>(av * sigmoid(av) * to_float(b[j]));
    }
  }
}

template <class T>
__global__ void silu_and_mul_bwd_kernel(SiluAndMulBwdParams p) {
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    const T* a = static_cast<const T*>(p.x) + r * p.x_row_stride;
    const T* b = a + p.d;
    const T* dy = static_cast<const T*>(p.grad_out) + r * p.grad_out_row_stride;
    T* da = static_cast<T*>(p.grad_x) + r * p.grad_x_row_stride;
    T* db = da + p.d;
    for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < p.d;
         j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const float av = to_float(a[j]), bv = to_float(b[j]), g = to_float(dy[j]);
      const float sg = sigmoid(av), silu = av * sg;
      da[j] = from_float<T>(g * bv * sg * (1.0f + av * (1.0f - sg)));
      db[j] = from_float<T>(g * silu);
    }
  }
}

dim3 grid_for(int64_t rows, int64_t d) {
  const int64_t cols = cuda::ceil_div(d, kThreads);
  return dim3(static_cast<unsigned>(cols < 1024 ? cols : 1024), static_cast<unsigned>(rows < 65535 ? rows : 65535));
}

}  // namespace

void silu_and_mul_fwd_cuda(const SiluAndMulParams& p, CUstream_st* stream) {
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    TK_KERNEL_LAUNCH(grid_for(p.rows, p.d), kThreads, 0, stream, silu_and_mul_fwd_kernel<decltype(tag)>)(p);
  });
  cuda::check_launch("silu_and_mul_fwd");
}

void silu_and_mul_bwd_cuda(const SiluAndMulBwdParams& p, CUstream_st* stream) {
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    TK_KERNEL_LAUNCH(grid_for(p.rows, p.d), kThreads, 0, stream, silu_and_mul_bwd_kernel<decltype(tag)>)(p);
  });
  cuda::check_launch("silu_and_mul_bwd");
}

}  // namespace torchkiln
