// fp32 vector helpers for the per-ISA CPU kernels.
//
// Include only from files under csrc/*/cpu/: each is compiled once per ISA
// level with TK_CPU_NS = cpu_scalar | cpu_avx2 | cpu_avx512 | cpu_avx512bf16
// and the matching -m flags, and everything here lives in that namespace so
// the copies never merge at link time (an AVX-512 copy of an inline function
// must never serve the scalar path).
//
// `Vec` holds kWidth fp32 lanes: 16 (AVX-512), 8 (AVX2) or 1 (scalar). Loads
// widen bf16/fp16 to fp32 and stores round to nearest-even, so every kernel
// computes in fp32 whatever its storage type.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/dtype.h"

// For a helper whose only effect is prefetching: GCC (C++ assumes every loop
// ends, -ffinite-loops) finds such a function free of side effects and
// deletes each call to it that it did not inline, silently. NextTileSweep::
// prefetch_groups lost every prefetch that way (none in the object code).
// After adding a prefetch, count the prefetcht* instructions in the object.
#define TK_PREFETCH_HELPER inline __attribute__((always_inline))

#ifndef TK_CPU_NS
#error "vec.h is for per-ISA kernel files; TK_CPU_NS must name the ISA namespace"
#endif

namespace torchkiln {
namespace TK_CPU_NS {

// ------------------------------------------------------------ scalar conversions
inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(fp16_t x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t man = x.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {  // inf / nan
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {  // normal
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {  // zero
    u = sign;
  } else {  // subnormal: renormalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    u = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

template <class T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) {
  return f;
}
template <>
inline bf16_t from_float<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <>
inline fp16_t from_float<fp16_t>(float f) {
#if defined(__F16C__)
  return fp16_t{static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT))};
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (a >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {  // result is subnormal or zero: let the FPU round
    float r = std::fabs(f) + 0.5f;  // 0.5 = 2^-1: ulp of r is 2^-24 = fp16's smallest step
    uint32_t ru;
    std::memcpy(&ru, &r, 4);
    return fp16_t{static_cast<uint16_t>(sign | (ru - 0x3f000000u))};
  }
  uint32_t m = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);  // rebias + round to nearest even
  return fp16_t{static_cast<uint16_t>(sign | (m >> 13))};
#endif
}

#if defined(__AVX512F__)
// ------------------------------------------------------------ AVX-512
struct Vec {
  static constexpr int kWidth = 16;
  __m512 v;
};
inline Vec vset1(float x) { return {_mm512_set1_ps(x)}; }
inline Vec vzero() { return {_mm512_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline Vec vload(const fp16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void vstore(float* p, Vec a) { _mm512_storeu_ps(p, a.v); }
// fp32 -> bf16 bits, round to nearest even, NaN kept quiet.
#if defined(__AVX512BF16__)
// One instruction instead of eight (it also flushes bf16 subnormals, values
// below 1.2e-38, to zero).
inline __m256i cvt_bf16(Vec a) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a.v)); }
#else
inline __m256i cvt_bf16(Vec a) {
  __m512i u = _mm512_castps_si512(a.v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}
#endif
inline __m256i cvt_fp16(Vec a) { return _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void vstore(bf16_t* p, Vec a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cvt_bf16(a)); }
inline void vstore(fp16_t* p, Vec a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), cvt_fp16(a)); }
// Non-temporal stores (no read-for-ownership of the destination line); p must
// be aligned to the vector's size in bytes. Use through vstore_out.
inline void vstore_stream(float* p, Vec a) { _mm512_stream_ps(p, a.v); }
inline void vstore_stream(bf16_t* p, Vec a) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), cvt_bf16(a)); }
inline void vstore_stream(fp16_t* p, Vec a) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), cvt_fp16(a)); }
inline void stream_fence() { _mm_sfence(); }
inline Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm512_div_ps(a.v, b.v)}; }  // IEEE, correctly rounded
// 1.0f where a > b, else 0.0f (false for NaN).
inline Vec vgt(Vec a, Vec b) { return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ), _mm512_set1_ps(1.0f))}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a*b+c
inline Vec vmin(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec vround(Vec a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// 2^n for integral n in [-126, 127] held as float.
inline Vec vexp2i(Vec n) {
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
}
// a * 2^n for integral n held as float: one vscalefps (adding n to a's
// exponent field instead made vexp_nonpos 1.2x slower on Zen 4).
inline Vec vscale2(Vec a, Vec n) { return {_mm512_scalef_ps(a.v, n.v)}; }
// 1/a to full fp32 precision: 14-bit estimate plus one Newton step (no vdivps).
inline Vec vrecip(Vec a) {
  __m512 r = _mm512_rcp14_ps(a.v);
  return {_mm512_mul_ps(r, _mm512_fnmadd_ps(a.v, r, _mm512_set1_ps(2.0f)))};
}
inline float vsum(Vec a) { return _mm512_reduce_add_ps(a.v); }
inline float vhmax(Vec a) { return _mm512_reduce_max_ps(a.v); }
// The four sums of a, b, c, d at once: a transpose-add tree, about a third of
// the work of four separate reductions.
inline void vsum4(Vec a, Vec b, Vec c, Vec d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a.v, b.v), _mm512_unpackhi_ps(a.v, b.v));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c.v, d.v), _mm512_unpackhi_ps(c.v, d.v));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  __m512 x = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));  // per 128-bit lane: a b c d
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));
  x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));
  _mm_storeu_ps(out, _mm512_castps512_ps128(x));
}
inline Vec viota() { return {_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}; }
inline Vec vabs(Vec a) { return {_mm512_abs_ps(a.v)}; }
// (x0,x1,x2,x3,...) -> (x1,x0,x3,x2,...): partner lanes of interleaved pairs.
inline Vec vswap_pairs(Vec a) { return {_mm512_permute_ps(a.v, 0xB1)}; }
#if defined(__AVX512VNNI__)
// acc + the pair products of a and b summed per int32 lane: int16 x int16
// (vpdpwssd) and unsigned byte a x signed byte b (vpdpbusd). GCC 12 wraps
// each VNNI intrinsic in two register moves (the accumulator copied to a
// spare register and back), doubling the instructions of the int8 inner
// loops; as asm the instruction accumulates in place. b may come from memory.
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
  return acc;
}
#endif

