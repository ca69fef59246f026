// Paged decode attention on CUDA, Flash-Decoding style: one block per
// (sequence, kv head, <= 8 query vectors of its group, chunk of the context),
// a query vector being one (query row, query head) of the kv head's group:
// one row per sequence for decode, a few for speculative decoding, each row
// with its own causal limit and window. The K/V of a chunk are read once for
// all the block's vectors:
//   1. scores: one thread per key, the whole key row in 16-byte loads (four
//      in flight), dot products against q held in shared memory (all lanes
//      read the same q element at once: a broadcast, no bank conflicts);
//   2. softmax of the chunk: one warp per head;
//   3. P V: D/8 threads cover a value row with 16-byte loads (coalesced),
//      each thread four rows at a time, partial sums reduced in shared memory.
// With one chunk the block writes the output; otherwise it writes a
// normalised fp32 partial and its lse, and a combine kernel merges them.
// flash_attn's CUDA forward runs few-query batches here too: keys in place
// (a fixed batch, or packed by cu_seqlens) or through its block table.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/cuda/cuda_helpers.cuh"
#include "common/cuda/packed_span.cuh"
#include "paged/paged_attention.h"

namespace torchkiln {
namespace {

using cuda::from_float;
using cuda::load8;
using cuda::packed_span;
using cuda::PackedSpan;
using cuda::to_float;

constexpr int kThreads = 128;
constexpr int kMaxChunk = 512;       // keys per block at most
constexpr int kHeadsPerBlock = 8;    // query vectors (row, head) sharing one K/V pass
constexpr int kMaxHeadDim = 256;
constexpr int kWork = 8192;          // floats: scores (8 x 512) or P V partials (8 x <= 1024)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Sequence s's query rows (tokens of q, out and lse): the first and how
// many; and its keys: where key 0 of head 0 is when they lie in place, and
// how many. Possibly unchecked (graph capture): packed offsets come through
// packed_span, and a sequence never reaches past its table row or the
// planned longest one (max_rows, max_seq_len).
__device__ __forceinline__ PackedSpan query_rows(const PagedAttnParams& p, int s) {
  if (p.q_start == nullptr) return {0, static_cast<int>(p.max_rows)};
  return packed_span(p.q_start, s, p.q_tokens, p.max_rows);
}
__device__ __forceinline__ PackedSpan keys(const PagedAttnParams& p, int s) {
  int64_t max_len = p.max_seq_len;
  if (p.block_table != nullptr && p.max_blocks * p.cache.block_size < max_len)
    max_len = p.max_blocks * p.cache.block_size;
  if (p.seq_lens == nullptr && p.k_start != nullptr)  // paged: k_start gives only counts
    return packed_span(p.k_start, s, p.block_table != nullptr ? INT64_MAX : p.k_tokens, max_len);
  const int64_t len = p.seq_lens != nullptr ? p.seq_lens[s] : p.max_seq_len;
  return {0, static_cast<int>(len < 0 ? 0 : (len < max_len ? len : max_len))};
}

// Element offset of key j, kv head hk; base: where key 0 of head 0 lies in
// place (s * kv_seq_stride + its first packed key), unused when paged.
__device__ __forceinline__ int64_t cache_row(const PagedAttnParams& p, int64_t base, int s, int j, int hk) {
  if (p.block_table == nullptr) return base + j * p.cache.pos_stride + hk * p.cache.head_stride;
  // 32-bit division (the launcher bounds block_size): a 64-bit one is a
  // long subroutine, and the value pass runs it for every 16-byte load.
  const int block_size = static_cast<int>(p.cache.block_size), col = j / block_size;
  int64_t block = p.block_table[s * p.block_table_stride + col];
  if (block < 0 || block >= p.cache.num_blocks) block = 0;  // possibly unchecked (graph capture): stay in the cache
  return block * p.cache.block_stride + (j - col * block_size) * p.cache.pos_stride + hk * p.cache.head_stride;
}

__device__ __forceinline__ int64_t out_index(const PagedAttnParams& p, int s, int64_t row, int h) {
  return s * p.out_seq_stride + row * p.out_row_stride + h * p.out_head_stride;
}
__device__ __forceinline__ int64_t lse_index(const PagedAttnParams& p, int s, int64_t row, int h) {
  return s * p.lse_seq_stride + row * p.lse_row_stride + h * p.lse_head_stride;
}

// The keys query row r of `rows` sees among `len`: it sits at position
// len - rows + r (flash_attn's bottom-right alignment), keys right of it
// only within the right window, left of it within the left window (windows
// beyond 32 bits hide nothing).
struct KeyRange {
  int first, last;  // inclusive; empty when first > last
};
__device__ __forceinline__ KeyRange key_range(const PagedAttnParams& p, int len, int rows, int r) {
  const int64_t pos = len - rows + r;
  KeyRange k{0, len - 1};
  if (p.window_left >= 0 && p.window_left < pos) k.first = static_cast<int>(pos - p.window_left);
  if (p.window_right >= 0 && p.window_right < len - 1 - pos) k.last = static_cast<int>(pos + p.window_right);
  return k;
}

constexpr int kLoadsInFlight = 4;      // 16-byte loads of one key row a thread issues at once
constexpr int kValueRowsInFlight = 4;  // value rows (16 bytes each) a thread loads at once

// acc[hh] += q[hh][d0 .. d0 + 7] . kv for the block's nh query vectors.
__device__ __forceinline__ void accumulate_scores(const float (*sQ)[kMaxHeadDim], int d0, const float (&kv)[8],
                                                  int nh, float (&acc)[kHeadsPerBlock]) {
#pragma unroll
  for (int hh = 0; hh < kHeadsPerBlock; ++hh)
    if (hh < nh)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[hh] += sQ[hh][d0 + e] * kv[e];
}

// acc[hh] += p[hh][jj] * v for the block's nh query vectors (probabilities in sWork).
__device__ __forceinline__ void accumulate_values(const float* sWork, int jj, const float (&v)[8], int nh,
                                                  float (&acc)[kHeadsPerBlock][8]) {
#pragma unroll
  for (int hh = 0; hh < kHeadsPerBlock; ++hh) {
    if (hh >= nh) break;
    const float pr = sWork[hh * kMaxChunk + jj];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[hh][e] += pr * v[e];
  }
}

// Shared memory: q (8 x 256), the work buffer, per-vector max and sum, key
// range and position.
constexpr size_t kDecodeSmemBytes =
    (kHeadsPerBlock * kMaxHeadDim + kWork + 2 * kHeadsPerBlock) * sizeof(float) + 3 * kHeadsPerBlock * sizeof(int);

// Four blocks per SM (shared memory would allow five): with several loads in
// flight per thread ptxas needs more than the 102 registers five would leave.
template <class T>
__global__ void __launch_bounds__(kThreads, 4) paged_decode_kernel(const PagedAttnParams p, int group_blocks) {
  TK_DYNAMIC_SMEM(smem);
  float(*sQ)[kMaxHeadDim] = reinterpret_cast<float(*)[kMaxHeadDim]>(smem);
  float* sWork = reinterpret_cast<float*>(smem) + kHeadsPerBlock * kMaxHeadDim;
  float* sMax = sWork + kWork;
  float* sSum = sMax + kHeadsPerBlock;
  int* sFirst = reinterpret_cast<int*>(sSum + kHeadsPerBlock);  // per vector: its keys, its position
  int* sLast = sFirst + kHeadsPerBlock;
  int* sPos = sLast + kHeadsPerBlock;

  const int s = blockIdx.x, split = blockIdx.z;
  const int hk = blockIdx.y / group_blocks, gb = blockIdx.y % group_blocks;
  const int group = static_cast<int>(p.heads / p.cache.heads_k);
  const PackedSpan q_rows = query_rows(p, s);
  const int rows = q_rows.len;
  // Vectors v0 .. v0 + nh - 1: vector v is row v / group, head hk * group + v % group.
  const int v0 = gb * kHeadsPerBlock;
  const int nh = min(kHeadsPerBlock, rows * group - v0);
  const int D = static_cast<int>(p.cache.head_dim);
  if (nh <= 0) return;  // the whole block: s and gb are uniform
  const PackedSpan k_span = keys(p, s);
  const int len = k_span.len;
  const int64_t base = s * p.kv_seq_stride + k_span.start * p.cache.pos_stride;
  const int chunk = static_cast<int>(p.split_chunk);
  if (threadIdx.x < nh) {
    const int r = (v0 + threadIdx.x) / group;
    const KeyRange k = key_range(p, len, rows, r);
    sFirst[threadIdx.x] = k.first;
    sLast[threadIdx.x] = k.last;
    sPos[threadIdx.x] = len - rows + r;
  }
  // Keys of this chunk some vector sees: rows grow with v, and so do both ends.
  const KeyRange lo = key_range(p, len, rows, v0 / group), hi = key_range(p, len, rows, (v0 + nh - 1) / group);
  const int begin = max(split * chunk, lo.first);
  const int end = min(split * chunk + chunk, hi.last + 1);
  const int n = max(0, end - begin);

  const T* q = static_cast<const T*>(p.q);
  for (int idx = threadIdx.x; idx < nh * D; idx += kThreads) {
    const int hh = idx / D, d = idx % D, v = v0 + hh;
    const int64_t row = q_rows.start + v / group, h = hk * group + v % group;
    sQ[hh][d] = to_float(q[s * p.q_seq_stride + row * p.q_row_stride + h * p.q_head_stride + d]);
  }
  __syncthreads();

  // 1. Scores (base 2), sWork[hh * kMaxChunk + jj].
  const T* kc = static_cast<const T*>(p.key_cache);
  for (int jj = threadIdx.x; jj < n; jj += kThreads) {
    const int j = begin + jj;
    const T* krow = kc + cache_row(p, base, s, j, hk);
    float acc[kHeadsPerBlock] = {};
    // kLoadsInFlight loads issued before their products: a memory-bound
    // loop with one 16-byte load in flight per thread would be latency-bound.
    int d0 = 0;
    for (; d0 + 8 * kLoadsInFlight <= D; d0 += 8 * kLoadsInFlight) {
      float kv[kLoadsInFlight][8];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) load8(krow + d0 + 8 * u, kv[u]);
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) accumulate_scores(sQ, d0 + 8 * u, kv[u], nh, acc);
    }
    for (; d0 < D; d0 += 8) {
      float kv[8];
      load8(krow + d0, kv);
      accumulate_scores(sQ, d0, kv, nh, acc);
    }
#pragma unroll
    for (int hh = 0; hh < kHeadsPerBlock; ++hh) {
      if (hh >= nh) break;
      float sc = acc[hh] * p.scale;
      if (p.softcap > 0.0f) sc = p.softcap * cuda::tanh_accurate(sc / p.softcap);
      if (p.alibi_slopes != nullptr) {
        const int h = hk * group + (v0 + hh) % group;
        sc -= p.alibi_slopes[s * p.alibi_seq_stride + h] * fabsf(static_cast<float>(sPos[hh] - j));
      }
      sWork[hh * kMaxChunk + jj] = j < sFirst[hh] || j > sLast[hh] ? -INFINITY : sc * kLog2e;
    }
  }
  __syncthreads();

