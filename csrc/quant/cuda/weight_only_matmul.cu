// Weight-only quantised matmul on CUDA.
//  * Up to kMaxRows rows of x (decode): a warp per output row decodes the
//    packed weight in registers (coalesced 4-byte loads, 128 bytes per warp
//    step) and multiplies it with every row of x.
//  * More rows, bf16 / fp16 x (prefill): a tensor-core GEMM. Each block
//    decodes a 64 x 64 weight tile into shared memory as x's dtype (exactly
//    the dequantised values) and multiplies it with a 64 x 64 tile of x by
//    mma.sync; the dense weight never exists in global memory.
//  * fp32 x with many rows: dequantise + cuBLAS in the glue.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/cuda/cuda_helpers.cuh"
#include "common/cuda/mma.cuh"
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


// ------------------------------------------------------------ tensor-core GEMM
constexpr int kGemmTile = 64;             // rows of x, output features and columns of k per block step
constexpr int kGemmLd = kGemmTile + 8;    // padded shared rows: conflict-free ldmatrix
constexpr int kGemmThreads = 128;         // 4 warps, each a 32 x 32 block of the output tile
constexpr size_t kGemmSmemBytes = 2 * kGemmTile * kGemmLd * sizeof(uint16_t);

// Decodes weight rows [n0, n0 + 64) x columns [k0, k0 + 64) into sW as T.
// Thread t owns row t / 2 and half t % 2 of the row's bytes for this tile:
// 4-bit formats store 64 columns in 32 bytes (byte j: column j low nibble,
// 32 + j high), so a half is 16 bytes = two runs of 16 columns; int8 stores
// one column per byte, so a half is 32 columns. Each run lies in one group.
template <class T>
__device__ void decode_weight_tile(const WeightOnlyParams& p, int64_t n0, int64_t k0, T* sW) {
  const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
  const int64_t row = n0 + r;
  T* dst = sW + r * kGemmLd;
  const bool four_bit = p.format != WeightFormat::kInt8;
  const int runs = four_bit ? 2 : 1, run_len = four_bit ? 16 : 32;
  for (int run = 0; run < runs; ++run) {
    // Tile columns of this run, and where their codes sit in the row.
    const int c0 = four_bit ? run * 32 + half * 16 : half * 32;
    const int64_t byte0 = four_bit ? k0 / 2 + half * 16 : k0 + half * 32;
    const int64_t col0 = k0 + c0;
    if (row >= p.n || col0 >= p.k) {
      for (int j = 0; j < run_len; ++j) dst[c0 + j] = from_float<T>(0.0f);
      continue;
    }
    const int64_t g = col0 / p.group_size, groups = p.k / p.group_size;
    const float scale = p.scales[row * groups + g];
    const float zero = p.format == WeightFormat::kInt4 ? p.zeros[row * groups + g] : 0.0f;
    const uint8_t* w = p.qweight + row * p.qweight_row_stride + byte0;
    for (int j = 0; j < run_len; ++j) {
      float v = 0.0f;
      if (col0 + j < p.k) {  // padding columns of the last chunk decode to 0, not (0 - zero) * scale
        const uint32_t byte = w[j];
        switch (p.format) {
          case WeightFormat::kInt4:
            v = (static_cast<float>(run == 0 ? (byte & 15u) : (byte >> 4)) - zero) * scale;
            break;
          case WeightFormat::kNf4:
            v = kNf4[run == 0 ? (byte & 15u) : (byte >> 4)] * scale;
            break;
          default:
            v = static_cast<float>(static_cast<int8_t>(byte)) * scale;
            break;
        }
      }
      dst[c0 + j] = from_float<T>(v);  // rounded once, as the dequantised weight
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(const WeightOnlyParams p) {
  using Mma = cuda::MmaType<T>;
  TK_DYNAMIC_SMEM(smem);
  T* sX = reinterpret_cast<T*>(smem);
  T* sW = sX + kGemmTile * kGemmLd;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemmTile, m0 = static_cast<int64_t>(blockIdx.y) * kGemmTile;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const T* x = static_cast<const T*>(p.x);
  float acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  for (int64_t k0 = 0; k0 < p.k; k0 += kGemmTile) {
    __syncthreads();  // the previous tiles are no longer read
    for (int c = threadIdx.x; c < kGemmTile * kGemmTile; c += kGemmThreads) {
      const int r = c / kGemmTile, col = c % kGemmTile;
      const bool in = m0 + r < p.m && k0 + col < p.k;
      sX[r * kGemmLd + col] = in ? x[(m0 + r) * p.x_row_stride + k0 + col] : from_float<T>(0.0f);
    }
    decode_weight_tile(p, n0, k0, sW);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGemmTile / 16; ++kk) {
      uint32_t a[2][4];
      cuda::load_a(a[0], sX, kGemmLd, wm, kk * 16, lane);
      cuda::load_a(a[1], sX, kGemmLd, wm + 16, kk * 16, lane);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t b[4];
        cuda::load_b_nk(b, sW, kGemmLd, wn + 16 * j, kk * 16, lane);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          Mma::mma(acc[i][2 * j], a[i], b[0], b[1]);
          Mma::mma(acc[i][2 * j + 1], a[i], b[2], b[3]);
        }
      }
    }
  }

  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = m0 + wm + 16 * i + g + 8 * (e >> 1), col = n0 + wn + 8 * j + 2 * t + (e & 1);
        if (row < p.m && col < p.n)
          out[row * p.out_row_stride + col] = from_float<T>(acc[i][j][e] + (bias ? to_float(bias[col]) : 0.0f));
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

void weight_only_gemm_cuda(const WeightOnlyParams& p, CUstream_st* stream) {
  if (p.dtype == DType::kFloat32) throw std::invalid_argument("weight_only_gemm_cuda: x must be bf16 or fp16");
  if (p.m <= 0) return;
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kGemmTile)),
                  static_cast<unsigned>(cuda::ceil_div(p.m, kGemmTile)));
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>)
      TK_KERNEL_LAUNCH(grid, kGemmThreads, kGemmSmemBytes, stream, gemm_kernel<T>)(p);
  });
  cuda::check_launch("weight_only_gemm");
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
