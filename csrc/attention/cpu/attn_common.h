// Pieces shared by the CPU attention kernels (forward and backward): sequence
// addressing, the mask as a key interval per query, and the two register-tiled
// fp32 matrix products everything else is built from. Include only from
// per-ISA kernel files (after common/cpu/vec.h), like vec.h itself.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/flash_attn.h"
#include "common/cpu/vec.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace attn {

// The fp32 products below run register tiles of kTileRows rows x kTileCols
// vectors. On AVX2 six rows x two vectors (12 accumulators, 15 of the 16
// registers) keep both FMA pipes busy through the 4-cycle FMA latency; four
// rows (8 accumulators) left them idle about a third of the time.
constexpr int kTileRows = kW >= 16 ? 4 : 6;
constexpr int64_t kTileCols = kW >= 16 ? 4 : 2;   // vectors per tile row
constexpr int64_t kTileW = kTileCols * kW;
// Query rows per block: whole tiles (72 = 12 x 6 rows on AVX2; 64 left a
// 4-row tile running at two thirds of the rate) and whole 8 x 8 or 16 x 16
// transposes in the backward.
constexpr int64_t kBq = kTileRows == 6 ? 72 : 64;
constexpr int64_t kBk = 64;                       // keys per block
constexpr int64_t kRows = 4;                      // callers pad row counts to a multiple of this
constexpr float kInf = std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Sequence {
  int64_t q_begin, k_begin;  // first packed token (varlen) or 0
  int64_t sq, sk;
};

inline Sequence sequence(const FlashAttnParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr) return {0, 0, p.seqlen_q, p.seqlen_k};
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  return {q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
}

// Element offset of token `tok` of sequence b (starting at packed token `first`), head h.
template <class Strided>
int64_t token_offset(const Strided& t, const FlashAttnParams& p, int64_t b, int64_t first, int64_t tok, int64_t h) {
  return (p.cu_seqlens_q ? 0 : b * t.batch_stride) + (first + tok) * t.row_stride + h * t.head_stride;
}

// Element offset of key `j` of sequence b, kv head hk, in k or v: through the
// block table for paged caches, else like token_offset.
inline int64_t key_offset(const FlashAttnTensor& t, const FlashAttnParams& p, int64_t b, int64_t first, int64_t j,
                          int64_t hk) {
  if (p.block_table == nullptr) return token_offset(t, p, b, first, j, hk);
  const int64_t block = p.block_table[b * p.block_table_stride + j / p.block_size];
  return block * t.batch_stride + (j % p.block_size) * t.row_stride + hk * t.head_stride;
}

// Rows of keys [first, first + n) of sequence b, kv head hk, in k or v (as
// stored: U is the element type or uint16_t for raw bf16 bits).
template <class U>
std::vector<const U*> key_rows(const FlashAttnTensor& t, const FlashAttnParams& p, int64_t b, const Sequence& s,
                               int64_t hk, int64_t first, int64_t n) {
  std::vector<const U*> rows(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) rows[j] = static_cast<const U*>(t.ptr) + key_offset(t, p, b, s.k_begin, first + j, hk);
  return rows;
}

// Prefetches n rows of `bytes` each into L2, a cache line at a time: the
// rows of one head are a token stride apart (heads * head_dim elements),
// which the hardware prefetchers follow poorly, and widening them to fp32
// waited on each row's lines.
template <class U>
TK_PREFETCH_HELPER void prefetch_rows(const U* const* rows, int64_t n, int64_t bytes) {
#if defined(__AVX2__) || defined(__AVX512F__)
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(rows[j]) + b, _MM_HINT_T1);
#else
  (void)rows, (void)n, (void)bytes;
#endif
}

// The same for n rows `stride` elements apart from `first`.
template <class U>
TK_PREFETCH_HELPER void prefetch_rows(const U* first, int64_t stride, int64_t n, int64_t bytes) {
#if defined(__AVX2__) || defined(__AVX512F__)
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(first + j * stride) + b, _MM_HINT_T1);
#else
  (void)first, (void)stride, (void)n, (void)bytes;
#endif
}

// Index of (b, h, query i) in lse-shaped fp32 arrays.
inline int64_t lse_index(const FlashAttnParams& p, const Sequence& s, int64_t b, int64_t h, int64_t i) {
  return (p.cu_seqlens_q ? s.q_begin + i : b * p.lse_batch_stride + i) + h * p.lse_head_stride;
}

struct KeyRange {
  int64_t lo, hi;  // [lo, hi)
};

// Keys query i may attend to; lo and hi never decrease as i grows.
inline KeyRange key_range(const FlashAttnParams& p, const Sequence& s, int64_t i) {
  const int64_t diag = i + s.sk - s.sq;
  int64_t lo = p.window_left >= 0 ? diag - p.window_left : 0;
  int64_t hi = p.window_right >= 0 ? diag + p.window_right + 1 : s.sk;
  lo = std::clamp<int64_t>(lo, 0, s.sk);
  hi = std::clamp<int64_t>(hi, lo, s.sk);
  return {lo, hi};
}

