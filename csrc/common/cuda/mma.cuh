// Tensor-core building blocks for sm_80+ kernels (attention, quantised GEMM):
// mma.sync m16n8k16 (bf16 / fp16, fp32 accumulators) and m16n8k32 (int8,
// int32 accumulators), ldmatrix fragment loads from shared memory, cp.async.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs), per lane with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row major): a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16x8, "col"):      b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C (16x8, fp32):       c0,c1 (g, 2t..2t+1)   c2,c3 (g+8, 2t..2t+1)
// Two C tiles side by side (columns 0..15) are exactly one A fragment, which
// is how probabilities go from the score accumulators into the next product
// without touching shared memory.
//
// Shared-memory tiles are row major with rows padded by 8 elements (16 bytes):
// the 8 rows an ldmatrix reads then start in 8 different 16-byte bank groups,
// so no access conflicts, for any row length that is a multiple of 8.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "common/cuda/cuda_helpers.cuh"

namespace torchkiln {
namespace cuda {

// ------------------------------------------------------------ element types
template <class T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    return bits;
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef TORCHKILN_EMULATE_CUDA
    emu::mma_16816(c, a, b0, b1, /*bf16=*/true);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  __device__ static __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __forceinline__ __nv_bfloat162 pair(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
};
template <>
struct MmaType<__half> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &v, sizeof(bits));
    return bits;
  }
  __device__ static __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef TORCHKILN_EMULATE_CUDA
    emu::mma_16816(c, a, b0, b1, /*bf16=*/false);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  __device__ static __forceinline__ float to_float(__half x) { return __half2float(x); }
  __device__ static __forceinline__ __half2 pair(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};

// int8 x int8 -> int32, m16n8k32 (exact). Per lane, four 8-bit values per
// register: a0 (g, 4t..4t+3)  a1 (g+8, 4t..)  a2 (g, 16+4t..)  a3 (g+8, 16+4t..);
// b0 (k 4t..4t+3, n g)  b1 (k 16+4t.., n g); C as above, in int32.
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef TORCHKILN_EMULATE_CUDA
  emu::mma_s8_16832(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ------------------------------------------------------------ shared memory
// tests/cuda_emulation runs these kernels on the host (TORCHKILN_EMULATE_CUDA):
// the few PTX instructions below then go to its emulator.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#ifdef TORCHKILN_EMULATE_CUDA
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu::dynamic_smem.data());
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Four 8x8 16-bit matrices; lane L supplies the row address of matrix L / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef TORCHKILN_EMULATE_CUDA
  emu::ldmatrix_x4(r, addr, /*trans=*/false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#ifdef TORCHKILN_EMULATE_CUDA
  emu::ldmatrix_x4(r, addr, /*trans=*/true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// A fragment of rows [row0, row0+16) x columns [col0, col0+16) of a row-major
// tile with `ld` elements per row.
template <class T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int ld, int row0, int col0, int lane) {
  const int m = lane >> 3;
  const int row = row0 + (lane & 7) + ((m & 1) << 3), col = col0 + ((m >> 1) << 3);
  ldmatrix_x4(a, smem_addr(tile + row * ld + col));
}

// B fragments for C = A * X^T where X is stored row major as (n, k): rows
// [n0, n0+16) x k [k0, k0+16). b[0], b[1] serve output columns n0..n0+7 and
// b[2], b[3] columns n0+8..n0+15.
template <class T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int ld, int n0, int k0, int lane) {
  const int m = lane >> 3;
  const int row = n0 + (lane & 7) + ((m >> 1) << 3), col = k0 + ((m & 1) << 3);
  ldmatrix_x4(b, smem_addr(tile + row * ld + col));
}

// B fragments for C = A * X where X is stored row major as (k, n): k [k0, k0+16)
// x columns [n0, n0+16); b[0], b[1] serve columns n0..n0+7, b[2], b[3] n0+8...
template <class T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int ld, int k0, int n0, int lane) {
  const int m = lane >> 3;
  const int row = k0 + (lane & 7) + ((m & 1) << 3), col = n0 + ((m >> 1) << 3);
  ldmatrix_x4_trans(b, smem_addr(tile + row * ld + col));
}

// 16-byte global -> shared copy; bytes = 0 zero-fills (rows past the end).
#ifdef TORCHKILN_EMULATE_CUDA  // tests/cuda_emulation/cuda_shim.h
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  ::emu::cp_async_16(dst, src, bytes);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() { ::emu::cp_async_wait_all(); }
#else
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
#endif

}  // namespace cuda
}  // namespace torchkiln