  // 2. Softmax of the chunk, one warp per head.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int hh = warp; hh < nh; hh += kThreads / 32) {
    float* row = sWork + hh * kMaxChunk;
    float m = -INFINITY;
    for (int jj = lane; jj < n; jj += 32) m = fmaxf(m, row[jj]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.0f;
    for (int jj = lane; jj < n; jj += 32) {
      const float e = m == -INFINITY ? 0.0f : exp2f(row[jj] - m);  // every key of the chunk masked
      row[jj] = e;
      l += e;
    }
    l = cuda::warp_sum(l);
    if (lane == 0) {
      sMax[hh] = m;
      sSum[hh] = l;
    }
  }
  __syncthreads();

  // 3. P V: thread (row group kg, column chunk c) sums rows kg, kg + groups, ...
  const int lanes_per_row = D / 8, groups = kThreads / lanes_per_row;
  const int kg = threadIdx.x / lanes_per_row, c = threadIdx.x % lanes_per_row;
  float acc[kHeadsPerBlock][8] = {};
  const T* vc = static_cast<const T*>(p.value_cache);
  if (kg < groups) {
    // kValueRowsInFlight rows' loads issued before their products, as in
    // the score pass (addresses first: a load's conversion would wait).
    int jj = kg;
    for (; jj + (kValueRowsInFlight - 1) * groups < n; jj += kValueRowsInFlight * groups) {
      int64_t rows[kValueRowsInFlight];
#pragma unroll
      for (int u = 0; u < kValueRowsInFlight; ++u) rows[u] = cache_row(p, base, s, begin + jj + u * groups, hk);
      float v8[kValueRowsInFlight][8];
#pragma unroll
      for (int u = 0; u < kValueRowsInFlight; ++u) load8(vc + rows[u] + c * 8, v8[u]);
#pragma unroll
      for (int u = 0; u < kValueRowsInFlight; ++u) accumulate_values(sWork, jj + u * groups, v8[u], nh, acc);
    }
    for (; jj < n; jj += groups) {
      float v8[8];
      load8(vc + cache_row(p, base, s, begin + jj, hk) + c * 8, v8);
      accumulate_values(sWork, jj, v8, nh, acc);
    }
  }
  __syncthreads();  // probabilities read by everyone: the buffer now takes the partial sums
  if (kg < groups)
#pragma unroll
    for (int hh = 0; hh < kHeadsPerBlock; ++hh) {
      if (hh >= nh) break;
#pragma unroll
      for (int e = 0; e < 8; ++e) sWork[(kg * kHeadsPerBlock + hh) * D + c * 8 + e] = acc[hh][e];
    }
  __syncthreads();