// The columns [lo, hi) of a kBk block starting at key j0 (n real keys) that query i sees.
inline KeyRange visible(const FlashAttnParams& p, const Sequence& s, int64_t i, int64_t j0, int64_t n) {
  const KeyRange kr = key_range(p, s, i);
  const int64_t lo = std::clamp<int64_t>(kr.lo - j0, 0, n);
  return {lo, std::clamp<int64_t>(kr.hi - j0, lo, n)};
}

inline void fill_outside(KeyRange keep, float* row, float value) {
  for (int64_t c = 0; c < keep.lo; ++c) row[c] = value;
  for (int64_t c = keep.hi; c < kBk; ++c) row[c] = value;
}

// Scores of one row in place: softcap (returning tanh in `tanh_out` when
// given, for the backward), then ALiBi, then -inf outside the visible keys.
inline void shape_scores(const FlashAttnParams& p, const Sequence& s, int64_t i, int64_t j0, int64_t n, float slope,
                         float* row, float* tanh_out = nullptr) {
  if (p.softcap > 0.0f) {  // softcap * tanh(x / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1)
    const Vec inv = vset1(2.0f / p.softcap), cap = vset1(p.softcap), one = vset1(1.0f), two = vset1(2.0f);
    for (int64_t c = 0; c < kBk; c += kW) {
      const Vec t = one - two * vrecip(vexp(vload(row + c) * inv) + one);
      if (tanh_out) vstore(tanh_out + c, t);
      vstore(row + c, cap * t);
    }
  }
  if (slope != 0.0f) {
    const Vec diag = vset1(static_cast<float>(i + s.sk - s.sq - j0)), neg_slope = vset1(-slope);
    for (int64_t c = 0; c < kBk; c += kW) {
      const Vec dist = vabs(diag - (viota() + vset1(static_cast<float>(c))));
      vstore(row + c, vfma(neg_slope, dist, vload(row + c)));
    }
  }
  fill_outside(visible(p, s, i, j0, n), row, -kInf);
}

// One tile of gemm_nt / gemm_acc: C[R x kTileW] (+)= A[R x depth] * B[depth x
// kTileW], B's rows ldb apart, A's lda apart. The register loops are
// unrolled by pragma: left as loops, GCC kept the accumulators' first and
// last values on the stack, 32 extra stores and loads a tile (fp32 forward
// 2-4% slower on AVX-512, 2% on AVX2).
// NC (at most kTileCols) vectors of columns: fewer where a causal diagonal
// block leaves some of a tile's columns unseen by all of its rows.
template <int R, bool kAccumulate, int NC = kTileCols>
inline void gemm_tile(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t depth) {
  Vec acc[R][NC];
#pragma GCC unroll 8
  for (int rr = 0; rr < R; ++rr)
#pragma GCC unroll 4
    for (int t = 0; t < NC; ++t) acc[rr][t] = kAccumulate ? vload(C + rr * ldc + t * kW) : vzero();
  for (int64_t d = 0; d < depth; ++d) {
    Vec b[NC];
#pragma GCC unroll 4
    for (int t = 0; t < NC; ++t) b[t] = vload(B + d * ldb + t * kW);
#pragma GCC unroll 8
    for (int rr = 0; rr < R; ++rr) {
      const Vec a = vset1(A[rr * lda + d]);
#pragma GCC unroll 4
      for (int t = 0; t < NC; ++t) acc[rr][t] = vfma(a, b[t], acc[rr][t]);
    }
  }
#pragma GCC unroll 8
  for (int rr = 0; rr < R; ++rr)
#pragma GCC unroll 4
    for (int t = 0; t < NC; ++t) vstore(C + rr * ldc + t * kW, acc[rr][t]);
}

// Calls f(std::integral_constant<int, n>) for n in [1, kTileCols].
static_assert(kTileCols == 2 || kTileCols == 4, "tiles of 2 or 4 column vectors");
template <class F>
inline void with_column_vectors(int64_t n, F&& f) {
  if (n <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if constexpr (kTileCols == 2) {
    f(std::integral_constant<int, 2>{});
  } else if (n == 2) {
    f(std::integral_constant<int, 2>{});
  } else if (n == 3) {
    f(std::integral_constant<int, 3>{});
  } else {
    f(std::integral_constant<int, 4>{});
  }
}

// Column vectors [first, last) of the kTileW-wide tile at column c0 that
// meet the columns [lo, hi) some row of a register tile needs.
struct VectorSpan {
  int64_t first, last;
};
inline VectorSpan needed_vectors(int64_t c0, int64_t lo, int64_t hi) {
  return {std::max<int64_t>(0, (lo - c0) / kW), std::min<int64_t>(kTileCols, (hi - c0 + kW - 1) / kW)};
}

// Rows [0, rows) of a product (callers pad them to kRows), in tiles of
// kTileRows rows, the last one of 4 or 2 rows when rows is not a multiple of
// kTileRows; `tile(R-tag, r)` runs the R rows from r.
template <class Tile>
inline void for_row_tiles(int64_t rows, Tile&& tile) {
  int64_t r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) tile(std::integral_constant<int, kTileRows>{}, r);
  if (r + 4 <= rows) tile(std::integral_constant<int, 4>{}, r), r += 4;
  if (r + 2 <= rows) tile(std::integral_constant<int, 2>{}, r), r += 2;
}