#elif defined(__AVX2__)
// ------------------------------------------------------------ AVX2 + FMA + F16C
struct Vec {
  static constexpr int kWidth = 8;
  __m256 v;
};
inline Vec vset1(float x) { return {_mm256_set1_ps(x)}; }
inline Vec vzero() { return {_mm256_setzero_ps()}; }
inline Vec vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline Vec vload(const bf16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
}
inline Vec vload(const fp16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void vstore(float* p, Vec a) { _mm256_storeu_ps(p, a.v); }
inline __m128i cvt_bf16(Vec a) {
  __m256i u = _mm256_castps_si256(a.v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q));
  __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, quiet, nan);
  // Values are < 2^16, so unsigned saturation keeps them; fix the lane order.
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  return _mm256_castsi256_si128(packed);
}
inline __m128i cvt_fp16(Vec a) { return _mm256_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void vstore(bf16_t* p, Vec a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), cvt_bf16(a)); }
inline void vstore(fp16_t* p, Vec a) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), cvt_fp16(a)); }
inline void vstore_stream(float* p, Vec a) { _mm256_stream_ps(p, a.v); }
inline void vstore_stream(bf16_t* p, Vec a) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), cvt_bf16(a)); }
inline void vstore_stream(fp16_t* p, Vec a) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), cvt_fp16(a)); }
inline void stream_fence() { _mm_sfence(); }
inline Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec operator/(Vec a, Vec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec vgt(Vec a, Vec b) { return {_mm256_and_ps(_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ), _mm256_set1_ps(1.0f))}; }
inline Vec vfma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec vmin(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
inline Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vec vround(Vec a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec vexp2i(Vec n) {
  __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(e, 23))};
}
// a * 2^n for integral n with a * 2^n normal: n added to a's exponent field.
inline Vec vscale2(Vec a, Vec n) {
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n.v), 23);
  return {_mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a.v), e))};
}
// 12-bit estimate plus one Newton step: about 23 correct bits.
inline Vec vrecip(Vec a) {
  __m256 r = _mm256_rcp_ps(a.v);
  return {_mm256_mul_ps(r, _mm256_fnmadd_ps(a.v, r, _mm256_set1_ps(2.0f)))};
}
inline float vsum(Vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vec vswap_pairs(Vec a) { return {_mm256_permute_ps(a.v, 0xB1)}; }
inline float vhmax(Vec a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline Vec viota() { return {_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7)}; }
inline void vsum4(Vec a, Vec b, Vec c, Vec d, float* out) {
  const __m256 ab = _mm256_add_ps(_mm256_unpacklo_ps(a.v, b.v), _mm256_unpackhi_ps(a.v, b.v));
  const __m256 cd = _mm256_add_ps(_mm256_unpacklo_ps(c.v, d.v), _mm256_unpackhi_ps(c.v, d.v));
  const __m256d abd = _mm256_castps_pd(ab), cdd = _mm256_castps_pd(cd);
  const __m256 x = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(abd, cdd)),
                                 _mm256_castpd_ps(_mm256_unpackhi_pd(abd, cdd)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)));
}
inline Vec vabs(Vec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }

