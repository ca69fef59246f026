// RMSNorm CUDA kernels: one block per row (grid-stride over rows), fp32 sums.
// The forward has a vector path (16-byte accesses, the row held in registers
// between the sum of squares and the output) for rows of up to 32768
// elements that are multiples of 8 and 16-byte aligned; the scalar kernel
// takes everything else.
#include <algorithm>
#include <cstdint>

#include "common/cuda/cuda_helpers.cuh"
#include "norm/rms_norm.h"

namespace torchkiln {
namespace {

using cuda::block_sum;
using cuda::from_float;
using cuda::load8;
using cuda::store8;
using cuda::to_float;

int threads_for(int64_t hidden) {
  int t = 32;
  while (t < 1024 && t < hidden) t *= 2;
  return t;
}

constexpr size_t kScratchBytes = 32 * sizeof(float);  // block_sum's per-warp partials

template <class T>
__global__ void rms_norm_fwd_kernel(RmsNormParams p) {
  TK_DYNAMIC_SMEM(smem);
  float* scratch = reinterpret_cast<float*>(smem);
  const T* w = static_cast<const T*>(p.weight);
  const float inv_h = 1.0f / static_cast<float>(p.hidden);
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* s = static_cast<const T*>(p.x) + r * p.x_row_stride;
    float ss = 0.0f;
    if (p.residual) {
      const T* res = static_cast<const T*>(p.residual) + r * p.residual_row_stride;
      T* sum = static_cast<T*>(p.residual_out) + r * p.residual_out_row_stride;
      for (int64_t j = threadIdx.x; j < p.hidden; j += blockDim.x) {
        const T v = from_float<T>(to_float(s[j]) + to_float(res[j]));
        sum[j] = v;  // read back below by this same thread only
        const float f = to_float(v);
        ss += f * f;
      }
      s = sum;
    } else {
      for (int64_t j = threadIdx.x; j < p.hidden; j += blockDim.x) {
        const float f = to_float(s[j]);
        ss += f * f;
      }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) * inv_h + p.eps);
    T* out = static_cast<T*>(p.out) + r * p.out_row_stride;
    for (int64_t j = threadIdx.x; j < p.hidden; j += blockDim.x)
      out[j] = from_float<T>(to_float(s[j]) * rstd * to_float(w[j]));
  }
}

constexpr int kVecPerThread = 4;  // 8-element vectors a thread holds per row
constexpr int64_t kMaxVecHidden = 8 * kVecPerThread * 1024;

// Same arithmetic, in the same order, as rms_norm_fwd_kernel.
template <class T>
__global__ void rms_norm_fwd_vec_kernel(RmsNormParams p) {
  TK_DYNAMIC_SMEM(smem);
  float* scratch = reinterpret_cast<float*>(smem);
  const T* w = static_cast<const T*>(p.weight);
  const float inv_h = 1.0f / static_cast<float>(p.hidden);
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
    float v[kVecPerThread][8];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < kVecPerThread; ++i) {
      const int64_t c = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * 8;
      if (c >= p.hidden) break;
      load8(x + c, v[i]);
      if (p.residual) {
        float res[8];
        load8(static_cast<const T*>(p.residual) + r * p.residual_row_stride + c, res);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[i][e] = to_float(from_float<T>(v[i][e] + res[e]));  // the sum as stored
        store8(static_cast<T*>(p.residual_out) + r * p.residual_out_row_stride + c, v[i]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) ss += v[i][e] * v[i][e];
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) * inv_h + p.eps);
    T* out = static_cast<T*>(p.out) + r * p.out_row_stride;
#pragma unroll
    for (int i = 0; i < kVecPerThread; ++i) {
      const int64_t c = (threadIdx.x + static_cast<int64_t>(i) * blockDim.x) * 8;
      if (c >= p.hidden) break;
      float wv[8], o[8];
      load8(w + c, wv);
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = v[i][e] * rstd * wv[e];
      store8(out + c, o);
    }
  }
}