// C[r][c] = sum_{d < depth} A[r][d] * BT[d][c] for r < rows (a multiple of
// kRows) and c < cols (a multiple of kTileW). BT is B transposed, so each step
// broadcasts one A element against contiguous vectors of B. Columns
// [c0, c0 + kTileW) of BT start at BT + c0 / kTileW * panel, rows ldb apart:
// panel = kTileW for a plain row-major BT, or depth * kTileW for BT packed in
// column panels, which a tile then reads front to back (a plain BT with a
// long power-of-two row maps every row of a tile to one L1 set).
//
// `seen` (optional, one per row, lo and hi never decreasing down the rows):
// the columns each row needs. Vectors of columns no row of a register tile
// needs are skipped and left as they were (a causal diagonal block skips
// about half of them); the caller overwrites those columns.
//
// Both products walk column tiles outside and row tiles inside, so the
// kTileW-wide slice of B a tile streams (8 KiB of K^T, 4 KiB of V on AVX2)
// stays in L1 for every row tile; a whole key block of B is 32 KiB, all of
// L1, and row tiles outside made it come back from L2 (+3-6% fp32 forward).
inline void gemm_nt(const float* A, int64_t lda, const float* BT, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                    int64_t depth, int64_t cols, int64_t panel = kTileW, const KeyRange* seen = nullptr) {
  for (int64_t c0 = 0; c0 < cols; c0 += kTileW)
    for_row_tiles(rows, [&](auto R, int64_t r) {
      const int64_t lo = seen ? seen[r].lo : 0, hi = seen ? seen[r + R() - 1].hi : cols;
      const VectorSpan v = needed_vectors(c0, lo, hi);
      if (v.first >= v.last) return;
      with_column_vectors(v.last - v.first, [&](auto NC) {
        gemm_tile<R(), false, NC()>(A + r * lda, lda, BT + c0 / kTileW * panel + v.first * kW, ldb,
                                    C + r * ldc + c0 + v.first * kW, ldc, depth);
      });
    });
}

// C[r][x] += sum_{c < depth} A[r][c] * B[c][x] for r < rows (a multiple of
// kRows) and x < width (a multiple of kTileW). With `seen` (as in gemm_nt),
// a register tile sums only over the c some row of it needs: A must be zero
// outside each row's range.
inline void gemm_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t rows,
                     int64_t depth, int64_t width, const KeyRange* seen = nullptr) {
  for (int64_t x0 = 0; x0 < width; x0 += kTileW)
    for_row_tiles(rows, [&](auto R, int64_t r) {
      const int64_t lo = seen ? seen[r].lo : 0, hi = seen ? std::min(seen[r + R() - 1].hi, depth) : depth;
      if (lo >= hi) return;
      gemm_tile<R(), true>(A + r * lda + lo, lda, B + lo * ldb + x0, ldb, C + r * ldc + x0, ldc, hi - lo);
    });
}

#if defined(__AVX512BF16__)
// bf16 inputs on AVX512_BF16: vdpbf16ps does 32 multiply-adds per instruction,
// twice the fp32 FMA rate (measured on Zen 4). Operands are pair-interleaved
// along the reduction dimension: lane i of a vector holds elements (2p, 2p+1)
// of reduction pair p for output column i, as 32 bits.
constexpr bool kBf16Dot = true;

inline __m512 dot_bf16(__m512 acc, uint32_t a_pair, const uint16_t* b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a_pair))),
                          reinterpret_cast<__m512bh>(_mm512_loadu_si512(b)));
}

// kRows rows x NC vectors of gemm_nt_bf16, B2 and C at the tile's first column.
template <int NC>
inline void gemm_nt_bf16_tile(const uint16_t* A, int64_t lda, const uint16_t* B2, int64_t ldb, float* C, int64_t ldc,
                              int64_t pairs, Vec vs) {
  __m512 acc[kRows][NC];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* b = B2 + p * ldb * 2;
    for (int64_t rr = 0; rr < kRows; ++rr) {
      uint32_t a_pair;
      std::memcpy(&a_pair, A + rr * lda + 2 * p, 4);
      for (int t = 0; t < NC; ++t) acc[rr][t] = dot_bf16(acc[rr][t], a_pair, b + t * 2 * kW);
    }
  }
  for (int64_t rr = 0; rr < kRows; ++rr)
    for (int t = 0; t < NC; ++t) vstore(C + rr * ldc + t * kW, Vec{acc[rr][t]} * vs);
}