#else
// ------------------------------------------------------------ scalar fallback
// One lane; the compiler may still auto-vectorise loops over it with SSE2,
// which every x86-64 CPU has.
struct Vec {
  static constexpr int kWidth = 1;
  float v;
};
inline Vec vset1(float x) { return {x}; }
inline Vec vzero() { return {0.0f}; }
template <class T>
inline Vec vload(const T* p) {
  return {to_float(*p)};
}
template <class T>
inline void vstore(T* p, Vec a) {
  *p = from_float<T>(a.v);
}
inline Vec operator+(Vec a, Vec b) { return {a.v + b.v}; }
inline Vec operator-(Vec a, Vec b) { return {a.v - b.v}; }
inline Vec operator*(Vec a, Vec b) { return {a.v * b.v}; }
inline Vec operator/(Vec a, Vec b) { return {a.v / b.v}; }
inline Vec vgt(Vec a, Vec b) { return {a.v > b.v ? 1.0f : 0.0f}; }
// Plain multiply-add: without -mfma, std::fma would be a slow libm call.
inline Vec vfma(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
inline Vec vmin(Vec a, Vec b) { return {a.v < b.v ? a.v : b.v}; }
inline Vec vmax(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
inline Vec vround(Vec a) { return {std::nearbyint(a.v)}; }
inline Vec vexp2i(Vec n) {
  uint32_t u = static_cast<uint32_t>(static_cast<int32_t>(n.v) + 127) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return {f};
}
inline Vec vscale2(Vec a, Vec n) { return {std::ldexp(a.v, static_cast<int>(n.v))}; }
inline Vec vrecip(Vec a) { return {1.0f / a.v}; }
inline float vsum(Vec a) { return a.v; }
inline float vhmax(Vec a) { return a.v; }
inline Vec viota() { return {0.0f}; }
inline void vsum4(Vec a, Vec b, Vec c, Vec d, float* out) {
  out[0] = a.v;
  out[1] = b.v;
  out[2] = c.v;
  out[3] = d.v;
}
inline Vec vabs(Vec a) { return {std::fabs(a.v)}; }
template <class T>
inline void vstore_stream(T* p, Vec a) {
  vstore(p, a);
}
inline void stream_fence() {}
#endif

constexpr int kW = Vec::kWidth;

// ------------------------------------------------------------ shared helpers
inline Vec operator-(Vec a) { return vzero() - a; }

// Tail handling: the last n < kW elements go through a zero-padded buffer.
template <class T>
inline Vec vload_partial(const T* p, int64_t n) {
  T buf[kW] = {};
  std::memcpy(buf, p, static_cast<size_t>(n) * sizeof(T));
  return vload(buf);
}
template <class T>
inline void vstore_partial(T* p, Vec a, int64_t n) {
  T buf[kW];
  vstore(buf, a);
  std::memcpy(p, buf, static_cast<size_t>(n) * sizeof(T));
}

// Bytes of output past which kernels write with non-temporal stores: far
// beyond L2, where skipping the destination's read-for-ownership saves a
// third of the traffic. Smaller outputs stay cached for the next op.
constexpr int64_t kStreamingStoreBytes = int64_t{8} << 20;

// Full-vector store; non-temporal when `stream` and p is vector-aligned.
template <class T>
inline void vstore_out(T* p, Vec a, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kW) == 0)
    vstore_stream(p, a);
  else
    vstore(p, a);
}

