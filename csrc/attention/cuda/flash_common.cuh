// Building blocks of the CUDA FlashAttention-2 kernels (sm_80+): the
// per-element score rule (scale, softcap, ALiBi, masks), sequence offsets and
// tile copies shared by the forward and backward kernels. The tensor-core
// primitives (mma.sync, ldmatrix, cp.async) are in common/cuda/mma.cuh.
#pragma once
#include <cmath>
#include <cstdint>

#include "attention/flash_attn.h"
#include "common/cuda/cuda_helpers.cuh"
#include "common/cuda/mma.cuh"
#include "common/cuda/packed_span.cuh"

namespace torchkiln {
namespace flash {

using namespace ::torchkiln::cuda;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------ sequences
// Where one (batch entry, head) lives: offsets in elements and lengths.
struct SeqInfo {
  int64_t q_off = 0, k_off = 0;  // token offset: varlen cu_seqlens[b], fixed b * stride
  int sq = 0, sk = 0;
  int64_t lse_off = 0;           // lse / dsum index of (b, h, row 0)
};

// Varlen offsets come through packed_span, which keeps them inside q and k
// (and lengths within the planned maxima) when they went unchecked.
__device__ __forceinline__ SeqInfo seq_info(const FlashAttnParams& p, int b, int h) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    const PackedSpan qs = packed_span(p.cu_seqlens_q, b, p.total_q, p.seqlen_q);
    // Paged keys: cu_seqlens_k gives only counts, at most a table row's blocks.
    const bool paged = p.block_table != nullptr;
    const int64_t capacity = p.block_table_cols * p.block_size;
    const int64_t max_k = paged && capacity < p.seqlen_k ? capacity : p.seqlen_k;
    const PackedSpan ks = packed_span(p.cu_seqlens_k, b, paged ? INT64_MAX : p.total_k, max_k);
    s.sq = qs.len;
    s.sk = ks.len;
    s.q_off = qs.start;
    s.k_off = paged ? 0 : ks.start;
    s.lse_off = h * p.lse_head_stride + qs.start;
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
    // 32-bit division (the launcher bounds block_size): a 64-bit one is a
    // long subroutine, run here for every 16-byte copy of a tile.
    const int block_size = static_cast<int>(p.block_size), col = j / block_size;
    int64_t block = p.block_table[b * p.block_table_stride + col];
    if (block < 0 || block >= p.num_blocks) block = 0;  // possibly unchecked (graph capture): stay in the cache
    return block * t.batch_stride + (j - col * block_size) * t.row_stride + hk * t.head_stride;
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

// Windows are int64 in the params; any window of 2^30 or more keys already
// covers every sequence a 32-bit index can address, so it is clamped there
// rather than cast (a cast would wrap 2^40 + 5 to 5).
__device__ __forceinline__ int clamp_window(int64_t w) {
  return w < 0 ? -1 : static_cast<int>(w < (int64_t{1} << 30) ? w : (int64_t{1} << 30));
}

__device__ __forceinline__ ScoreRule score_rule(const FlashAttnParams& p, int b, int h, int sq, int sk) {
  ScoreRule r;
  r.scale = p.scale;
  r.scale_log2 = p.scale * kLog2e;
  r.softcap = p.softcap;
  r.slope = p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
  // (A scale <= 0 counts as modified too: the forward keeps plain scores raw
  // and takes their max, which a negative scale would turn around.)
  r.modified = p.softcap > 0.0f || p.alibi_slopes != nullptr || !(r.scale > 0.0f);
  r.diag = sk - sq;
  r.left = clamp_window(p.window_left);
  r.right = clamp_window(p.window_right);
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
    const float t = cuda::tanh_accurate(s / r.softcap);
    s = r.softcap * t;
    if (cap_grad != nullptr) *cap_grad = 1.0f - t * t;
  }
  s -= r.slope * fabsf(static_cast<float>(i + r.diag - j));
  return s * kLog2e;
}

// The backward's softmax probability exp2(score - lse2) of raw dot product
// `raw` (0 when masked); `cap` receives d capped / d uncapped (1 without a
// softcap), for dS = P cap (dP scale - dsum scale). Plain scores fold the
// scale into the exponent's FMA.
__device__ __forceinline__ float probability(const ScoreRule& r, float raw, int i, int j, bool check_mask, float lse2,
                                            float& cap) {
  cap = 1.0f;
  if (!r.modified) return check_mask && !key_visible(r, i, j) ? 0.0f : exp2f(fmaf(raw, r.scale_log2, -lse2));
  return exp2f(score_log2(r, raw, i, j, check_mask, &cap) - lse2);
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
// Copies ROWS rows of one head, row r at first + r * stride, into a padded
// shared tile of D + 8 columns; rows >= valid are zero-filled (their copies
// read nothing, from `any`, a valid address). One multiply-add a copy: the
// general form below recomputes a token's offset (64-bit products, the
// varlen and paged cases) for every 16-byte copy, which SASS showed as about
// a third of the forward kernel's instructions.
template <int ROWS, int D, int THREADS, class T>
__device__ __forceinline__ void load_tile_strided(T* tile, const T* first, int64_t stride, int valid, const T* any) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = D + 8;
  if constexpr (THREADS % kChunks == 0) {
    // Each thread copies one column of chunks, every kStep-th row: a pointer
    // step per copy.
    constexpr int kStep = THREADS / kChunks;
    const int r0 = threadIdx.x / kChunks, col = (threadIdx.x % kChunks) * 8;
    const T* src = first + r0 * stride + col;
#pragma unroll
    for (int i = 0; i < (ROWS + kStep - 1) / kStep; ++i, src += kStep * stride) {
      const int r = r0 + i * kStep;
      if (ROWS % kStep != 0 && r >= ROWS) break;
      const bool ok = r < valid;
      cp_async_16(tile + r * kLd + col, ok ? src : any, ok ? 16 : 0);
    }
  } else {
    for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool ok = r < valid;
      cp_async_16(tile + r * kLd + col, ok ? first + r * stride + col : any, ok ? 16 : 0);
    }
  }
}

// Rows [row0, row0 + ROWS) of one head with row r at offset(r) (keys through
// a block table), as above; rows >= limit are zero-filled.
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
