// Operand layouts for the CPU kernels' matrix products (compiled once per
// ISA, like vec.h): rows turned into columns, or pairs of rows / columns
// interleaved as vdpbf16ps reads them.
//
// The transposes go 16 x 16 (AVX-512) or 8 x 8 (AVX2) at a time through
// registers instead of one scalar copy per element; for a few query rows the
// scalar copies of the keys cost more than the attention itself, and in the
// attention backward they were 10-15% of a training step.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/cpu/vec.h"

namespace torchkiln {
namespace TK_CPU_NS {

#if defined(__AVX512F__)
// In-register transpose of a 16 x 16 tile of 32-bit values:
// r[i] lane j <-> r[j] lane i. Four stages, each swapping one bit of the
// row index with the same bit of the lane index between rows i and i + s
// (s = 8, 4, 2, 1). The loops are plain counted loops, fully unrolled, so r
// stays in registers.
inline void transpose16(__m512* r) {
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    const __m512 a = r[i], b = r[i + 8];
    r[i] = _mm512_shuffle_f32x4(a, b, 0x44);
    r[i + 8] = _mm512_shuffle_f32x4(a, b, 0xEE);
  }
  const __m512i lo4 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
  const __m512i hi4 = _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    const int i = k / 4 * 8 + k % 4;  // 0..3, 8..11
    const __m512 a = r[i], b = r[i + 4];
    r[i] = _mm512_permutex2var_ps(a, lo4, b);
    r[i + 4] = _mm512_permutex2var_ps(a, hi4, b);
  }
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k) {
    const int i = k / 2 * 4 + k % 2;  // 0, 1, 4, 5, ...
    const __m512 a = r[i], b = r[i + 2];
    r[i] = _mm512_shuffle_ps(a, b, 0x44);
    r[i + 2] = _mm512_shuffle_ps(a, b, 0xEE);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    const __m512 a = r[i], b = r[i + 1];
    r[i] = _mm512_mask_moveldup_ps(a, 0xAAAA, b);      // a0 b0 a2 b2 ...
    r[i + 1] = _mm512_mask_movehdup_ps(b, 0x5555, a);  // a1 b1 a3 b3 ...
  }
}
#elif defined(__AVX2__)
// In-register transpose of an 8 x 8 tile of fp32: r[i] lane j <-> r[j] lane i.
inline void transpose8(__m256* r) {
  __m256 t[8];
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs: a0 b0 a1 b1 | a4 b4 a5 b5
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // pairs of pairs: a0 b0 c0 d0 | a4 b4 c4 d4
    const int i = k / 2 * 4 + k % 2;
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 2] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 128-bit halves of rows i and i + 4
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  // t holds columns 0, 2, 1, 3, 4, 6, 5, 7: the order the shuffles left them.
  r[0] = t[0], r[1] = t[2], r[2] = t[1], r[3] = t[3];
  r[4] = t[4], r[5] = t[6], r[6] = t[5], r[7] = t[7];
}
#endif

#if defined(__AVX512F__)
constexpr int kTransposeW = 16;
inline void transpose_lanes(__m512* r) { transpose16(r); }
#elif defined(__AVX2__)
constexpr int kTransposeW = 8;
inline void transpose_lanes(__m256* r) { transpose8(r); }
#endif

// dst[c * ld + j] = rows[j][c] widened to fp32, for j < n and c < cols;
// columns [n, round_up(n, vector width)) of dst get zeros (ld must cover them).
template <class T>
void transpose_rows(const T* const* rows, int64_t n, int64_t cols, float* dst, int64_t ld) {
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int L = kTransposeW;
  for (int64_t j0 = 0; j0 < n; j0 += L) {
    const int64_t nj = std::min<int64_t>(L, n - j0);
    for (int64_t c0 = 0; c0 < cols; c0 += L) {
      const int64_t w = std::min<int64_t>(L, cols - c0);
      decltype(Vec::v) r[L];
#pragma GCC unroll 16
      for (int jj = 0; jj < L; ++jj)
        r[jj] = jj >= nj ? vzero().v : (w == L ? vload(rows[j0 + jj] + c0) : vload_partial(rows[j0 + jj] + c0, w)).v;
      transpose_lanes(r);
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i)  // a bound of w here would put r on the stack
        if (i < w) vstore(dst + (c0 + i) * ld + j0, Vec{r[i]});
    }
  }
#else
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t j = 0; j < n; ++j) dst[c * ld + j] = to_float(rows[j][c]);
#endif
}

// (rows x cols) -> (cols x rows) fp32, both multiples of the vector width
// on AVX-512 and AVX2.
inline void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr int L = kTransposeW;
  for (int64_t r0 = 0; r0 < rows; r0 += L)
    for (int64_t c0 = 0; c0 < cols; c0 += L) {
      decltype(Vec::v) r[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) r[i] = vload(src + (r0 + i) * lds + c0).v;
      transpose_lanes(r);
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) vstore(dst + (c0 + i) * ldd + r0, Vec{r[i]});
    }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
#endif
}

#if defined(__AVX512BF16__)
// Column pairs transposed (the operand layout of vdpbf16ps products that
// sum over columns, e.g. attention's scores): 32-bit word
// (i, j) of dst (pairs x ld words) holds columns 2i and 2i + 1 of rows[j],
// for j < n; a pair is one 32-bit word, so 16 rows x 16 pairs transpose in
// registers. An odd last column is paired with 0; columns [n, round_up(n,
// 16)) of dst get zeros.
inline void transpose_column_pairs(const uint16_t* const* rows, int64_t n, int64_t cols, uint16_t* dst, int64_t ld) {
  const int64_t full_pairs = cols / 2;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j0);
    for (int64_t i0 = 0; i0 < full_pairs; i0 += 16) {
      const int64_t words = std::min<int64_t>(16, full_pairs - i0);
      const __mmask16 mask = static_cast<__mmask16>((1u << words) - 1);
      __m512 r[16];
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj)
        r[jj] = jj < nj ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(mask, rows[j0 + jj] + 2 * i0))
                        : _mm512_setzero_ps();
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        if (i < words) _mm512_storeu_ps(dst + 2 * ((i0 + i) * ld + j0), r[i]);
    }
    if (cols % 2)  // the last column alone; its pair's high half stays 0
      for (int64_t jj = 0; jj < nj; ++jj) dst[2 * (full_pairs * ld + j0 + jj)] = rows[j0 + jj][cols - 1];
  }
}

// Row pairs interleaved (the operand layout of vdpbf16ps products that sum
// over rows, e.g. P V): word (j / 2, c) of
// dst (ceil(n / 2) x ld words) holds rows[j][c] and rows[j + 1][c] (0 for a
// missing last row), c < cols. (A plain loop: GCC turns it into vpermt2w.)
inline void interleave_row_pairs(const uint16_t* const* rows, int64_t n, int64_t cols, uint16_t* dst, int64_t ld) {
  for (int64_t j = 0; j < n; j += 2) {
    const uint16_t* r0 = rows[j];
    uint16_t* out = dst + 2 * (j / 2) * ld;
    if (j + 1 < n) {
      const uint16_t* r1 = rows[j + 1];
      for (int64_t c = 0; c < cols; ++c) out[2 * c] = r0[c], out[2 * c + 1] = r1[c];
    } else {
      for (int64_t c = 0; c < cols; ++c) out[2 * c] = r0[c], out[2 * c + 1] = 0;
    }
  }
}
#endif

}  // namespace TK_CPU_NS
}  // namespace torchkiln