// C[r][c] = scale * sum_p A[r][pair p] . B2[p][c] for r < rows (multiple of
// kRows), c < cols (multiple of kTileW); A rows are bf16 (lda elements, even),
// B2 is (pairs x ldb x 2) bf16. `seen` as in gemm_nt.
inline void gemm_nt_bf16(const uint16_t* A, int64_t lda, const uint16_t* B2, int64_t ldb, float* C, int64_t ldc,
                         int64_t rows, int64_t pairs, int64_t cols, float scale, const KeyRange* seen = nullptr) {
  const Vec vs = vset1(scale);
  for (int64_t r = 0; r < rows; r += kRows) {
    const int64_t lo = seen ? seen[r].lo : 0, hi = seen ? seen[r + kRows - 1].hi : cols;
    for (int64_t c0 = 0; c0 < cols; c0 += kTileW) {
      const VectorSpan v = needed_vectors(c0, lo, hi);
      if (v.first >= v.last) continue;
      const int64_t c = c0 + v.first * kW;
      with_column_vectors(v.last - v.first, [&](auto NC) {
        gemm_nt_bf16_tile<NC()>(A + r * lda, lda, B2 + c * 2, ldb, C + r * ldc + c, ldc, pairs, vs);
      });
    }
  }
}

// C[r][x] += sum_p A[r][pair p] . B2[p][x] for x < width (multiple of kTileW).
// With `seen` (as in gemm_nt, over A's columns), a group of kRows rows sums
// only over the pairs some row of it needs: A must be zero outside each
// row's range.
inline void gemm_acc_bf16(const uint16_t* A, int64_t lda, const uint16_t* B2, int64_t ldb, float* C, int64_t ldc,
                          int64_t rows, int64_t pairs, int64_t width, const KeyRange* seen = nullptr) {
  for (int64_t r = 0; r < rows; r += kRows) {
    const int64_t p0 = seen ? seen[r].lo / 2 : 0;
    const int64_t p1 = seen ? std::min(pairs, (seen[r + kRows - 1].hi + 1) / 2) : pairs;
    if (p0 >= p1) continue;
    for (int64_t x0 = 0; x0 < width; x0 += kTileW) {
      __m512 acc[kRows][kTileCols];
      for (int64_t rr = 0; rr < kRows; ++rr)
        for (int64_t t = 0; t < kTileCols; ++t) acc[rr][t] = _mm512_loadu_ps(C + (r + rr) * ldc + x0 + t * kW);
      for (int64_t p = p0; p < p1; ++p) {
        const uint16_t* b = B2 + (p * ldb + x0) * 2;
        for (int64_t rr = 0; rr < kRows; ++rr) {
          uint32_t a_pair;
          std::memcpy(&a_pair, A + (r + rr) * lda + 2 * p, 4);
          for (int64_t t = 0; t < kTileCols; ++t) acc[rr][t] = dot_bf16(acc[rr][t], a_pair, b + t * 2 * kW);
        }
      }
      for (int64_t rr = 0; rr < kRows; ++rr)
        for (int64_t t = 0; t < kTileCols; ++t) _mm512_storeu_ps(C + (r + rr) * ldc + x0 + t * kW, acc[rr][t]);
    }
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

// Widens n elements to fp32, times `scale`.
template <class T>
void widen(const T* src, float* dst, int64_t n, float scale = 1.0f) {
  const Vec vs = vset1(scale);
  int64_t d = 0;
  for (; d + kW <= n; d += kW) vstore(dst + d, vload(src + d) * vs);
  if (d < n) vstore_partial(dst + d, vload_partial(src + d, n - d) * vs, n - d);
}

// Rounds n fp32 values to T, times `scale`.
template <class T>
void narrow(const float* src, T* dst, int64_t n, float scale = 1.0f) {
  const Vec vs = vset1(scale);
  int64_t d = 0;
  for (; d + kW <= n; d += kW) vstore(dst + d, vload(src + d) * vs);
  if (d < n) vstore_partial(dst + d, vload_partial(src + d, n - d) * vs, n - d);
}

// flash_attn_decode.cpp: runs the forward in the paged decode kernel when
// the shapes and layouts allow (few queries per sequence); false: run the
// general kernel.
bool forward_in_decode_kernel(const FlashAttnParams& p);

}  // namespace attn
}  // namespace TK_CPU_NS
}  // namespace torchkiln
