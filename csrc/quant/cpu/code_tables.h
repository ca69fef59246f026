// The values 4-bit codes stand for, and the per-group lookup tables built
// from them, shared by the CPU quant kernels (compiled once per ISA, so
// everything here lives in the ISA's namespace).
#pragma once
#include <cstdint>

#include "common/cpu/vec.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace TK_CPU_NS {

// int4 codes are their own values (the zero point is subtracted per group).
inline constexpr float kInt4Values[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

inline const float* code_values(WeightFormat f) { return f == WeightFormat::kNf4 ? kNf4Codebook : kInt4Values; }

#if defined(__AVX512F__)
// One group's 16 weights as (value - zero) * scale (no zero: value * scale),
// each rounded once to T (bf16 or fp16) exactly as dequantize rounds them,
// in the low half of a vector: `vpermw` with codes 0-15 as indices turns 32
// codes into 32 dequantised weights.
template <class T>
inline __m512i scaled_code_table(__m512 values, float scale, const uint8_t* zero) {
  const __m512 v = zero ? _mm512_sub_ps(values, _mm512_set1_ps(static_cast<float>(*zero))) : values;
  const Vec t{_mm512_mul_ps(v, _mm512_set1_ps(scale))};
  if constexpr (std::is_same_v<T, bf16_t>) return _mm512_castsi256_si512(cvt_bf16(t));
  else return _mm512_castsi256_si512(cvt_fp16(t));
}
#endif

}  // namespace TK_CPU_NS
}  // namespace torchkiln
