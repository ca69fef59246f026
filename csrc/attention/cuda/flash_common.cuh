// Building blocks of the CUDA FlashAttention-2 kernels (sm_80+): tensor-core
// mma.sync m16n8k16 with fp32 accumulators, ldmatrix fragment loads,
// cp.async tile copies, and the per-element score rule (scale, softcap,
// ALiBi, masks) shared by the forward and backward kernels.
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
// so no access conflicts, for any head_dim that is a multiple of 8.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention/flash_attn.h"
#include "common/cuda/cuda_helpers.cuh"

namespace torchkiln {
namespace flash {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------ element types
template <class T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
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
    return *reinterpret_cast<uint32_t*>(&v);
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
#ifdef TORCHKILN_EMULATE_CUDA
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  std::memset(dst, 0, 16);
  if (bytes > 0) std::memcpy(dst, src, 16);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() {}
#else
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
#endif

// ------------------------------------------------------------ sequences
// Where one (batch entry, head) lives: offsets in elements and lengths.
struct SeqInfo {
  int64_t q_off = 0, k_off = 0;  // token offset: varlen cu_seqlens[b], fixed b * stride
  int sq = 0, sk = 0;
  int64_t lse_off = 0;           // lse / dsum index of (b, h, row 0)
};

__device__ __forceinline__ SeqInfo seq_info(const FlashAttnParams& p, int b, int h) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    s.sq = p.cu_seqlens_q[b + 1] - q0;
    s.sk = p.cu_seqlens_k[b + 1] - k0;
    s.q_off = q0;
    s.k_off = p.block_table != nullptr ? 0 : k0;
    s.lse_off = h * p.lse_head_stride + q0;
  } else {
    s.sq = static_cast<int>(p.seqlen_q);
    s.sk = static_cast<int>(p.seqlen_k);
    s.lse_off = b * p.lse_batch_stride + h * p.lse_head_stride;
  }
  return s;
}

// Element offset of token `tok` of a (.., tokens, heads, head_dim) tensor
// (FlashAttnTensor or FlashAttnOutput).
template <class Tensor>
__device__ __forceinline__ int64_t token_offset(const Tensor& t, int b, bool varlen, int64_t tok, int h) {
  return (varlen ? 0 : b * t.batch_stride) + tok * t.row_stride + h * t.head_stride;
}

// Key/value row j of sequence b: through the block table when paged.
__device__ __forceinline__ int64_t kv_offset(const FlashAttnParams& p, const FlashAttnTensor& t, int b, int64_t k_off,
                                             int j, int hk) {
  if (p.block_table != nullptr) {
    const int32_t block = p.block_table[b * p.block_table_stride + j / p.block_size];
    return block * t.batch_stride + (j % p.block_size) * t.row_stride + hk * t.head_stride;
  }
  return token_offset(t, b, p.cu_seqlens_q != nullptr, k_off + j, hk);
}

// ------------------------------------------------------------ score rule
// Everything the per-element score transform needs for one (b, h).
struct ScoreRule {
  float scale_log2;  // scale * log2(e): plain scores go straight to base 2
  float scale;       // natural units, for softcap / ALiBi
  float softcap;     // > 0: s = softcap * tanh(s / softcap)
  float slope;       // ALiBi slope, 0 when none
  bool modified;     // softcap or ALiBi present
  int diag;          // sk - sq: bottom-right alignment
  int left, right;   // window, -1 unbounded
  int sk;
};

__device__ __forceinline__ ScoreRule score_rule(const FlashAttnParams& p, int b, int h, int sq, int sk) {
  ScoreRule r;
  r.scale = p.scale;
  r.scale_log2 = p.scale * kLog2e;
  r.softcap = p.softcap;
  r.slope = p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
  r.modified = p.softcap > 0.0f || p.alibi_slopes != nullptr;
  r.diag = sk - sq;
  r.left = static_cast<int>(p.window_left);
  r.right = static_cast<int>(p.window_right);
  r.sk = sk;
  return r;
}

__device__ __forceinline__ bool key_visible(const ScoreRule& r, int i, int j) {
  return j < r.sk && (r.left < 0 || j >= i + r.diag - r.left) && (r.right < 0 || j <= i + r.diag + r.right);
}

// Base-2 score of raw dot product `raw` for query i, key j (-inf when
// masked). `cap_grad` receives d(capped)/d(uncapped) for the backward.
__device__ __forceinline__ float score_log2(const ScoreRule& r, float raw, int i, int j, bool check_mask,
                                            float* cap_grad = nullptr) {
  if (check_mask && !key_visible(r, i, j)) return -INFINITY;
  if (!r.modified) return raw * r.scale_log2;
  float s = raw * r.scale;
  if (r.softcap > 0.0f) {
    const float t = tanhf(s / r.softcap);
    s = r.softcap * t;
    if (cap_grad != nullptr) *cap_grad = 1.0f - t * t;
  }
  s -= r.slope * fabsf(static_cast<float>(i + r.diag - j));
  return s * kLog2e;
}

// Key range [begin, end) that rows [i0, i1) can see, and whether a key tile
// [n0, n1) needs per-element masking for those rows.
struct KeyRange {
  int begin, end;
};
__device__ __forceinline__ KeyRange key_range(const ScoreRule& r, int i0, int i1) {
  KeyRange k{0, r.sk};
  if (r.left >= 0) k.begin = max(0, i0 + r.diag - r.left);
  if (r.right >= 0) k.end = min(r.sk, i1 - 1 + r.diag + r.right + 1);
  return k;
}
__device__ __forceinline__ bool tile_needs_mask(const ScoreRule& r, int i0, int i1, int n0, int n1) {
  return n1 > r.sk || (r.right >= 0 && n1 - 1 > i0 + r.diag + r.right) ||
         (r.left >= 0 && n0 < i1 - 1 + r.diag - r.left);
}
// Query rows [begin, end) that can see any key of [n0, n1) (backward: which
// query tiles a key tile visits).
__device__ __forceinline__ KeyRange query_range(const ScoreRule& r, int sq, int n0, int n1) {
  KeyRange q{0, sq};
  if (r.right >= 0) q.begin = max(0, n0 - r.diag - r.right);          // j <= i + diag + right
  if (r.left >= 0) q.end = min(sq, n1 - 1 - r.diag + r.left + 1);     // j >= i + diag - left
  return q;
}

// ------------------------------------------------------------ tile copies
// Copies rows [row0, row0 + ROWS) of one head (row r at offset(r)) into a
// padded shared tile of D + 8 columns; rows >= limit are zero-filled.
template <int ROWS, int D, int THREADS, class T, class Offset>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int row0, int limit, const Offset& offset) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = D + 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int row = row0 + r;
    const bool ok = row < limit;
    const T* src = ok ? base + offset(row) + col : base;
    cp_async_16(tile + r * kLd + col, src, ok ? 16 : 0);
  }
}

}  // namespace flash
}  // namespace torchkiln
