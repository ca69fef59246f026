// W8A8 on CUDA: each row of x is quantised to int8 with one scale
// (max|x| / 127, round half to even: the CPU kernel's and torch.round's
// numbers), then an int8 tensor-core GEMM (mma.sync m16n8k32, exact int32
// sums) computes out = acc * x_scale[m] * w_scale[n] (+ bias).
//
// The weight is read straight from its CPU (VNNI) panel layout: in a panel
// of 16 output rows, k-quad q is one 64-byte line holding 4 consecutive
// columns of each row, so the B fragment register a lane needs (4 values of
// k for one output n) is one aligned 4-byte load. Each warp computes a 32 x 32
// block of the output from fragments loaded directly (L1 / L2 serve the
// reuse between the block's warps). When the output tiles alone are too few
// to keep every SM busy (few rows of x), k is also split over blocks: each
// writes its exact int32 sums, and a second kernel adds them and applies
// the scales, so the result is the same bits as one block's.
#include <algorithm>
#include <cmath>
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

constexpr int kQuantThreads = 256;
constexpr int kTile = 64;      // output rows and columns per block
constexpr int kThreads = 128;  // 4 warps, 2 x 2 blocks of 32 x 32

// One block per row: scale and int8 codes, zero-padded to xq_stride columns.
template <class T>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_rows_kernel(const W8A8Params p, int8_t* xq, int64_t xq_stride, float* x_scale) {
  TK_DYNAMIC_SMEM(smem);
  float* scratch = reinterpret_cast<float*>(smem);
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  float amax = 0.0f;
  for (int64_t j = threadIdx.x; j < p.k; j += blockDim.x) amax = fmaxf(amax, fabsf(to_float(x[j])));
  // Block max: warp shuffles, then one value per warp through shared memory.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = 0.0f;
  for (int w = 0; w < kQuantThreads / 32; ++w) amax = fmaxf(amax, scratch[w]);
  const float scale = amax / 127.0f;
  const float div = scale == 0.0f ? 1.0f : scale;
  int8_t* q = xq + row * xq_stride;
  for (int64_t j = threadIdx.x; j < xq_stride; j += blockDim.x) {
    float v = 0.0f;
    // IEEE division (fast-math would approximate it) so codes match torch.round(x / scale).
    if (j < p.k) v = fminf(127.0f, fmaxf(-127.0f, rintf(__fdiv_rn(to_float(x[j]), div))));
    q[j] = static_cast<int8_t>(v);
  }
  if (threadIdx.x == 0) x_scale[row] = scale;
}

__device__ __forceinline__ uint32_t load_u32(const int8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// out (+ bias) from the int32 sums of one output element.
template <class T>
__device__ __forceinline__ void store_scaled(const W8A8Params& p, const float* x_scale, int64_t row, int64_t col,
                                             int acc) {
  const T* bias = static_cast<const T*>(p.bias);
  const float v = static_cast<float>(acc) * (x_scale[row] * p.scales[col]);
  static_cast<T*>(p.out)[row * p.out_row_stride + col] = from_float<T>(v + (bias ? to_float(bias[col]) : 0.0f));
}

// Grid (n tiles, m tiles, k splits); split z covers columns
// [z * cols_per_split, (z + 1) * cols_per_split) of the padded xq. With one
// split the block writes out; otherwise its int32 sums, partial[z][m][n].
template <class T>
__global__ void __launch_bounds__(kThreads)
    w8a8_gemm_kernel(const W8A8Params p, const int8_t* xq, int64_t xq_stride, const float* x_scale,
                     int64_t cols_per_split, int32_t* partial) {
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile, m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t k_begin = blockIdx.z * cols_per_split, k_end = min(xq_stride, k_begin + cols_per_split);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;
  const int64_t quads = (p.k + 3) / 4, n16 = (p.n + kPanelRows - 1) / kPanelRows * kPanelRows;
  int acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += 32) {
    uint32_t a[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t r0 = m0 + wm + 16 * i + g, r1 = r0 + 8;
      a[i][0] = r0 < p.m ? load_u32(xq + r0 * xq_stride + k0 + 4 * t) : 0u;
      a[i][1] = r1 < p.m ? load_u32(xq + r1 * xq_stride + k0 + 4 * t) : 0u;
      a[i][2] = r0 < p.m ? load_u32(xq + r0 * xq_stride + k0 + 16 + 4 * t) : 0u;
      a[i][3] = r1 < p.m ? load_u32(xq + r1 * xq_stride + k0 + 16 + 4 * t) : 0u;
    }
    const int64_t q0 = k0 / 4 + t, q1 = q0 + 4;  // k-quads of b0 and b1
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + wn + 8 * j + g;
      const int8_t* panel = p.qweight + (n / kPanelRows) * quads * 64 + (n % kPanelRows) * 4;
      const bool in = n < n16;
      const uint32_t b0 = in && q0 < quads ? load_u32(panel + q0 * 64) : 0u;
      const uint32_t b1 = in && q1 < quads ? load_u32(panel + q1 * 64) : 0u;
#pragma unroll
      for (int i = 0; i < 2; ++i) cuda::mma_s8(acc[i][j], a[i], b0, b1);
    }
  }

  int32_t* mine = partial ? partial + blockIdx.z * p.m * p.n : nullptr;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = m0 + wm + 16 * i + g + 8 * (e >> 1), col = n0 + wn + 8 * j + 2 * t + (e & 1);
        if (row >= p.m || col >= p.n) continue;
        if (mine)
          mine[row * p.n + col] = acc[i][j][e];
        else
          store_scaled<T>(p, x_scale, row, col, acc[i][j][e]);
      }
}

