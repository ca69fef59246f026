// Shared device helpers for the torch-free CUDA kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

// tests/cuda_emulation compiles every .cu file for the host too
// (TORCHKILN_EMULATE_CUDA) and runs the kernels thread by thread, so kernels
// avoid the two constructs a host compiler cannot take:
// Dynamic shared memory (instead of static __shared__ arrays), and
#ifdef TORCHKILN_EMULATE_CUDA
#define TK_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem.data()
#else
#define TK_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
// kernel launches: TK_KERNEL_LAUNCH(grid, block, smem, stream, kernel)(args...)
// is kernel<<<grid, block, smem, stream>>>(args...).
#ifdef TORCHKILN_EMULATE_CUDA
#define TK_KERNEL_LAUNCH(grid, block, smem, stream, ...) ::emu::launcher(grid, block, smem, __VA_ARGS__)
#else
#define TK_KERNEL_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace torchkiln {
namespace cuda {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// Eight consecutive elements as fp32, and back: one 16-byte access for
// bf16 / fp16, two for fp32. p must be 16-byte aligned.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  T e[8];
  memcpy(e, &raw, sizeof(raw));  // not a pointer cast: reading a uint4 as T breaks type-based alias analysis
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = to_float(e[i]);
}
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
template <class T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  T e[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = from_float<T>(v[i]);
  uint4 raw;
  memcpy(&raw, e, sizeof(raw));
  *reinterpret_cast<uint4*>(p) = raw;
}

// tanh to about 1e-7 absolute. The build's --use_fast_math turns tanhf into
// the tanh.approx instruction (about 5e-4 relative), too coarse for fp32
// attention with a softcap (scores are scaled by the cap afterwards).
__device__ __forceinline__ float tanh_accurate(float x) {
  const float e = __expf(2.0f * fabsf(x));  // inf for large |x|: the result is then +-1
  return copysignf(1.0f - 2.0f / (e + 1.0f), x);
}

// Calls f(T{}) with T the CUDA storage type for dtype.
template <class F>
void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? scratch[lane] : 0.0f;
  return warp_sum(v);
}

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("torchkiln: CUDA launch of ") + kernel +
                             " failed: " + cudaGetErrorString(err));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace torchkiln
