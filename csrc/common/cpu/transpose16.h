// In-register transpose of a 16 x 16 tile of 32-bit values (AVX-512 only),
// for kernels that turn rows of keys into columns: one vector per column
// instead of one scalar copy per element.
#pragma once

#include "common/cpu/vec.h"

namespace torchkiln {
namespace TK_CPU_NS {

#if defined(__AVX512F__)
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
#endif

}  // namespace TK_CPU_NS
}  // namespace torchkiln