// out = (sum over splits of partial[z]) * scales (+ bias).
template <class T>
__global__ void w8a8_split_sum_kernel(const W8A8Params p, const float* x_scale, int splits, const int32_t* partial) {
  const int64_t total = p.m * p.n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int acc = 0;
    for (int z = 0; z < splits; ++z) acc += partial[z * total + i];
    store_scaled<T>(p, x_scale, i / p.n, i % p.n, acc);
  }
}

}  // namespace

int64_t w8a8_cuda_x_stride(int64_t k) { return (k + 31) / 32 * 32; }

int64_t w8a8_cuda_splits(const W8A8Params& p) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // About four blocks per SM, at least 4 k steps (of 32) per split.
  const int64_t tiles = cuda::ceil_div(p.n, kTile) * cuda::ceil_div(p.m, kTile);
  const int64_t steps = w8a8_cuda_x_stride(p.k) / 32;
  const int64_t want = cuda::ceil_div(4 * static_cast<int64_t>(std::max(sms, 1)), tiles);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, steps / 4, 65535}));
  return cuda::ceil_div(steps, cuda::ceil_div(steps, splits));  // no empty split
}

void w8a8_matmul_cuda(const W8A8Params& p, int8_t* xq, float* x_scale, int64_t splits, int32_t* workspace,
                      CUstream_st* stream) {
  if (p.m <= 0) return;
  if (splits < 1 || (splits > 1 && workspace == nullptr))
    throw std::invalid_argument("w8a8_matmul_cuda: splits > 1 need a workspace of splits x m x n int32");
  const int64_t xq_stride = w8a8_cuda_x_stride(p.k), steps = xq_stride / 32;
  const int64_t per_split = cuda::ceil_div(steps, splits);
  const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p.n, kTile)), static_cast<unsigned>(cuda::ceil_div(p.m, kTile)),
                  static_cast<unsigned>(cuda::ceil_div(steps, per_split)));
  if (p.m > 2147483647 || grid.y > 65535) throw std::invalid_argument("w8a8_matmul_cuda: too many rows of x");
  int32_t* partial = grid.z > 1 ? workspace : nullptr;
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    TK_KERNEL_LAUNCH(static_cast<unsigned>(p.m), kQuantThreads, 32 * sizeof(float), stream,
                     quantize_rows_kernel<T>)(p, xq, xq_stride, x_scale);
    cuda::check_launch("w8a8 quantize_rows");
    TK_KERNEL_LAUNCH(grid, kThreads, 0, stream, w8a8_gemm_kernel<T>)(p, xq, xq_stride, x_scale, per_split * 32, partial);
    cuda::check_launch("w8a8 gemm");
    if (partial != nullptr) {
      const int blocks = static_cast<int>(std::min<int64_t>(4096, cuda::ceil_div(p.m * p.n, 256)));
      TK_KERNEL_LAUNCH(blocks, 256, 0, stream, w8a8_split_sum_kernel<T>)(p, x_scale, static_cast<int>(grid.z),
                                                                         partial);
      cuda::check_launch("w8a8 split_sum");
    }
  });
}

}  // namespace torchkiln