// Whether every row of every tensor starts 16-byte aligned (with hidden % 8
// == 0 the vectors then stay aligned).
bool vec_path_ok(const RmsNormParams& p) {
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const auto aligned = [&](const void* ptr, int64_t row_stride) {
    return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * elem) % 16 == 0);
  };
  return p.hidden % 8 == 0 && p.hidden <= kMaxVecHidden && aligned(p.x, p.x_row_stride) &&
         aligned(p.residual, p.residual_row_stride) && aligned(p.residual_out, p.residual_out_row_stride) &&
         aligned(p.out, p.out_row_stride) && aligned(p.weight, 0);
}

// Block b handles rows b, b + grid, ... and owns dw_partial row b.
template <class T>
__global__ void rms_norm_bwd_kernel(RmsNormBwdParams p) {
  TK_DYNAMIC_SMEM(smem);
  float* scratch = reinterpret_cast<float*>(smem);
  const T* w = static_cast<const T*>(p.weight);
  const float inv_h = 1.0f / static_cast<float>(p.hidden);
  float* dwp = p.dw_partial + blockIdx.x * p.hidden;
  for (int64_t j = threadIdx.x; j < p.hidden; j += blockDim.x) dwp[j] = 0.0f;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const T* dy = static_cast<const T*>(p.grad_out) + r * p.grad_out_row_stride;
    const T* s = static_cast<const T*>(p.x) + r * p.x_row_stride;
    float ss = 0.0f, dot = 0.0f;
    for (int64_t j = threadIdx.x; j < p.hidden; j += blockDim.x) {
      const float sv = to_float(s[j]);
      ss += sv * sv;
      dot += to_float(dy[j]) * to_float(w[j]) * sv;
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) * inv_h + p.eps);
    const float c = rstd * rstd * rstd * block_sum(dot, scratch) * inv_h;
    const T* gres =
        p.grad_residual ? static_cast<const T*>(p.grad_residual) + r * p.grad_residual_row_stride : nullptr;
    T* dx = static_cast<T*>(p.grad_x) + r * p.hidden;
    for (int64_t j = threadIdx.x; j < p.hidden; j += blockDim.x) {
      const float sv = to_float(s[j]), g = to_float(dy[j]);
      float d = rstd * g * to_float(w[j]) - sv * c;
      if (gres) d += to_float(gres[j]);
      dx[j] = from_float<T>(d);
      dwp[j] += g * sv * rstd;
    }
  }
}

template <class T>
__global__ void reduce_dw_kernel(RmsNormBwdParams p) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= p.hidden) return;
  float acc = 0.0f;
  for (int64_t c = 0; c < p.num_partials; ++c) acc += p.dw_partial[c * p.hidden + j];
  static_cast<T*>(p.grad_weight)[j] = from_float<T>(acc);
}

}  // namespace

void rms_norm_fwd_cuda(const RmsNormParams& p, CUstream_st* stream) {
  const int64_t blocks = p.rows < 65535 ? p.rows : 65535;
  const bool vec = vec_path_ok(p);
  // Vector path: enough warps that each thread holds at most kVecPerThread vectors.
  const int64_t vectors = p.hidden / 8, per_thread = (vectors + kVecPerThread - 1) / kVecPerThread;
  const int vec_threads = static_cast<int>(std::max<int64_t>(32, (per_thread + 31) / 32 * 32));
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec)
      TK_KERNEL_LAUNCH(blocks, vec_threads, kScratchBytes, stream, rms_norm_fwd_vec_kernel<T>)(p);
    else
      TK_KERNEL_LAUNCH(blocks, threads_for(p.hidden), kScratchBytes, stream, rms_norm_fwd_kernel<T>)(p);
  });
  cuda::check_launch("rms_norm_fwd");
}

int64_t rms_norm_bwd_cuda_num_partials(int64_t rows, int64_t hidden) { return rows < 512 ? rows : 512; }

void rms_norm_bwd_cuda(const RmsNormBwdParams& p, CUstream_st* stream) {
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    TK_KERNEL_LAUNCH(p.num_partials, threads_for(p.hidden), kScratchBytes, stream, rms_norm_bwd_kernel<T>)(p);
    TK_KERNEL_LAUNCH(cuda::ceil_div(p.hidden, 256), 256, 0, stream, reduce_dw_kernel<T>)(p);
  });
  cuda::check_launch("rms_norm_bwd");
}

}  // namespace torchkiln
