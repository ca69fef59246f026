// Weight-only quantised matmul on CUDA: a warp per output row decodes the
// packed weight in registers (coalesced 4-byte loads, 128 bytes per warp
// step) and multiplies it with up to kMaxRows rows of x; many-row calls are
// dequantised to x's dtype and handed to cuBLAS by the glue instead.
// Not yet tensor-core (Marlin-style) kernels: see the issue notes.
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common/cuda/cuda_helpers.cuh"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace {

using cuda::from_float;
using cuda::to_float;
using cuda::warp_sum;

constexpr int kWarps = 4;  // output rows per block
constexpr int kMaxRows = 8;

__constant__ float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f,
};

// The weight of (row, column) from its code, as in the CPU reference:
// (q - zero) * scale, code * scale (nf4) or q * scale (int8).
__device__ __forceinline__ float weight_value(const WeightOnlyParams& p, int64_t row, int64_t col, int code) {
  const int64_t g = col / p.group_size, groups = p.k / p.group_size;
  const float s = p.scales[row * groups + g];
  switch (p.format) {
    case WeightFormat::kInt4:
      return (static_cast<float>(code) - p.zeros[row * groups + g]) * s;
    case WeightFormat::kNf4:
      return kNf4[code] * s;
    default:
      return static_cast<float>(code) * s;
  }
}

// Calls f(column, code) for the (up to two) codes held by byte b of a row.
template <class F>
__device__ __forceinline__ void for_codes(const WeightOnlyParams& p, int64_t b, uint32_t byte, const F& f) {
  if (p.format == WeightFormat::kInt8) {
    if (b < p.k) f(b, static_cast<int>(static_cast<int8_t>(byte)));
    return;
  }
  const int64_t c = b / (kNibbleChunk / 2), j = b % (kNibbleChunk / 2);
  const int64_t lo = c * kNibbleChunk + j, hi = lo + kNibbleChunk / 2;
  if (lo < p.k) f(lo, static_cast<int>(byte & 15u));
  if (hi < p.k) f(hi, static_cast<int>(byte >> 4));
}

template <class T, int M>
__global__ void gemv_kernel(WeightOnlyParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.n) return;
  const T* x = static_cast<const T*>(p.x);
  const uint8_t* w = p.qweight + row * p.qweight_row_stride;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  // Rows are 4-byte aligned when the row stride is (it is: k/2 rounded to 32, or k % 4 == 0).
  const bool aligned = (p.qweight_row_stride % 4) == 0;
  for (int64_t b0 = static_cast<int64_t>(lane) * 4; b0 < p.qweight_row_stride; b0 += 32 * 4) {
    uint32_t word = 0;
    if (aligned && b0 + 4 <= p.qweight_row_stride) {
      word = *reinterpret_cast<const uint32_t*>(w + b0);
    } else {
      for (int t = 0; t < 4 && b0 + t < p.qweight_row_stride; ++t) word |= static_cast<uint32_t>(w[b0 + t]) << (8 * t);
    }
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      if (b0 + t >= p.qweight_row_stride) break;
      for_codes(p, b0 + t, (word >> (8 * t)) & 0xFFu, [&](int64_t col, int code) {
        const float wv = weight_value(p, row, col, code);
#pragma unroll
        for (int m = 0; m < M; ++m)
          if (m < p.m) acc[m] += wv * to_float(x[m * p.x_row_stride + col]);
      });
    }
  }
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float v = warp_sum(acc[m]);
    if (lane == 0 && m < p.m) out[m * p.out_row_stride + row] = from_float<T>(v + (bias ? to_float(bias[row]) : 0.0f));
  }
}

template <class T>
__global__ void dequantize_kernel(WeightOnlyParams p, T* dense) {
  const int64_t total = p.n * p.qweight_row_stride;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.qweight_row_stride, b = i % p.qweight_row_stride;
    for_codes(p, b, p.qweight[i], [&](int64_t col, int code) {
      dense[row * p.k + col] = from_float<T>(weight_value(p, row, col, code));
    });
  }
}

}  // namespace

void weight_only_matmul_cuda(const WeightOnlyParams& p, CUstream_st* stream) {
  if (p.m > kMaxRows) throw std::invalid_argument("weight_only_matmul_cuda: at most 8 rows of x per call");
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kWarps)));
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.m <= 1)
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, 0, stream, gemv_kernel<T, 1>)(p);
    else if (p.m <= 4)
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, 0, stream, gemv_kernel<T, 4>)(p);
    else
      TK_KERNEL_LAUNCH(grid, 32 * kWarps, 0, stream, gemv_kernel<T, kMaxRows>)(p);
  });
  cuda::check_launch("weight_only_matmul");
}

void weight_only_dequantize_cuda(const WeightOnlyParams& p, void* dense, CUstream_st* stream) {
  const int64_t total = p.n * p.qweight_row_stride;
  const int blocks = static_cast<int>(std::min<int64_t>(4096, cuda::ceil_div(total, 256)));
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    TK_KERNEL_LAUNCH(blocks, 256, 0, stream, dequantize_kernel<T>)(p, static_cast<T*>(dense));
  });
  cuda::check_launch("weight_only_dequantize");
}

}  // namespace torchkiln