// exp(x) in fp32, about 1 ulp over the clamped range [-87, 88]: outside it the
// result saturates to ~1.6e-38 / ~1.7e38, which is all silu / softmax need.
// Range reduction x = n*ln2 + r with |r| <= ln2/2, then a degree-6 polynomial.
inline Vec vexp(Vec x) {
  x = vmin(vmax(x, vset1(-87.0f)), vset1(88.0f));
  Vec n = vround(x * vset1(1.44269504088896341f));
  Vec r = vfma(n, vset1(-0.693145751953125f), x);  // ln2 split in two for accuracy
  r = vfma(n, vset1(-1.428606765330187e-06f), r);
  Vec p = vset1(1.0f / 720.0f);
  p = vfma(p, r, vset1(1.0f / 120.0f));
  p = vfma(p, r, vset1(1.0f / 24.0f));
  p = vfma(p, r, vset1(1.0f / 6.0f));
  p = vfma(p, r, vset1(0.5f));
  p = vfma(p, r, vset1(1.0f));
  p = vfma(p, r, vset1(1.0f));
  return p * vexp2i(n);
}

// exp(x) for x <= 0 (or a rounding error above), as accurate as vexp, for
// softmax's exp(s - max); below about -86.6 it saturates to 2^-125 rather
// than 0, so callers zero masked entries themselves. Base 2 throughout:
// x log2e - round(x log2e) is exact, where vexp reduces with a two-part ln2
// step, and the scaling by 2^n is one instruction: 11 vector operations
// against vexp's 16.
inline Vec vexp_nonpos(Vec x) {
  const Vec t = vmax(x * vset1(1.44269504088896341f), vset1(-125.0f));
  const Vec n = vround(t);
  const Vec f = t - n;  // [-0.5, 0.5]: 2^f = e^(f ln2), |f ln2| <= ln2 / 2 as in vexp
  Vec p = vset1(1.5403530393381608e-4f);  // ln2^k / k!
  p = vfma(p, f, vset1(1.3333558146428443e-3f));
  p = vfma(p, f, vset1(9.6181291076284772e-3f));
  p = vfma(p, f, vset1(5.5504108664821580e-2f));
  p = vfma(p, f, vset1(0.24022650695910071f));
  p = vfma(p, f, vset1(0.69314718055994531f));
  p = vfma(p, f, vset1(1.0f));
  return vscale2(p, n);
}

// Calls f(T{}) with T the storage type named by dtype (float, bf16_t, fp16_t).
template <class F>
inline void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kBFloat16:
      f(bf16_t{});
      break;
    case DType::kFloat16:
      f(fp16_t{});
      break;
  }
}

// 1 / (1 + exp(-x))
inline Vec vsigmoid(Vec x) { return vrecip(vset1(1.0f) + vexp(-x)); }

}  // namespace TK_CPU_NS
}  // namespace torchkiln