  for (int idx = threadIdx.x; idx < nh * D; idx += kThreads) {
    const int hh = idx / D, d = idx % D, v = v0 + hh;
    const int r = v / group, h = hk * group + v % group;
    const int64_t row = q_rows.start + r;
    float o = 0.0f;
    for (int g = 0; g < groups; ++g) o += sWork[(g * kHeadsPerBlock + hh) * D + d];
    const float l = sSum[hh], m = sMax[hh];
    o = l > 0.0f ? o / l : 0.0f;
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[out_index(p, s, row, h) + d] = from_float<T>(o);
      if (d == 0) p.lse[lse_index(p, s, row, h)] = l > 0.0f ? (m + log2f(l)) * kLn2 : INFINITY;
    } else {
      const int64_t part = ((s * p.max_rows + r) * p.heads + h) * p.num_splits + split;
      p.partial_out[part * D + d] = o;
      if (d == 0) p.partial_lse[part] = l > 0.0f ? (m + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

// Merges the chunks of one (sequence, row, head): weights exp(lse_c - lse).
template <class T>
__global__ void paged_combine_kernel(const PagedAttnParams p) {
  const int s = blockIdx.x, r = blockIdx.y / static_cast<int>(p.heads), h = blockIdx.y % static_cast<int>(p.heads);
  const PackedSpan q_rows = query_rows(p, s);
  if (r >= q_rows.len) return;
  const int64_t row = q_rows.start + r, base = ((s * p.max_rows + r) * p.heads + h) * p.num_splits;
  const int D = static_cast<int>(p.cache.head_dim);
  float m = -INFINITY;
  for (int c = 0; c < p.num_splits; ++c) m = fmaxf(m, p.partial_lse[base + c]);
  float lse = INFINITY;  // no key at all: zeros and +inf, as on CPU
  if (m != -INFINITY) {
    float sum = 0.0f;
    for (int c = 0; c < p.num_splits; ++c) sum += __expf(p.partial_lse[base + c] - m);
    lse = m + __logf(sum);
  }
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    if (m != -INFINITY)
      for (int c = 0; c < p.num_splits; ++c)
        o += __expf(p.partial_lse[base + c] - lse) * p.partial_out[(base + c) * D + d];
    static_cast<T*>(p.out)[out_index(p, s, row, h) + d] = from_float<T>(o);
  }
  if (threadIdx.x == 0) p.lse[lse_index(p, s, row, h)] = lse;
}

int group_blocks(const PagedAttnParams& p) {
  const int64_t vectors = p.max_rows * (p.heads / p.cache.heads_k);
  return static_cast<int>((vectors + kHeadsPerBlock - 1) / kHeadsPerBlock);
}

}  // namespace

void paged_attention_cuda_plan(PagedAttnParams& p) {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  // Long chunks amortise the combine; shorter ones when there are too few
  // blocks to fill the GPU twice over (few sequences, long contexts).
  const int64_t base_blocks = p.num_seqs * p.cache.heads_k * group_blocks(p);
  int64_t chunk = kMaxChunk;
  while (chunk > 64 && base_blocks * ((p.max_seq_len + chunk - 1) / chunk) < 2 * sms) chunk /= 2;
  p.split_chunk = chunk;
  // At least one split: with no keys anywhere (every length 0) each query
  // still gets its output (zeros, lse +inf).
  p.num_splits = std::max<int64_t>(1, (p.max_seq_len + chunk - 1) / chunk);
}

void paged_attention_cuda(const PagedAttnParams& p, CUstream_st* stream) {
  if (p.cache.head_dim % 8 != 0 || p.cache.head_dim > kMaxHeadDim || p.split_chunk <= 0 ||
      p.split_chunk > kMaxChunk || (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)))
    throw std::invalid_argument("torchkiln: paged_attention_cuda called without a valid plan");
  if (p.max_rows < 1 || p.max_rows > kMaxDecodeRowsCuda ||
      (p.block_table != nullptr && (p.cache.block_size <= 0 || p.cache.block_size > INT32_MAX)))
    throw std::invalid_argument("torchkiln: paged_attention_cuda takes 1 to " + std::to_string(kMaxDecodeRowsCuda) +
                                " query rows per sequence (and a block size with a block table)");
  if (p.num_splits > 65535 || p.num_seqs > 2147483647)
    throw std::invalid_argument("torchkiln: paged_attention context too long for the CUDA grid");
  const dim3 grid(static_cast<unsigned>(p.num_seqs), static_cast<unsigned>(p.cache.heads_k * group_blocks(p)),
                  static_cast<unsigned>(p.num_splits));
  cuda::dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    TK_KERNEL_LAUNCH(grid, kThreads, kDecodeSmemBytes, stream, paged_decode_kernel<T>)(p, group_blocks(p));  // < 48 KiB
    cuda::check_launch("paged_decode_kernel");
    if (p.num_splits > 1) {
      const dim3 combine_grid(static_cast<unsigned>(p.num_seqs), static_cast<unsigned>(p.max_rows * p.heads));
      TK_KERNEL_LAUNCH(combine_grid, 128, 0, stream, paged_combine_kernel<T>)(p);
      cuda::check_launch("paged_combine_kernel");
    }
  });
}

}  // namespace torchkiln
