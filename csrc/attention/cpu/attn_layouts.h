// Operand layouts of the CPU attention kernels: keys (or values, queries)
// turned into the column-major or pair-interleaved forms the matrix products
// read. Include only from per-ISA kernel files, after attn_common.h.
//
// The transposes go 16 rows x 16 columns at a time through registers
// (AVX-512; common/cpu/transpose16.h) instead of one scalar copy per
// element, which cost more than the attention itself for a few query rows.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "attention/cpu/attn_common.h"
#include "common/cpu/transpose16.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace attn {

// Rows of keys [first, first + n) of sequence b, kv head hk, in k or v (as
// stored: U is the element type or uint16_t for raw bf16 bits).
template <class U>
std::vector<const U*> key_rows(const FlashAttnTensor& t, const FlashAttnParams& p, int64_t b, const Sequence& s,
                               int64_t hk, int64_t first, int64_t n) {
  std::vector<const U*> rows(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) rows[j] = static_cast<const U*>(t.ptr) + key_offset(t, p, b, s.k_begin, first + j, hk);
  return rows;
}

// dst[c * ld + j] = rows[j][c] widened to fp32, for j < n and c < cols;
// columns [n, round_up(n, 16)) of dst get zeros (ld must cover them).
template <class T>
void transpose_rows(const T* const* rows, int64_t n, int64_t cols, float* dst, int64_t ld) {
#if defined(__AVX512F__)
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, n - j0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t w = std::min<int64_t>(16, cols - c0);
      __m512 r[16];
#pragma GCC unroll 16
      for (int jj = 0; jj < 16; ++jj)
        r[jj] = jj >= nj ? _mm512_setzero_ps() : (w == 16 ? vload(rows[j0 + jj] + c0) : vload_partial(rows[j0 + jj] + c0, w)).v;
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)  // a bound of w here would put r on the stack
        if (i < w) _mm512_storeu_ps(dst + (c0 + i) * ld + j0, r[i]);
    }
  }
#else
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t j = 0; j < n; ++j) dst[c * ld + j] = to_float(rows[j][c]);
#endif
}

// (rows x cols) -> (cols x rows) fp32, both multiples of 16 on AVX-512.
inline void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
#if defined(__AVX512F__)
  for (int64_t r0 = 0; r0 < rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (r0 + i) * lds + c0);
      transpose16(r);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (c0 + i) * ldd + r0, r[i]);
    }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
#endif
}

#if defined(__AVX512BF16__)
// Column pairs transposed, the B operand of gemm_nt_bf16: 32-bit word
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

// Row pairs interleaved, the B operand of gemm_acc_bf16: word (j / 2, c) of
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

}  // namespace attn
}  // namespace TK_CPU_NS
}  // namespace torchkiln
