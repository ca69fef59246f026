// Weight-only quantised matmul for a few rows of x (decode), and the dense
// dequantisation used by the many-rows path.
//
// The matmul is bound by reading the packed weight, so each thread streams
// its own contiguous range of output rows once and decodes codes in
// registers; up to kRowsPerPass rows of x share each decoded vector (the
// weight row, 2-4 KiB, stays in L1 for the next pass over x's rows).
//
// Zero points never touch the inner loop:
//   sum_k x_k * s_g * (q_k - z_g) = s_g * (sum_k x_k q_k - z_g * sum_k x_k)
// and the per-group sums of x are computed once per call.
//
// Inner loops:
//  * fp32 (every ISA, every format): codes become fp32 (int4: converted
//    below AVX-512, else a 16-entry table with one permute per 16 codes; nf4:
//    the codebook), then FMA with x in fp32. Groups of whole 64-column chunks
//    (tile_4bit_grouped) sum unscaled and scale once per group, groups of 32
//    once per half chunk for 1-2 rows of x; for more rows groups of 32
//    scale every weight (tile_4bit_rows).
//  * AVX2, 16-bit x (int4, nf4), and AVX-512 without AVX512_BF16 (int4,
//    1-2 rows of x): x quantised per group to int16, codes (nf4: its
//    codebook as int16) multiplied with vpmaddwd (tile_int4_i16,
//    tile_nf4_i16), unless an element of x dwarfs its group (stage_int16).
//  * AVX2, nf4 otherwise: exact fp32 codebook values by byte-plane vpshufb
//    lookups (tile_nf4_planes).
//  * bf16 dot products (AVX512_BF16, int4): 0x4300 | q is the bf16 bit
//    pattern of 128 + q, so one OR turns 32 codes into exact bf16 values and
//    `vdpbf16ps` multiplies them with x (the offset 128 joins the zero
//    point). x that is not already bf16 is split into hi + lo bf16 parts
//    (16 significant bits, enough for fp16 exactly and fp32 to 2^-17).
//  * bf16 dot products (AVX512_BF16, nf4 with bf16 x): one `vpermw` looks
//    up 32 codes in the codebook rounded to bf16.
//  * 3-4 rows of bf16 x a pass (AVX512_BF16, int4 and nf4): `vpermw` looks
//    codes up in their values times the group's scale, rounded to bf16 per
//    (weight row, group), so no per-group work remains per row of x
//    (tile_4bit_bf16_scaled).
//  * int16 products (int8 with 16-bit x, 5 or more rows of x on AVX-512,
//    3 or more on AVX2): x quantised per 1024 columns to int16 as above,
//    codes sign-extended once per tile into an L1 panel, `vpdpwssd` (VNNI;
//    else `vpmaddwd`) for every row of x (matmul_int8_panels).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "quant/cpu/code_tables.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {


// Register tile: kTileN weight rows x up to kRowsPerPass rows of x.
constexpr int kTileN = 4;
#if defined(__AVX512F__)
constexpr int kRowsPerPass = 4;
#else
constexpr int kRowsPerPass = 2;  // 16 vector registers: more rows would spill
#endif

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

int64_t padded_k(const WeightOnlyParams& p) {
  return p.format == WeightFormat::kInt8 ? round_up(p.k, 32) : round_up(p.k, kNibbleChunk);
}

#if defined(__AVX2__)
// ------------------------------------------------------------ int16 products
// The int16 products of one ISA level: 32 a vector on AVX-512 (summed in
// place by `vpdpwssd` with VNNI, else `vpmaddwd` and an add), 16 on AVX2
// (`vpmaddwd` and an add). The same pairs land in each int32 lane either
// way, so the range arguments of the loops hold for all.
#if defined(__AVX512F__)
struct Int16Dot {
  using V = __m512i;
  static constexpr int kLanes = 32;   // int16 per vector: columns a step
  static constexpr int kMaxRows = 4;  // rows of x a pass of the int8 panels: 16 accumulators
  static V zero() { return _mm512_setzero_si512(); }
  static V load(const int16_t* p) { return _mm512_loadu_si512(p); }
  static V dot(V acc, V w, V x) {
#if defined(__AVX512VNNI__)
    return dpwssd(acc, w, x);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
  }
  // The first min(n, kLanes) codes widened to int16, the rest zero.
  static V widen(const uint8_t* codes, int64_t n) {
    const __mmask32 lanes = n >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1);
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(lanes, codes));
  }
  static V widen_full(const uint8_t* codes) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  }
  // kLanes bytes zero-extended: 4-bit code pairs (hi << 4 | lo) as int16.
  static V widen_pairs(const uint8_t* codes) {
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes)));
  }
  static V low_nibbles(V pairs) { return _mm512_and_si512(pairs, _mm512_set1_epi16(0x000F)); }
  static V high_nibbles(V pairs) { return _mm512_srli_epi16(pairs, 4); }
  static V add(V a, V b) { return _mm512_add_epi32(a, b); }
  static Vec to_float(V v) { return {_mm512_cvtepi32_ps(v)}; }
  static void store(int16_t* p, V v) { _mm512_store_si512(p, v); }
  // t[0..16) += float(acc) * scale
  static void add_scaled(float* t, V acc, float scale) {
    _mm512_storeu_ps(t, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(scale), _mm512_loadu_ps(t)));
  }
  static float sum(const float* t) { return _mm512_reduce_add_ps(_mm512_loadu_ps(t)); }
};
#else
struct Int16Dot {
  using V = __m256i;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 2;  // 8 accumulators of the 16 registers
  static V zero() { return _mm256_setzero_si256(); }
  static V load(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // The add as asm, in place: GCC 12 wrote each sum to a spare register and
  // moved it back (8 moves per 8 vpmaddwd, as with the VNNI intrinsics).
  static V dot(V acc, V w, V x) {
    const V products = _mm256_madd_epi16(w, x);
    asm("vpaddd %1, %0, %0" : "+x"(acc) : "x"(products));
    return acc;
  }
  static V widen(const uint8_t* codes, int64_t n) {
    alignas(16) uint8_t b[16] = {};
    std::memcpy(b, codes, static_cast<size_t>(std::min<int64_t>(n, 16)));
    return _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
  }
  static V widen_full(const uint8_t* codes) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  }
  static V widen_pairs(const uint8_t* codes) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  }
  static V low_nibbles(V pairs) { return _mm256_and_si256(pairs, _mm256_set1_epi16(0x000F)); }
  static V high_nibbles(V pairs) { return _mm256_srli_epi16(pairs, 4); }
  static V add(V a, V b) { return _mm256_add_epi32(a, b); }
  static Vec to_float(V v) { return {_mm256_cvtepi32_ps(v)}; }
  static void store(int16_t* p, V v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
  static void add_scaled(float* t, V acc, float scale) {
    _mm256_storeu_ps(t, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(scale), _mm256_loadu_ps(t)));
  }
  static float sum(const float* t) { return vsum(Vec{_mm256_loadu_ps(t)}); }
};
#endif
#endif

// nf4 only with bf16 x: its loop takes x as it is (no hi + lo split).
// Groups must be whole 64-column chunks, or (int4) 32 columns, half a chunk.
bool uses_bf16_dot(const WeightOnlyParams& p) {
#if defined(__AVX512BF16__)
  if (p.group_size % kNibbleChunk != 0) return p.format == WeightFormat::kInt4 && p.group_size == 32;
  return p.format == WeightFormat::kInt4 || (p.format == WeightFormat::kNf4 && p.dtype == DType::kBFloat16);
#else
  (void)p;
  return false;
#endif
}

// nf4 below AVX-512 with groups of whole chunks, when x is not staged as
// int16 (below): codes decoded by byte-plane lookups (tile_nf4_planes),
// which leave each 32-column half in the order of nf4_plane_column; x is
// staged in that order.
bool nf4_planes_possible(const WeightOnlyParams& p) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  return p.format == WeightFormat::kNf4 && p.group_size % kNibbleChunk == 0;
#else
  (void)p;
  return false;
#endif
}

// int4 with bf16 / fp16 x, groups of whole chunks or of 32, where bf16 dot
// products do not take it (AVX2, AVX-512 without AVX512_BF16): x is
// quantised per group to int16 and the codes multiplied with vpmaddwd
// (tile_int4_i16). The rounding, at most 2^-16 of the group's largest |x|,
// is below the half-ulp x already carries in 8 or 11 bits as long as no
// element dwarfs its group (see stage_int16; calls whose x has such a group
// take the exact loops). fp32 x always keeps the exact fp32 loops.
//
// nf4 takes the same route (tile_nf4_i16) with the codebook as int16 in
// units of 2^-13 (within 2^-14 of each value, again far below bf16's own
// rounding of the weight), x staged in the order of nf4_i16_column (AVX2
// only, see below).
//
// AVX-512 without AVX512_BF16 (Ice Lake, Cascade Lake) runs the int4 loop
// for 1-2 rows of x, 32 columns a vector: the Zen 4 forced to plain
// AVX-512, one core, weight in L3, bf16 x, M=1: g128 21.5-23.3 -> 32.7-34.8
// G weights/s, g32 16.1-19.4 -> 25.0-26.0, against the fp32 loop (one
// permute a 16 codes); M=2 about 1.25x.
//
// int8 with bf16 / fp16 x and more than kRowsPerPass rows of it: x staged
// the same way in groups of kInt8XGroup columns, multiplied by the codes
// sign-extended to int16 with `vpdpwssd` (AVX-512 VNNI) or `vpmaddwd`
// (matmul_int8_panels). Up to kRowsPerPass rows the matmul is bound by
// reading the weight and the fp32 loop is as fast (Zen 4: M=1 1.30x ATen
// against 1.26x). AVX2 (forced on the Zen 4), bf16 / fp16 x, the fp32
// loop's time over this one's on the three bench shapes: M=3 1.10-1.31, M=4
// 1.00-1.24, M=6 1.14-1.33, M=8 1.09-1.38; M=16 146-149 -> 234-241 GFLOP/s.
// Plain AVX-512 (forced, one core, 4096^2 in L3): M=5-16 60-99 -> 82-128
// GFLOP/s (noisy host).
bool uses_int16_x(const WeightOnlyParams& p) {
#if defined(__AVX2__)
  if (p.dtype == DType::kFloat32) return false;
  if (p.format == WeightFormat::kInt8) return p.m > kRowsPerPass;  // matmul_int8_panels
  if (uses_bf16_dot(p)) return false;
  if (p.group_size % kNibbleChunk != 0) return p.format == WeightFormat::kInt4 && p.group_size == 32 && p.zeros != nullptr;
#if defined(__AVX512F__)
  // nf4 stays in the fp32 loop, one permute a 16 codes, which ran as fast
  // as an int16 lookup loop (Zen 4, one core, weight in L3: 22 G weights/s);
  // so does int4 for 3 or more rows of x, where the fp32 loop shares each
  // decoded vector among 4 rows (the int16 loop: 2 rows a pass).
  if (p.format == WeightFormat::kNf4 || p.m > 2) return false;
#else
  if (p.format == WeightFormat::kNf4) return true;
#endif
  // Groups up to 32768 columns keep a group's int32 sums in range (see tile_int4_i16).
  return p.format == WeightFormat::kInt4 && p.group_size <= 32768 && p.zeros != nullptr;
#else
  (void)p;
  return false;
#endif
}

// Column, within a 32-column half chunk, of position i of the plane order:
// the unpacks in nf4_decode_half give columns 0-3 and 16-19, then 4-7 and
// 20-23, 8-11 and 24-27, 12-15 and 28-31 (each vector holds 4 columns from
// each 128-bit lane).
inline int nf4_plane_column(int i) {
  const int f = i / 8, e = i % 8;
  return e < 4 ? 4 * f + e : 16 + 4 * f + (e - 4);
}

// Column, within a 32-column half chunk, of position i of the order the
// nf4 int16 lookup leaves: unpacking the low and high bytes of the values
// gives columns 0-7 and 16-19, then 8-15 and 24-31 (per 128-bit lane).
inline int nf4_i16_column(int i) { return i < 8 || i >= 24 ? i : i < 16 ? i + 8 : i - 8; }

// Each 32-column half chunk of a staged row (kp columns) put in the order a
// decode leaves the codes: position i takes column column(i).
template <class T>
void reorder_halves(T* row, int64_t kp, int (*column)(int)) {
  T half[32];
  for (int64_t h = 0; h < kp; h += 32) {
    std::copy(row + h, row + h + 32, half);
    for (int c = 0; c < 32; ++c) row[h + c] = half[column(c)];
  }
}

// x in the form the inner loop reads, zero-padded to kp columns.
struct StagedX {
  int64_t kp = 0, groups = 0;
  std::vector<float> x;           // (m, kp) fp32 (fp32 loop)
  std::vector<uint16_t> hi, lo;   // (m, kp) bf16 bits, x = hi + lo (bf16 loop)
  bool split = false;             // lo is not all zero
  enum class Loop { kDefault, kNf4Planes, kInt16 } loop = Loop::kDefault;
  std::vector<float> group_sums;  // (m, groups), int4 zero points
  std::vector<int16_t> xq;        // (m, kp) x / xq_scale rounded (int16 loop)
  std::vector<float> xq_scale;    // (m, xq_groups)
  int64_t xq_group = 0, xq_groups = 0;  // columns per scale of xq (the weight's group but for int8), count
};

// int8 weights have one group (the row); x takes a scale per this many
// columns (int16 loop), which keeps an outlier's reach short and the int32
// sums of a group in range (32 `vpdpwssd` of at most 2 * 32767 * 127 a
// lane: 2.7e8 < 2^31). Fewer columns scaled the sums more often than paid
// (256: in cache 0.8-1.15x the fp32 loop, 1024: 1.1-1.3x).
constexpr int64_t kInt8XGroup = 1024;

// Largest |x| of a group against the mean |x| of the group's other elements
// beyond which int16 staging is refused: the rounding, at most max / 65534,
// then stays under mean * 2^-10, half of bf16's relative half-ulp for an
// element of mean size, so the product's error stays below what rounding x
// to bf16 already costs. LLM activations with outlier channels (a few
// hundred times the rest) fail it and take the exact loops. (The mean
// leaves the largest element out: with it, one element of a 32-column
// group can be at most 32 times the mean however large it is.)
constexpr float kInt16MaxOverMean = 64.0f;

// Whether a group of n elements with largest |x| m and sum of |x| sum may be
// staged as int16 (false for NaN and inf too).
inline bool int16_staging_ok(float m, float sum, int64_t n) {
  return m * static_cast<float>(n - 1) <= kInt16MaxOverMean * (sum - m);
}

// x's rows quantised per group to int16 (uses_int16_x): round(x / scale)
// with scale = max |x| / 32767 over the group. False (xq unusable) when a
// group fails int16_staging_ok.
bool stage_int16(const WeightOnlyParams& p, StagedX& s) {
#if defined(__AVX512F__)
  // int8: groups of xq_group columns, the last one ending at k.
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = s.x.data() + i * s.kp;
    int16_t* q = s.xq.data() + i * s.kp;
    for (int64_t gi = 0; gi < s.xq_groups; ++gi) {
      const int64_t j0 = gi * s.xq_group, j1 = std::min(p.k, j0 + s.xq_group);
      __m512 mx = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int64_t j = j0; j < j1; j += 16) {  // s.x is zero-padded to kp, a multiple of 32
        const __m512 a = _mm512_and_ps(_mm512_loadu_ps(x + j), abs_mask);
        mx = _mm512_max_ps(mx, a);
        sum = _mm512_add_ps(sum, a);
      }
      const float m = _mm512_reduce_max_ps(mx);
      if (!int16_staging_ok(m, _mm512_reduce_add_ps(sum), j1 - j0)) return false;
      s.xq_scale[i * s.xq_groups + gi] = m / 32767.0f;
      const __m512 inv = _mm512_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f);
      for (int64_t j = j0; j < j1; j += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j),
                            _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), inv))));
    }
  }
  return true;
#elif defined(__AVX2__)
  // Groups of xq_group columns, the last one ending at k (int8); s.x is
  // zero-padded to kp, a multiple of 32.
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < p.m; ++i) {
    const float* x = s.x.data() + i * s.kp;
    int16_t* q = s.xq.data() + i * s.kp;
    for (int64_t gi = 0; gi < s.xq_groups; ++gi) {
      const int64_t j0 = gi * s.xq_group, j1 = std::min(p.k, j0 + s.xq_group);
      __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int64_t j = j0; j < j1; j += 8) {
        const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + j), abs_mask);
        mx = _mm256_max_ps(mx, a);
        sum = _mm256_add_ps(sum, a);
      }
      const float m = vhmax(Vec{mx});
      if (!int16_staging_ok(m, vsum(Vec{sum}), j1 - j0)) return false;
      s.xq_scale[i * s.xq_groups + gi] = m / 32767.0f;
      const __m256 inv = _mm256_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f);
      for (int64_t j = j0; j < j1; j += 16) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), inv));
        // packs interleaves 128-bit lanes (a0 b0 a1 b1); the permute restores column order.
        const __m256i ab = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), ab);
      }
    }
    if (p.format == WeightFormat::kNf4) reorder_halves(q, s.kp, nf4_i16_column);
  }
  return true;
#else
  (void)p;
  (void)s;
  return false;
#endif
}

// Vector loops: staging is a fixed cost per call (1-3% of an M=1 matmul
// streamed from DRAM at k = 4096-11008, several times that as scalar code).
template <class T>
void stage_rows(const WeightOnlyParams& p, bool bf16_dot, StagedX& s) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t k = p.k;
  for (int64_t i = 0; i < p.m; ++i) {
    const T* row = x + i * p.x_row_stride;
    if (bf16_dot) {
      // hi = x rounded to bf16, lo = the remainder rounded to bf16.
      auto* hi = reinterpret_cast<bf16_t*>(s.hi.data() + i * s.kp);
      auto* lo = reinterpret_cast<bf16_t*>(s.lo.data() + i * s.kp);
      int64_t j = 0;
      for (; j + kW <= k; j += kW) {
        const Vec v = vload(row + j);
        vstore(hi + j, v);
        vstore(lo + j, v - vload(hi + j));
      }
      for (; j < k; ++j) {
        const float v = to_float(row[j]);
        hi[j] = from_float<bf16_t>(v);
        lo[j] = from_float<bf16_t>(v - to_float(hi[j]));
      }
    } else {
      float* xs = s.x.data() + i * s.kp;
      int64_t j = 0;
      for (; j + kW <= k; j += kW) vstore(xs + j, vload(row + j));
      for (; j < k; ++j) xs[j] = to_float(row[j]);
    }
    if (!s.group_sums.empty()) {
      // The bf16 loop multiplies hi + lo, not x; summing the same values
      // makes the 128 * sum(x) offset cancel exactly instead of amplifying
      // the split's rounding error.
      const int64_t g = p.group_size;
      const auto* hi = reinterpret_cast<const bf16_t*>(s.hi.data() + i * s.kp);
      const auto* lo = reinterpret_cast<const bf16_t*>(s.lo.data() + i * s.kp);
      const float* xs = s.x.data() + i * s.kp;
      for (int64_t gi = 0; gi < s.groups; ++gi) {
        const int64_t j1 = (gi + 1) * g;
        Vec acc = vzero();
        int64_t j = gi * g;
        for (; j + kW <= j1; j += kW) acc = acc + (bf16_dot ? vload(hi + j) + vload(lo + j) : vload(xs + j));
        float sum = vsum(acc);
        for (; j < j1; ++j) sum += bf16_dot ? to_float(hi[j]) + to_float(lo[j]) : xs[j];
        s.group_sums[i * s.groups + gi] = sum;
      }
    }
  }
}

StagedX stage_x(const WeightOnlyParams& p) {
  StagedX s;
  s.kp = padded_k(p);
  s.groups = p.k / p.group_size;
  const bool bf16_dot = uses_bf16_dot(p);
  if (bf16_dot) {
    s.hi.assign(p.m * s.kp, 0);
    s.lo.assign(p.m * s.kp, 0);
    s.split = p.dtype != DType::kBFloat16;
  } else {
    s.x.assign(p.m * s.kp, 0.0f);
  }
  if (p.format == WeightFormat::kInt4) s.group_sums.assign(p.m * s.groups, 0.0f);
  dispatch_dtype(p.dtype, [&](auto tag) { stage_rows<decltype(tag)>(p, bf16_dot, s); });
  if (uses_int16_x(p)) {
    s.xq_group = p.format == WeightFormat::kInt8 ? kInt8XGroup : p.group_size;
    s.xq_groups = (p.k + s.xq_group - 1) / s.xq_group;
    s.xq.assign(p.m * s.kp, 0);
    s.xq_scale.assign(p.m * s.xq_groups, 0.0f);
    if (stage_int16(p, s)) {
      s.loop = StagedX::Loop::kInt16;
      return s;
    }
    s.xq.clear();
    s.xq_scale.clear();
  }
  if (nf4_planes_possible(p)) {
    for (int64_t i = 0; i < p.m; ++i) reorder_halves(s.x.data() + i * s.kp, s.kp, nf4_plane_column);
    s.loop = StagedX::Loop::kNf4Planes;
  }
  return s;
}

// ------------------------------------------------------------ code decoding
// decode_nibbles: Vec::kWidth bytes at p -> the low-nibble values (columns
// j..j+W of the chunk) and the high-nibble values (columns 32+j..32+j+W).
// decode_int8 / decode_uint8: Vec::kWidth int8 / uint8 values -> fp32.
#if defined(__AVX512F__)
struct Table16 {
  __m512 t;
  explicit Table16(const float* v) : t(_mm512_loadu_ps(v)) {}
};
inline void decode_nibbles(const uint8_t* p, const Table16& tab, Vec& lo, Vec& hi) {
  // permutexvar reads only the low 4 bits of each index, so the high nibble
  // left in the byte needs no mask.
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo.v = _mm512_permutexvar_ps(b, tab.t);
  hi.v = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab.t);
}
inline Vec decode_int8(const int8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
inline Vec decode_uint8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}
#elif defined(__AVX2__)
struct Table16 {
  __m256 lo8, hi8;
  explicit Table16(const float* v) : lo8(_mm256_loadu_ps(v)), hi8(_mm256_loadu_ps(v + 8)) {}
};
// permutevar8x32 reads 3 index bits; bit 3, shifted to the sign bit, picks the half.
inline __m256 lookup16(__m256i idx, const Table16& tab) {
  const __m256 a = _mm256_permutevar8x32_ps(tab.lo8, idx);
  const __m256 b = _mm256_permutevar8x32_ps(tab.hi8, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
inline void decode_nibbles(const uint8_t* p, const Table16& tab, Vec& lo, Vec& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo.v = lookup16(b, tab);
  hi.v = lookup16(_mm256_srli_epi32(b, 4), tab);
}
inline Vec decode_int8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
inline Vec decode_uint8(const uint8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}
#else
struct Table16 {
  const float* t;
  explicit Table16(const float* v) : t(v) {}
};
inline void decode_nibbles(const uint8_t* p, const Table16& tab, Vec& lo, Vec& hi) {
  lo.v = tab.t[*p & 15];
  hi.v = tab.t[*p >> 4];
}
inline Vec decode_int8(const int8_t* p) { return {static_cast<float>(*p)}; }
inline Vec decode_uint8(const uint8_t* p) { return {static_cast<float>(*p)}; }
#endif

// int4 codes are their own values: below AVX-512, converting the nibble
// beats the two-permute lookup (AVX2: 4 shuffle-port ops a vector, which
// bound int4 M=1 at about 1.6 weights a cycle, 14% of copy bandwidth, on a
// 2-core EPYC). AVX-512 keeps its one-permute lookup.
#if defined(__AVX512F__)
inline void decode_int4(const uint8_t* p, const Table16& tab, Vec& lo, Vec& hi) { decode_nibbles(p, tab, lo, hi); }
#elif defined(__AVX2__)
inline void decode_int4(const uint8_t* p, const Table16&, Vec& lo, Vec& hi) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  lo.v = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi.v = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#else
inline void decode_int4(const uint8_t* p, const Table16&, Vec& lo, Vec& hi) {
  lo.v = static_cast<float>(*p & 15);
  hi.v = static_cast<float>(*p >> 4);
}
#endif

// Row r of the tile starting at row0; a last partial tile repeats the final
// row (its results are computed but not stored).
inline int64_t tile_row(const WeightOnlyParams& p, int64_t row0, int r) { return std::min(row0 + r, p.n - 1); }

// The kTileN weight rows of a tile from row0: codes, then per group scales
// and (int4) zero points; int8 has one group.
struct TileRows {
  const uint8_t* codes[kTileN];
  const float* scales[kTileN];
  const uint8_t* zeros[kTileN];  // null without zero points
  TileRows(const WeightOnlyParams& p, int64_t groups, int64_t row0) {
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) {
      const int64_t row = tile_row(p, row0, r);
      codes[r] = p.qweight + row * p.qweight_row_stride;
      scales[r] = p.scales + row * groups;
      zeros[r] = p.zeros ? p.zeros + row * groups : nullptr;
    }
  }
};

// A tile reads kTileN weight rows side by side, more streams than the
// hardware prefetcher runs far enough ahead on; each row also prefetches the
// line it will read one tile later (the same column of row + kTileN).
// Into L2, not L1: a tile ahead is 8-44 KiB of weights, as much as L1 holds,
// so T0 prefetches evicted x and the lines about to be read. Measured on the
// Zen 4, int4 M=1 from DRAM: no prefetch 15 GB/s, T0 19-21, T1 27-30.
TK_PREFETCH_HELPER void prefetch_next_tile(const WeightOnlyParams& p, const void* at) {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_prefetch(static_cast<const char*>(at) + kTileN * p.qweight_row_stride, _MM_HINT_T1);
#else
  (void)p;
  (void)at;
#endif
}

// ------------------------------------------------------------ fp32 inner loops
// Every loop over a register tile (rows r, x rows i, chains c), here and in
// the bf16 loop below, is fully unrolled by pragma: left as loops, GCC -O3's
// loop vectoriser takes some of them and the accumulators move to the stack,
// stored on every iteration.
// A register tile of kTileN weight rows by MB rows of x: each x vector loaded
// serves kTileN weight rows and each decoded weight vector MB rows of x, so
// neither L1 loads nor decoding bound the loop. Weights are scaled while
// decoding (w = code * s - z * s), so no per-group fold is needed.
// y[r * MB + i] = sum_k x[m0 + i, k] * W[row0 + r, k]  (zero points included).
// Below AVX-512 the tile runs as passes of kSub4 weight rows: four rows'
// scales, zero terms and accumulators do not fit 16 vector registers
// (measured on a 2-core AVX2 EPYC, int4 M=1: 1.3x ATen with four rows a
// pass, 1.6x with two).
#if defined(__AVX512F__)
constexpr int kSub4 = kTileN;
#else
constexpr int kSub4 = 2;
#endif

template <int MB, bool kInt4>
void tile_4bit_rows(const WeightOnlyParams& p, const StagedX& sx, const TileRows& t, int r0, int64_t m0, float* y) {
  constexpr int W = Vec::kWidth;
  constexpr int C = MB <= 2 ? 2 : 1;  // accumulator chains per (row, x row): low / high half
  const Table16 tab(code_values(p.format));
  const bool has_zero = p.format == WeightFormat::kInt4;
  const uint8_t* const* w = t.codes + r0;
  const float* const* sc = t.scales + r0;
  const uint8_t* const* zr = t.zeros + r0;
  const float* xr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = sx.x.data() + (m0 + i) * sx.kp;
  Vec acc[kSub4][MB][C];
#pragma GCC unroll 16
  for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[r][i][c] = vzero();
  for (int64_t col = 0; col < sx.kp; col += kNibbleChunk) {
    // A k that is 32 mod 64 leaves the last high half as padding (x is 0 there).
    const bool has_hi = col + 32 < p.k;
    const int64_t g_lo = col / p.group_size, g_hi = has_hi ? (col + 32) / p.group_size : g_lo;
    Vec s_lo[kSub4], s_hi[kSub4], b_lo[kSub4], b_hi[kSub4];
#pragma GCC unroll 16
    for (int r = 0; r < kSub4; ++r) {
      s_lo[r] = vset1(sc[r][g_lo]);
      s_hi[r] = vset1(sc[r][g_hi]);
      b_lo[r] = vset1(has_zero ? -static_cast<float>(zr[r][g_lo]) * sc[r][g_lo] : 0.0f);
      b_hi[r] = vset1(has_zero ? -static_cast<float>(zr[r][g_hi]) * sc[r][g_hi] : 0.0f);
    }
    for (int j = 0; j < 32; j += W) {
      Vec xl[MB], xh[MB];
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        xl[i] = vload(xr[i] + col + j);
        xh[i] = vload(xr[i] + col + 32 + j);
      }
#pragma GCC unroll 16
      for (int r = 0; r < kSub4; ++r) {
        if (j == 0 && (col & kNibbleChunk) != 0) prefetch_next_tile(p, w[r] + col / 2);
        Vec lo, hi;
        if constexpr (kInt4)
          decode_int4(w[r] + col / 2 + j, tab, lo, hi);
        else
          decode_nibbles(w[r] + col / 2 + j, tab, lo, hi);
        lo = vfma(lo, s_lo[r], b_lo[r]);
        hi = vfma(hi, s_hi[r], b_hi[r]);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          acc[r][i][0] = vfma(lo, xl[i], acc[r][i][0]);
          acc[r][i][C - 1] = vfma(hi, xh[i], acc[r][i][C - 1]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) y[(r0 + r) * MB + i] = vsum(C == 2 ? acc[r][i][0] + acc[r][i][C - 1] : acc[r][i][0]);
}

// sum_g s_g z_g X_g for one weight row (scales sc, zero points zr) and row
// x_row of x: the zero points' share of an int4 product whose codes were
// multiplied unscaled (X_g: the group sums of x).
inline float int4_zero_term(const StagedX& sx, const float* sc, const uint8_t* zr, int64_t x_row) {
  const float* xs = sx.group_sums.data() + x_row * sx.groups;
  Vec zt = vzero();
  int64_t g = 0;
  for (; g + kW <= sx.groups; g += kW) zt = vfma(vload(sc + g) * decode_uint8(zr + g), vload(xs + g), zt);
  float sum = vsum(zt);
  for (; g < sx.groups; ++g) sum += sc[g] * static_cast<float>(zr[g]) * xs[g];
  return sum;
}

// The same product for groups of whole 64-column chunks (int4 g64 / g128,
// nf4): codes are multiplied with x unscaled and each group's sums scaled
// once, and int4's zero points come off at the end from x's group sums:
//   sum_g s_g * (sum_{k in g} q_k x_k) - sum_g s_g z_g X_g.
// Per 16 weights that drops the scaling FMAs of the loop above, and per
// chunk its group lookups (two 64-bit divisions and eight scalar loads):
// int4 M=1 on an AVX2 EPYC, 4096 -> 11008: 2.45 -> 1.26 ms with the weight
// in cache, 2.7 -> 1.9-2.1 ms from DRAM.
// kHalves: groups of 32 columns, for 1-2 rows of x. A chunk's halves are
// groups 2c and 2c + 1, so each half's sum is scaled on its own. Before,
// these took the loop above, which scales every weight and looks up two
// groups per chunk: 11.9 G weights/s on one Zen 4 core (AVX-512, fp32 x,
// weight in L3), 11.8 forced to AVX2, half of g128's rate and too slow for
// DRAM; now 18.8-20.2 and 17-19 (g128: 20.8 and 21-22). More rows of x keep
// the loop above: its scaled weights serve them all, where per-half sums
// would spill.
template <int MB, bool kInt4, bool kHalves>
void tile_4bit_grouped(const WeightOnlyParams& p, const StagedX& sx, const TileRows& t, int r0, int64_t m0,
                       float* y) {
  static_assert(!kHalves || MB <= 2, "more rows of x with groups of 32 take tile_4bit_rows");
  constexpr int W = Vec::kWidth;
  // accumulator chains per (row, x row): low / high half
  constexpr int C = MB == 1 || kHalves ? 2 : 1;
  const Table16 tab(code_values(p.format));
  const uint8_t* const* w = t.codes + r0;
  const float* const* sc = t.scales + r0;
  const float* xr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = sx.x.data() + (m0 + i) * sx.kp;
  Vec total[kSub4][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) total[r][i] = vzero();
  // The columns of one step: a group, or (kHalves) one chunk, two groups.
  const int64_t step = kHalves ? kNibbleChunk : p.group_size;
  for (int64_t g = 0, g_col = 0; g_col < sx.kp; g += kHalves ? 2 : 1, g_col += step) {
    Vec acc[kSub4][MB][C];
#pragma GCC unroll 16
    for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) acc[r][i][c] = vzero();
    for (int64_t col = g_col; col < g_col + step; col += kNibbleChunk) {
      for (int j = 0; j < 32; j += W) {
        Vec xl[MB], xh[MB];
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          xl[i] = vload(xr[i] + col + j);
          xh[i] = vload(xr[i] + col + 32 + j);
        }
#pragma GCC unroll 16
        for (int r = 0; r < kSub4; ++r) {
          if (j == 0 && (col & kNibbleChunk) != 0) prefetch_next_tile(p, w[r] + col / 2);
          Vec lo, hi;
          if constexpr (kInt4)
            decode_int4(w[r] + col / 2 + j, tab, lo, hi);
          else
            decode_nibbles(w[r] + col / 2 + j, tab, lo, hi);
#pragma GCC unroll 16
          for (int i = 0; i < MB; ++i) {
            acc[r][i][0] = vfma(lo, xl[i], acc[r][i][0]);
            acc[r][i][C - 1] = vfma(hi, xh[i], acc[r][i][C - 1]);
          }
        }
      }
    }
    if constexpr (kHalves) {
      // A k of 32 mod 64 leaves the last high half as padding: x is 0 there,
      // so its sum is 0, but its group (past the row's last) has no scale.
      const bool has_hi = g + 1 < sx.groups;
#pragma GCC unroll 16
      for (int r = 0; r < kSub4; ++r) {
        const Vec s_lo = vset1(sc[r][g]), s_hi = vset1(has_hi ? sc[r][g + 1] : 0.0f);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) total[r][i] = vfma(acc[r][i][1], s_hi, vfma(acc[r][i][0], s_lo, total[r][i]));
      }
    } else {
#pragma GCC unroll 16
      for (int r = 0; r < kSub4; ++r) {
        const Vec s = vset1(sc[r][g]);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) total[r][i] = vfma(C == 2 ? acc[r][i][0] + acc[r][i][C - 1] : acc[r][i][0], s, total[r][i]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const float zero_term = kInt4 ? int4_zero_term(sx, sc[r], t.zeros[r0 + r], m0 + i) : 0.0f;
      y[(r0 + r) * MB + i] = vsum(total[r][i]) - zero_term;
    }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// ------------------------------------------------------------ nf4 on AVX2: byte-plane lookups
// AVX2 has no 16-entry fp32 permute: the lookup16 above costs two permutes,
// a shift and a blend per 8 codes, and bound nf4 M=1 at 1.7 weights a cycle.
// vpshufb looks up 32 byte indices at once in a 16-byte table (per 128-bit
// lane); four tables, one per byte of the fp32 codebook, and two rounds of
// unpacks give 32 exact fp32 values in 12 shuffles, in the order of
// nf4_plane_column.
struct Nf4Planes {
  __m256i plane[4];
  Nf4Planes() {
    for (int b = 0; b < 4; ++b) {
      alignas(16) uint8_t bytes[16];
      for (int c = 0; c < 16; ++c) {
        uint32_t bits;
        std::memcpy(&bits, &kNf4Codebook[c], 4);
        bytes[c] = static_cast<uint8_t>(bits >> (8 * b));
      }
      plane[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes)));
    }
  }
};

// codes: 32 bytes, each a code 0..15 -> out: their 32 values.
inline void nf4_decode_half(__m256i codes, const Nf4Planes& t, __m256 out[4]) {
  const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], codes), b1 = _mm256_shuffle_epi8(t.plane[1], codes);
  const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], codes), b3 = _mm256_shuffle_epi8(t.plane[3], codes);
  const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
  out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
  out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
  out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

// tile_4bit_grouped for nf4 with x staged in plane order, one weight row at
// a time: the four plane tables take 4 of the 16 vector registers, and with
// two rows' accumulators GCC kept them on the stack, a store and a reload in
// every dependency chain (3.2 weights a cycle, against 5.3 for the shuffles).
template <int MB>
void tile_nf4_planes(const WeightOnlyParams& p, const StagedX& sx, const TileRows& t, int r0, int64_t m0, float* y) {
  constexpr int C = MB == 1 ? 4 : 2;  // accumulator chains per x row
  static const Nf4Planes planes;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const float* xr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = sx.x.data() + (m0 + i) * sx.kp;
  for (int r = r0; r < r0 + kSub4; ++r) {
    const uint8_t* w = t.codes[r];
    const float* sc = t.scales[r];
    __m256 total[MB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) total[i] = _mm256_setzero_ps();
    for (int64_t g = 0, g_col = 0; g < sx.groups; ++g, g_col += p.group_size) {
      __m256 acc[MB][C];
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) acc[i][c] = _mm256_setzero_ps();
      for (int64_t col = g_col; col < g_col + p.group_size; col += kNibbleChunk) {
        if ((col & kNibbleChunk) != 0) prefetch_next_tile(p, w + col / 2);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + col / 2));
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {
          __m256 v[4];
          nf4_decode_half(_mm256_and_si256(half ? _mm256_srli_epi16(b, 4) : b, low4), planes, v);
#pragma GCC unroll 16
          for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
            for (int f = 0; f < 4; ++f) {
              const int c = C == 4 ? half * 2 + f % 2 : half;
              acc[i][c] = _mm256_fmadd_ps(v[f], _mm256_loadu_ps(xr[i] + col + 32 * half + 8 * f), acc[i][c]);
            }
        }
      }
      const __m256 s = _mm256_set1_ps(sc[g]);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        __m256 sum = acc[i][0];
#pragma GCC unroll 4
        for (int c = 1; c < C; ++c) sum = _mm256_add_ps(sum, acc[i][c]);
        total[i] = _mm256_fmadd_ps(sum, s, total[i]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) y[r * MB + i] = vsum(Vec{total[i]});
  }
}
#endif

#if defined(__AVX2__)
// ------------------------------------------------------------ 4-bit codes x int16 (AVX2, AVX-512)
// Weight rows a pass of the int16 loops: with more, two rows of x (AVX2)
// or the halves' accumulators (AVX-512, groups of 32) would spill.
constexpr int kI16Rows = 2;

// int4: vpmaddwd multiplies 16 pairs of int16 and adds each pair: 16
// weights per 256 bits, against 8 per FMA after an int -> float conversion.
// Codes zero-extended to 16 bits hold (hi << 4 | lo) of one byte, so an AND
// and a shift give the low-half and high-half codes of Int16Dot::kLanes
// bytes. Per group, the int32 sums become fp32 and are scaled by s_w * s_x;
// zero points as in tile_4bit_grouped. A lane of one half's sum adds
// group_size / 16 products of at most 15 * 32767 (AVX-512: half as many),
// both halves under 2^31 for groups up to 32768. kHalves: groups of 32, so
// a chunk's halves are groups 2c and 2c + 1 and each half's sum is scaled
// on its own (g32, bf16 x, the Zen 4 forced to AVX2, one core, weight in
// L3: 24-26 G weights/s, where the fp32 halves loop ran 13-19 and g128
// here runs 36).
template <int MB, bool kHalves, int kGroupChunks = 0>
void tile_int4_i16(const WeightOnlyParams& p, const StagedX& sx, const TileRows& t, int r0, int64_t m0, float* y) {
  using D = Int16Dot;
  const uint8_t* const* w = t.codes + r0;
  const float* const* sc = t.scales + r0;
  const int16_t* xr[MB];
  const float* xs[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    xr[i] = sx.xq.data() + (m0 + i) * sx.kp;
    xs[i] = sx.xq_scale.data() + (m0 + i) * sx.groups;
  }
  Vec total[kI16Rows][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kI16Rows; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) total[r][i] = vzero();
  // The columns of one step: a group, or (kHalves) one chunk, two groups.
  const int64_t step = kHalves ? kNibbleChunk : p.group_size;
  for (int64_t g = 0, g_col = 0; g_col < sx.kp; g += kHalves ? 2 : 1, g_col += step) {
    D::V acc[kI16Rows][MB][2];  // low / high half of each chunk
#pragma GCC unroll 16
    for (int r = 0; r < kI16Rows; ++r)
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) acc[r][i][0] = acc[r][i][1] = D::zero();
    const int64_t chunks = kGroupChunks > 0 ? kGroupChunks : step / kNibbleChunk;
#pragma GCC unroll 4
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t col = g_col + c * kNibbleChunk;
#pragma GCC unroll 2
      for (int j = 0; j < 32; j += D::kLanes) {
        D::V xl[MB], xh[MB];
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          xl[i] = D::load(xr[i] + col + j);
          xh[i] = D::load(xr[i] + col + 32 + j);
        }
#pragma GCC unroll 16
        for (int r = 0; r < kI16Rows; ++r) {
          if (j == 0 && (col & kNibbleChunk) != 0) prefetch_next_tile(p, w[r] + col / 2);
          const D::V b = D::widen_pairs(w[r] + col / 2 + j);
          const D::V lo = D::low_nibbles(b), hi = D::high_nibbles(b);
#pragma GCC unroll 16
          for (int i = 0; i < MB; ++i) {
            acc[r][i][0] = D::dot(acc[r][i][0], lo, xl[i]);
            acc[r][i][1] = D::dot(acc[r][i][1], hi, xh[i]);
          }
        }
      }
    }
    if constexpr (kHalves) {
      // A k of 32 mod 64 leaves the last high half as padding (its sum is
      // 0, and its group, past the row's last, has no scales).
      const bool has_hi = g + 1 < sx.groups;
#pragma GCC unroll 16
      for (int r = 0; r < kI16Rows; ++r)
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          const float s_hi = has_hi ? sc[r][g + 1] * xs[i][g + 1] : 0.0f;
          total[r][i] = vfma(D::to_float(acc[r][i][0]), vset1(sc[r][g] * xs[i][g]), total[r][i]);
          total[r][i] = vfma(D::to_float(acc[r][i][1]), vset1(s_hi), total[r][i]);
        }
    } else {
#pragma GCC unroll 16
      for (int r = 0; r < kI16Rows; ++r)
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i)
          total[r][i] =
              vfma(D::to_float(D::add(acc[r][i][0], acc[r][i][1])), vset1(sc[r][g] * xs[i][g]), total[r][i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kI16Rows; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      y[(r0 + r) * MB + i] = vsum(total[r][i]) - int4_zero_term(sx, sc[r], t.zeros[r0 + r], m0 + i);
    }
}

#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// ------------------------------------------------------------ nf4 x int16 on AVX2
// The codebook as int16 (round(v * 2^13)), its low and high bytes as two
// vpshufb tables: 4 shuffles look up 32 codes (the fp32 planes take 12).
struct Nf4Int16 {
  __m256i lo, hi;
  Nf4Int16() {
    alignas(16) uint8_t lb[16], hb[16];
    for (int c = 0; c < 16; ++c) {
      const auto v = static_cast<uint16_t>(static_cast<int16_t>(std::lrint(kNf4Codebook[c] * kNf4Int16Unit)));
      lb[c] = static_cast<uint8_t>(v);
      hb[c] = static_cast<uint8_t>(v >> 8);
    }
    lo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lb)));
    hi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hb)));
  }
  static constexpr float kNf4Int16Unit = 8192.0f;
};

// The four vpmaddwd sums (int32 lanes) of one 64-code chunk of a weight row
// with each of MB rows of x, the chunk's columns from col.
template <int MB>
inline void nf4_chunk_sums(const Nf4Int16& table, const uint8_t* codes, const int16_t* const* xr, int64_t col,
                           __m256i* sum) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + col / 2));
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
    const __m256i c4 = _mm256_and_si256(half ? _mm256_srli_epi16(b, 4) : b, low4);
    const __m256i vl = _mm256_shuffle_epi8(table.lo, c4), vh = _mm256_shuffle_epi8(table.hi, c4);
    const __m256i a = _mm256_unpacklo_epi8(vl, vh), c = _mm256_unpackhi_epi8(vl, vh);
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      const int16_t* x = xr[i] + col + 32 * half;
      const __m256i d =
          _mm256_add_epi32(_mm256_madd_epi16(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
                           _mm256_madd_epi16(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
      sum[i] = half ? _mm256_add_epi32(sum[i], d) : d;
    }
  }
}

// y = sum_g absmax_g * s_x,g / 2^13 * sum_{k in g} c_k x^_k. A chunk's four
// vpmaddwd sums (at most 4 * 2 * 8192 * 32767 < 2^31 a lane) become fp32
// once per chunk, so any group size is safe. Groups of one chunk (nf4's
// usual block of 64) run as one flat loop over chunks that scales each
// chunk's sums straight into the totals: the nested loop's per-group setup
// cost 5-15% (the Zen 4 forced to AVX2, M=1, bench shapes).
template <int MB>
void tile_nf4_i16(const WeightOnlyParams& p, const StagedX& sx, const TileRows& t, int r0, int64_t m0, float* y) {
  static const Nf4Int16 table;
  const uint8_t* const* w = t.codes + r0;
  const float* const* sc = t.scales + r0;
  const int16_t* xr[MB];
  const float* xs[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    xr[i] = sx.xq.data() + (m0 + i) * sx.kp;
    xs[i] = sx.xq_scale.data() + (m0 + i) * sx.groups;
  }
  __m256 total[kSub4][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) total[r][i] = _mm256_setzero_ps();
  constexpr float kUnit = 1.0f / Nf4Int16::kNf4Int16Unit;
  if (p.group_size == kNibbleChunk) {
    for (int64_t g = 0; g < sx.groups; ++g) {
      const int64_t col = g * kNibbleChunk;
      __m256 x_scale[MB];
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) x_scale[i] = _mm256_set1_ps(xs[i][g] * kUnit);
#pragma GCC unroll 16
      for (int r = 0; r < kSub4; ++r) {
        if ((g & 1) != 0) prefetch_next_tile(p, w[r] + col / 2);
        __m256i sum[MB];
        nf4_chunk_sums<MB>(table, w[r], xr, col, sum);
        const __m256 s = _mm256_broadcast_ss(sc[r] + g);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i)
          total[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i]), _mm256_mul_ps(s, x_scale[i]), total[r][i]);
      }
    }
  } else {
    for (int64_t g = 0, g_col = 0; g < sx.groups; ++g, g_col += p.group_size) {
      __m256 acc[kSub4][MB];
#pragma GCC unroll 16
      for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_setzero_ps();
      for (int64_t col = g_col; col < g_col + p.group_size; col += kNibbleChunk) {
#pragma GCC unroll 16
        for (int r = 0; r < kSub4; ++r) {
          if ((col & kNibbleChunk) != 0) prefetch_next_tile(p, w[r] + col / 2);
          __m256i sum[MB];
          nf4_chunk_sums<MB>(table, w[r], xr, col, sum);
#pragma GCC unroll 16
          for (int i = 0; i < MB; ++i) acc[r][i] = _mm256_add_ps(acc[r][i], _mm256_cvtepi32_ps(sum[i]));
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i)
          total[r][i] = _mm256_fmadd_ps(acc[r][i], _mm256_set1_ps(sc[r][g] * xs[i][g] * kUnit), total[r][i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kSub4; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) y[(r0 + r) * MB + i] = vsum(Vec{total[r][i]});
}
#endif

template <int MB, bool kInt4>
void tile_4bit_fp32(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y) {
  const TileRows t(p, sx.groups, row0);
#if defined(__AVX2__)
  if (sx.loop == StagedX::Loop::kInt16) {
    for (int r0 = 0; r0 < kTileN; r0 += kI16Rows) {
      if constexpr (!kInt4) {
#if !defined(__AVX512F__)  // AVX-512 never stages nf4 as int16 (uses_int16_x)
        tile_nf4_i16<MB>(p, sx, t, r0, m0, y);
#endif
      } else if (p.group_size == 32)
        tile_int4_i16<MB, true>(p, sx, t, r0, m0, y);
      else if (p.group_size == 2 * kNibbleChunk)
        tile_int4_i16<MB, false, 2>(p, sx, t, r0, m0, y);
      else
        tile_int4_i16<MB, false>(p, sx, t, r0, m0, y);
    }
    return;
  }
#endif
  const bool grouped = p.group_size % kNibbleChunk == 0 && (!kInt4 || p.zeros != nullptr);
  for (int r0 = 0; r0 < kTileN; r0 += kSub4) {
#if defined(__AVX2__) && !defined(__AVX512F__)
    if (!kInt4 && sx.loop == StagedX::Loop::kNf4Planes) {
      tile_nf4_planes<MB>(p, sx, t, r0, m0, y);
      continue;
    }
#endif
    if (grouped) {
      tile_4bit_grouped<MB, kInt4, false>(p, sx, t, r0, m0, y);
      continue;
    }
    if constexpr (MB <= 2) {
      if (p.group_size == 32 && (!kInt4 || p.zeros != nullptr)) {
        tile_4bit_grouped<MB, kInt4, true>(p, sx, t, r0, m0, y);
        continue;
      }
    }
    tile_4bit_rows<MB, kInt4>(p, sx, t, r0, m0, y);
  }
}

template <int MB>
void tile_int8_fp32(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y) {
  constexpr int W = Vec::kWidth;
  const TileRows t(p, 1, row0);
  const int8_t* w[kTileN];
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r) w[r] = reinterpret_cast<const int8_t*>(t.codes[r]);
  const float* xr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = sx.x.data() + (m0 + i) * sx.kp;
  Vec acc[kTileN][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[r][i] = vzero();
  const int64_t kv = p.k / W * W;
  int64_t j = 0;
  for (; j < kv; j += W) {
    Vec xv[MB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) xv[i] = vload(xr[i] + j);
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) {
      if (j % 64 == 0) prefetch_next_tile(p, w[r] + j);
      const Vec wv = decode_int8(w[r] + j);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) acc[r][i] = vfma(wv, xv[i], acc[r][i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) {
      float tail = 0.0f;
      for (int64_t t = j; t < p.k; ++t) tail += static_cast<float>(w[r][t]) * xr[i][t];
      y[r * MB + i] = (vsum(acc[r][i]) + tail) * t.scales[r][0];
    }
}

#if defined(__AVX512BF16__)
// ------------------------------------------------------------ bf16 dot-product loops (int4)
// Codes are offset by 128 (bf16 bits 0x4300 | q), so the group's partial sums
// are folded with its scale and the zero point (plus 128) is applied per row
// from the group sums of x.
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }
inline __m512bh load_bh(const uint16_t* p) { return as_bh(_mm512_loadu_si512(p)); }

// The bf16 loops' prefetch: the next tile's rows (one contiguous run of
// kTileN row strides) swept front to back, lines_per_chunk lines per 64-
// column chunk of this tile, so the prefetches form one sequential stream
// rather than kTileN streams a row stride apart. Zen 5, int4 M=1 from DRAM,
// 2 threads: aten / torchkiln time 0.85-0.93 against 0.81-0.87 (noisy runs).
struct NextTileSweep {
  const char* next;
  int64_t lines_per_chunk;
  NextTileSweep(const WeightOnlyParams& p, const uint8_t* tile_codes, int64_t chunks)
      : next(reinterpret_cast<const char*>(tile_codes) + kTileN * p.qweight_row_stride),
        lines_per_chunk((kTileN * p.qweight_row_stride + 64 * chunks - 1) / (64 * chunks)) {}
  // Called once per (chunk c, tile row r): spreads a chunk's lines over the rows.
  TK_PREFETCH_HELPER void prefetch(int64_t c, int r) const {
    for (int64_t l = r; l < lines_per_chunk; l += kTileN) _mm_prefetch(next + (c * lines_per_chunk + l) * 64, _MM_HINT_T1);
  }
  // The next tile's scales and zero points (contiguous runs of kTileN rows'
  // groups), once at the start of a tile: left to demand misses, each group
  // boundary of the first rows waited on DRAM. Zen 4, int4 M=1 from DRAM,
  // in-process A/B: 0.95-1.05x at k = 4096, 1.08-1.09x at k = 11008 (86
  // groups a row). (Until TK_PREFETCH_HELPER, GCC deleted every call.)
  TK_PREFETCH_HELPER static void prefetch_groups(const WeightOnlyParams& p, int64_t row0, int64_t groups) {
    const int64_t next = (row0 + kTileN) * groups, bytes = kTileN * groups * static_cast<int64_t>(sizeof(float));
    // Past the last tile these point beyond the arrays; prefetches never fault.
    const char* scales = reinterpret_cast<const char*>(p.scales + next);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(scales + b, _MM_HINT_T1);
    if (p.zeros == nullptr) return;
    const char* zeros = reinterpret_cast<const char*>(p.zeros + next);
    for (int64_t b = 0; b < bytes / static_cast<int64_t>(sizeof(float)); b += 64) _mm_prefetch(zeros + b, _MM_HINT_T1);
  }
};

// The int4 bf16 loops' end: subtracts sum_g s_g * (z_g + 128) * sum_{k in g} x_k
// from the scaled sums, 16 groups per vector, and reduces them into y. (As
// a scalar loop per output, one dependent FMA per group, this cost as much
// as the dot products: int4 M=8, 4096 -> 11008, 3.8 ms against 2.7.)
template <int MB>
void int4_bf16_finish(const StagedX& sx, const TileRows& t, int64_t m0, __m512 (&total)[kTileN][MB], float* y) {
  const float* xs[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xs[i] = sx.group_sums.data() + (m0 + i) * sx.groups;
  for (int64_t g = 0; g < sx.groups; g += 16) {
    const __mmask16 lanes = sx.groups - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (sx.groups - g)) - 1);
    __m512 x_sum[MB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) x_sum[i] = _mm512_maskz_loadu_ps(lanes, xs[i] + g);
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) {
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, t.zeros[r] + g)));
      const __m512 sz = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, t.scales[r] + g), _mm512_add_ps(z, _mm512_set1_ps(128.0f)));
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) total[r][i] = _mm512_fnmadd_ps(sz, x_sum[i], total[r][i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) y[r * MB + i] = _mm512_reduce_add_ps(total[r][i]);
}

// kHalves: groups of 32 columns (GPTQ's and llama.cpp Q4_0's size). A
// chunk's halves belong to groups 2c and 2c + 1, so each half sums on its
// own and is scaled at the chunk's end: two FMAs a chunk per (weight row, x
// row) where larger groups pay one a group. (g32 used to take the fp32
// loop, which scales every weight: M=1 bf16 at 10-14 GB/s, against 26-30
// at g128; now 1.8-2.3x faster.)
template <int MB, bool kSplit, bool kHalves>
void tile_int4_bf16(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), base = _mm512_set1_epi16(0x4300);  // bf16(128.0)
  const TileRows t(p, sx.groups, row0);
  const auto& w = t.codes;
  const auto& sc = t.scales;
  const uint16_t* hr[MB];
  const uint16_t* lr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    hr[i] = sx.hi.data() + (m0 + i) * sx.kp;
    lr[i] = sx.lo.data() + (m0 + i) * sx.kp;
  }
  __m512 total[kTileN][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) total[r][i] = _mm512_setzero_ps();
  // The chunks of one step: a group, or (kHalves) one chunk, two groups.
  const int64_t chunks_per_step = kHalves ? 1 : p.group_size / kNibbleChunk, chunks = sx.kp / kNibbleChunk;
  constexpr int H = kHalves ? 2 : 1;  // sums per (weight row, x row): both halves, or low / high
  const NextTileSweep sweep(p, w[0], chunks);
  sweep.prefetch_groups(p, row0, sx.groups);
  for (int64_t g = 0, c0 = 0; c0 < chunks; g += H, c0 += chunks_per_step) {
    __m512 acc[kTileN][MB][H];
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) acc[r][i][h] = _mm512_setzero_ps();
    for (int64_t c = c0; c < c0 + chunks_per_step; ++c) {
      const int64_t o = c * kNibbleChunk;
      __m512bh xh_lo[MB], xh_hi[MB], xl_lo[MB], xl_hi[MB];
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        xh_lo[i] = load_bh(hr[i] + o);
        xh_hi[i] = load_bh(hr[i] + o + 32);
        if (kSplit) {
          xl_lo[i] = load_bh(lr[i] + o);
          xl_hi[i] = load_bh(lr[i] + o + 32);
        }
      }
#pragma GCC unroll 16
      for (int r = 0; r < kTileN; ++r) {
        sweep.prefetch(c, r);
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + o / 2)));
        const __m512bh lo = as_bh(_mm512_ternarylogic_epi32(b, low4, base, 0xEA));  // (b & 15) | base
        const __m512bh hi = as_bh(_mm512_or_si512(_mm512_srli_epi16(b, 4), base));
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) {
          acc[r][i][0] = _mm512_dpbf16_ps(acc[r][i][0], lo, xh_lo[i]);
          acc[r][i][H - 1] = _mm512_dpbf16_ps(acc[r][i][H - 1], hi, xh_hi[i]);
          if (kSplit) {
            acc[r][i][0] = _mm512_dpbf16_ps(acc[r][i][0], lo, xl_lo[i]);
            acc[r][i][H - 1] = _mm512_dpbf16_ps(acc[r][i][H - 1], hi, xl_hi[i]);
          }
        }
      }
    }
    // (kHalves) a k of 32 mod 64 leaves the last high half as padding: its
    // sum is 0, and its group, past the row's last, has no scale.
    const bool has_hi = kHalves && g + 1 < sx.groups;
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) {
      const __m512 s = _mm512_set1_ps(sc[r][g]);
      const __m512 s_hi = _mm512_set1_ps(has_hi ? sc[r][g + 1] : 0.0f);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        total[r][i] = _mm512_fmadd_ps(acc[r][i][0], s, total[r][i]);
        if (kHalves) total[r][i] = _mm512_fmadd_ps(acc[r][i][H - 1], s_hi, total[r][i]);
      }
    }
  }
  int4_bf16_finish<MB>(sx, t, m0, total, y);
}

// nf4 codes through a 16-entry table of the codebook in bf16 (vpermw, 32
// codes per lookup), dot products with bf16 x, one absmax per 64-column
// chunk (blocks of 64 or more). The codes' rounding to bf16 (2^-9 relative,
// as in the dense path's bf16 weights) stays below the bf16 output's own.
__m512i nf4_bf16_table() {
  alignas(64) uint16_t t[32] = {};
  for (int c = 0; c < 16; ++c) t[c] = from_float<bf16_t>(kNf4Codebook[c]).bits;
  return _mm512_load_si512(t);
}

// Columns o..o+63 of MB staged bf16 rows of x: 0-31 to lo, 32-63 to hi.
template <int MB>
inline __attribute__((always_inline)) void load_x_chunk(const uint16_t* const* xr, int64_t o, __m512bh* lo,
                                                         __m512bh* hi) {
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    lo[i] = load_bh(xr[i] + o);
    hi[i] = load_bh(xr[i] + o + 32);
  }
}

// The 64 codes of a chunk (32 bytes) looked up in a table of 16 bf16 values:
// columns 0-31 (low nibbles) to lo, 32-63 (high nibbles) to hi.
inline void lookup_nibbles(const uint8_t* chunk, __m512i table, __m512bh& lo, __m512bh& hi) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk)));
  lo = as_bh(_mm512_permutexvar_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x000F)), table));
  hi = as_bh(_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table));
}

template <int MB>
void tile_nf4_bf16(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y) {
  static const __m512i table = nf4_bf16_table();
  const TileRows t(p, sx.groups, row0);
  const auto& w = t.codes;
  const auto& sc = t.scales;
  const uint16_t* xr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = sx.hi.data() + (m0 + i) * sx.kp;
  __m512 total[kTileN][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) total[r][i] = _mm512_setzero_ps();
  const int64_t chunks = sx.kp / kNibbleChunk, chunks_per_group = p.group_size / kNibbleChunk;
  const NextTileSweep sweep(p, w[0], chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t o = c * kNibbleChunk, g = c / chunks_per_group;
    __m512bh x_lo[MB], x_hi[MB];
    load_x_chunk<MB>(xr, o, x_lo, x_hi);
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) {
      sweep.prefetch(c, r);
      __m512bh w_lo, w_hi;
      lookup_nibbles(w[r] + o / 2, table, w_lo, w_hi);
      const __m512 s = _mm512_set1_ps(sc[r][g]);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i)
        total[r][i] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w_lo, x_lo[i]), w_hi, x_hi[i]), s, total[r][i]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) y[r * MB + i] = _mm512_reduce_add_ps(total[r][i]);
}

// 4-bit codes against 3-4 rows of bf16 x (one pass of kRowsPerPass): the
// code values (nf4: the codebook; int4: q - zero) times the group's scale,
// rounded to bf16 once per (weight row, group), are the table the codes
// look up, so a whole row's dot products accumulate in one register: no
// per-group FMA per row of x, and for int4 no zero-point term and one pass
// where tile_int4_bf16 takes two (its totals would spill).
// The weight is rounded to bf16 exactly as dequantize(qw, bf16) rounds it,
// so the result carries the error of x @ W_bf16.T in plain PyTorch (int4 g128
// M=16: relative 2.3e-3 where tile_int4_bf16's exact codes give 1.6e-3;
// both mostly the bf16 output's rounding). Zen 4, from DRAM, against two
// passes of 2 rows of the loops above: nf4 M=3 1.22-1.31x, M=8 1.29-1.34x,
// M=16 1.35-1.37x; int4 M=4 1.13-1.24x, M=16 1.07-1.15x faster. For 1-2
// rows a table per row costs more than the FMAs it saves (nf4 M=1 3-7%
// slower), so those keep the loops above.
template <int MB, bool kInt4>
void tile_4bit_bf16_scaled(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y) {
  static_assert(MB > 2 && MB <= kRowsPerPass, "fewer rows take tile_nf4_bf16 / tile_int4_bf16");
  const __m512 values = _mm512_loadu_ps(kInt4 ? kInt4Values : kNf4Codebook);
  const TileRows t(p, sx.groups, row0);
  const uint16_t* xr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = sx.hi.data() + (m0 + i) * sx.kp;
  __m512 acc[kTileN][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_setzero_ps();
  const int64_t chunks_per_group = p.group_size / kNibbleChunk;
  const NextTileSweep sweep(p, t.codes[0], sx.kp / kNibbleChunk);
  NextTileSweep::prefetch_groups(p, row0, sx.groups);
  for (int64_t g = 0; g < sx.groups; ++g) {
    __m512i table[kTileN];
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) {
      table[r] = scaled_code_table<bf16_t>(values, t.scales[r][g], kInt4 ? &t.zeros[r][g] : nullptr);
    }
    for (int64_t c = g * chunks_per_group; c < (g + 1) * chunks_per_group; ++c) {
      const int64_t o = c * kNibbleChunk;
      __m512bh x_lo[MB], x_hi[MB];
      load_x_chunk<MB>(xr, o, x_lo, x_hi);
#pragma GCC unroll 16
      for (int r = 0; r < kTileN; ++r) {
        sweep.prefetch(c, r);
        __m512bh w_lo, w_hi;
        lookup_nibbles(t.codes[r] + o / 2, table[r], w_lo, w_hi);
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) acc[r][i] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][i], w_lo, x_lo[i]), w_hi, x_hi[i]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) y[r * MB + i] = _mm512_reduce_add_ps(acc[r][i]);
}
#endif

// One register tile: kTileN weight rows from row0, MB rows of x from m0.
// Two passes over the (L1-resident) weight rows of a tile, rows [m0, m0 + 2)
// of x and then the rest: for loops whose accumulators and per-group
// totals would spill with more than 2 rows of x.
template <int MB>
void tile(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y);
template <int MB>
void tile_in_two_passes(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y) {
  float ya[kTileN * 2], yb[kTileN * (MB - 2)];
  tile<2>(p, sx, row0, m0, ya);
  tile<MB - 2>(p, sx, row0, m0 + 2, yb);
  for (int r = 0; r < kTileN; ++r)
    for (int i = 0; i < MB; ++i) y[r * MB + i] = i < 2 ? ya[r * 2 + i] : yb[r * (MB - 2) + i - 2];
}

template <int MB>
void tile(const WeightOnlyParams& p, const StagedX& sx, int64_t row0, int64_t m0, float* y) {
  if (p.format == WeightFormat::kInt8) return tile_int8_fp32<MB>(p, sx, row0, m0, y);
#if defined(__AVX512BF16__)
  if (uses_bf16_dot(p)) {
    if constexpr (MB > 2) {
      if (p.group_size % kNibbleChunk == 0) {  // the scaled tables take whole chunks of a group
        if (p.format == WeightFormat::kNf4) return tile_4bit_bf16_scaled<MB, false>(p, sx, row0, m0, y);
        if (!sx.split) return tile_4bit_bf16_scaled<MB, true>(p, sx, row0, m0, y);
      }
    }
    if constexpr (MB > 2) {
      return tile_in_two_passes<MB>(p, sx, row0, m0, y);  // int4 with split x (fp32 / fp16), or groups of 32
    } else {
      if (p.format == WeightFormat::kNf4) return tile_nf4_bf16<MB>(p, sx, row0, m0, y);
      if (p.group_size == 32) {
        if (sx.split) return tile_int4_bf16<MB, true, true>(p, sx, row0, m0, y);
        return tile_int4_bf16<MB, false, true>(p, sx, row0, m0, y);
      }
      if (sx.split) return tile_int4_bf16<MB, true, false>(p, sx, row0, m0, y);
      return tile_int4_bf16<MB, false, false>(p, sx, row0, m0, y);
    }
  }
#endif
  if (p.format == WeightFormat::kInt4) return tile_4bit_fp32<MB, true>(p, sx, row0, m0, y);
  tile_4bit_fp32<MB, false>(p, sx, row0, m0, y);
}

template <class T>
void matmul_typed(const WeightOnlyParams& p, const StagedX& sx) {
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int64_t tiles = (p.n + kTileN - 1) / kTileN;
  parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    float y[kTileN * kRowsPerPass];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t row0 = t * kTileN;
      for (int64_t m0 = 0; m0 < p.m; m0 += kRowsPerPass) {
        const int mb = static_cast<int>(std::min<int64_t>(kRowsPerPass, p.m - m0));
        switch (mb) {
#if defined(__AVX512F__)
          case 4:
            tile<4>(p, sx, row0, m0, y);
            break;
          case 3:
            tile<3>(p, sx, row0, m0, y);
            break;
#endif
          case 2:
            tile<2>(p, sx, row0, m0, y);
            break;
          default:
            tile<1>(p, sx, row0, m0, y);
            break;
        }
        for (int r = 0; r < kTileN && row0 + r < p.n; ++r) {
          const float b = bias ? to_float(bias[row0 + r]) : 0.0f;
          for (int i = 0; i < mb; ++i) out[(m0 + i) * p.out_row_stride + row0 + r] = from_float<T>(y[r * mb + i] + b);
        }
      }
    }
  });
}

// ------------------------------------------------------------ dequantisation
#if defined(__AVX512F__)
// 4-bit codes to a 16-bit T (bf16, fp16) by lookup: per group, the 16 code
// values (minus the zero point) times the scale, each rounded once to T as
// the formula below rounds it, make a table that one `vpermw` indexes with
// 32 codes, in place of a conversion, subtract, multiply and rounding per
// 16 weights. Zen 4, 2 threads, 4096-column rows into a 4 MiB buffer:
// int4 -> bf16 19-22 -> 42-53 G weights/s, nf4 22-24 -> 39-51; quant_matmul
// nf4 M=64 (dequantised tiles + GEMM) 2-4% faster, M=256 unchanged.
template <class T>
void dequantize_row_4bit_lookup(const WeightOnlyParams& p, int64_t row, T* dst) {
  const int64_t groups = p.k / p.group_size;
  const float* sc = p.scales + row * groups;
  const uint8_t* z = p.zeros ? p.zeros + row * groups : nullptr;
  const __m512 values = _mm512_loadu_ps(code_values(p.format));
  auto table = [&](int64_t g) { return scaled_code_table<T>(values, sc[g], z ? z + g : nullptr); };
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  const uint8_t* w = p.qweight + row * p.qweight_row_stride;
  // Groups are whole 32-column halves, so a group ends only at a half.
  int64_t g = 0, g_end = p.group_size;
  __m512i tab = table(0);
  for (int64_t col = 0; col < p.k; col += kNibbleChunk) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + col / 2)));
    if (col >= g_end) {
      tab = table(++g);
      g_end += p.group_size;
    }
    _mm512_storeu_si512(dst + col, _mm512_permutexvar_epi16(_mm512_and_si512(b, low4), tab));
    if (col + 32 >= p.k) break;  // a k of 32 mod 64 leaves the last high half as padding
    if (col + 32 >= g_end) {
      tab = table(++g);
      g_end += p.group_size;
    }
    _mm512_storeu_si512(dst + col + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), tab));
  }
}
#endif

template <class T>
void dequantize_row(const WeightOnlyParams& p, int64_t row, T* dst) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, float>) {
    if (p.format != WeightFormat::kInt8) return dequantize_row_4bit_lookup<T>(p, row, dst);
  }
#endif
  const float* sc = p.scales + row * (p.k / p.group_size);
  if (p.format == WeightFormat::kInt8) {
    // Vectors of codes times the row's scale: the same product (and one
    // rounding to T) as the scalar tail, about 10x its speed.
    const int8_t* w = reinterpret_cast<const int8_t*>(p.qweight + row * p.qweight_row_stride);
    const Vec s = vset1(sc[0]);
    int64_t j = 0;
    for (; j + kW <= p.k; j += kW) vstore(dst + j, decode_int8(w + j) * s);
    for (; j < p.k; ++j) dst[j] = from_float<T>(static_cast<float>(w[j]) * sc[0]);
    return;
  }
  constexpr int W = Vec::kWidth;
  const Table16 tab(code_values(p.format));
  const uint8_t* w = p.qweight + row * p.qweight_row_stride;
  const uint8_t* z = p.zeros ? p.zeros + row * (p.k / p.group_size) : nullptr;
  for (int64_t col = 0; col < p.k; col += kNibbleChunk) {
    const uint8_t* wc = w + col / 2;
    const bool has_hi = col + 32 < p.k;
    const int64_t g_lo = col / p.group_size, g_hi = has_hi ? (col + 32) / p.group_size : g_lo;
    for (int j = 0; j < 32; j += W) {
      Vec lo, hi;
      decode_nibbles(wc + j, tab, lo, hi);
      if (z) {  // (q - zero) * scale, the reference's order of operations
        lo = (lo - vset1(static_cast<float>(z[g_lo]))) * vset1(sc[g_lo]);
        hi = (hi - vset1(static_cast<float>(z[g_hi]))) * vset1(sc[g_hi]);
      } else {
        lo = lo * vset1(sc[g_lo]);
        hi = hi * vset1(sc[g_hi]);
      }
      vstore(dst + col + j, lo);
      if (has_hi) vstore(dst + col + 32 + j, hi);
    }
  }
}

#if defined(__AVX2__)
// ------------------------------------------------------------ int8 x int16 panels (many rows of x)
constexpr int kTotalLanes = Int16Dot::kLanes / 2;  // int32 sums per (weight row, row of x)

// MB rows of x from m0 against a tile's x group: the codes come decoded
// from the panel (L1), Int16Dot::kLanes columns a step; the group's exact
// int32 sums are scaled by x's group scale into
// totals[(r * m + row of x) * kTotalLanes ...].
template <int MB>
void int8_panel_rows(const int16_t* panel, int64_t steps, const StagedX& sx, int64_t m, int64_t m0, int64_t g,
                     float* totals) {
  using D = Int16Dot;
  const int16_t* xr[MB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = sx.xq.data() + (m0 + i) * sx.kp + g * sx.xq_group;
  D::V acc[kTileN][MB];
#pragma GCC unroll 16
  for (int r = 0; r < kTileN; ++r)
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) acc[r][i] = D::zero();
  for (int64_t st = 0; st < steps; ++st) {
    D::V xv[MB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) xv[i] = D::load(xr[i] + st * D::kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) {
      const D::V w = D::load(panel + r * kInt8XGroup + st * D::kLanes);
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) acc[r][i] = D::dot(acc[r][i], w, xv[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) {
    const float xs = sx.xq_scale[(m0 + i) * sx.xq_groups + g];
#pragma GCC unroll 16
    for (int r = 0; r < kTileN; ++r) D::add_scaled(totals + (r * m + m0 + i) * kTotalLanes, acc[r][i], xs);
  }
}

// int8 codes times x staged as int16 (stage_int16), for more rows of x than
// one pass takes: each x group of a tile's weight rows is sign-extended to
// int16 once into a panel in L1, which every row of x then multiplies with
// int16 dot products (`vpdpwssd`: 32 products an instruction, twice the
// fp32 FMA rate; AVX2 `vpmaddwd` + `vpaddd`: 16). Decoding in the inner
// loop instead, once per pass over 2 rows of x, ran no faster than the fp32
// FMA loop. Zen 4, bf16 x, against ATen's int8 kernel in the same process
// (weights from DRAM): M=8 1.32-1.44x -> 1.41-1.67x, M=16 1.24-1.69x ->
// 1.43-1.94x; in cache 1.1-1.3x the fp32 loop. AVX2: see uses_int16_x.
// Past k the codes are zero (a row may end anywhere) and so is x.
template <class T>
void matmul_int8_panels(const WeightOnlyParams& p, const StagedX& sx) {
  using D = Int16Dot;
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int64_t tiles = (p.n + kTileN - 1) / kTileN;
  parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    alignas(64) int16_t panel[kTileN * kInt8XGroup];
    std::vector<float> totals(static_cast<size_t>(kTileN * p.m * kTotalLanes));
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t row0 = t * kTileN;
      const TileRows tr(p, 1, row0);
      std::fill(totals.begin(), totals.end(), 0.0f);
      for (int64_t g = 0; g < sx.xq_groups; ++g) {
        const int64_t j0 = g * sx.xq_group, cols = std::min(p.k, j0 + sx.xq_group) - j0;
        const int64_t steps = (cols + D::kLanes - 1) / D::kLanes;
        for (int r = 0; r < kTileN; ++r) {
          const uint8_t* src = tr.codes[r] + j0;
          int16_t* dst = panel + r * kInt8XGroup;
          int64_t c = 0;
          for (; c + 64 <= cols; c += 64) {
            prefetch_next_tile(p, src + c);  // the same line of the next tile
#pragma GCC unroll 4
            for (int64_t v = 0; v < 64; v += D::kLanes) D::store(dst + c + v, D::widen_full(src + c + v));
          }
          for (; c < cols; c += D::kLanes) {  // a row may end anywhere: the codes past it are zero
            if (c % 64 == 0) prefetch_next_tile(p, src + c);
            D::store(dst + c, D::widen(src + c, cols - c));
          }
        }
        int64_t m0 = 0;
        if constexpr (D::kMaxRows == 4) {
          for (; m0 + 4 <= p.m; m0 += 4) int8_panel_rows<4>(panel, steps, sx, p.m, m0, g, totals.data());
          if (p.m - m0 == 3) {
            int8_panel_rows<3>(panel, steps, sx, p.m, m0, g, totals.data());
            m0 += 3;
          }
        }
        for (; m0 + 2 <= p.m; m0 += 2) int8_panel_rows<2>(panel, steps, sx, p.m, m0, g, totals.data());
        if (m0 < p.m) int8_panel_rows<1>(panel, steps, sx, p.m, m0, g, totals.data());
      }
      for (int r = 0; r < kTileN && row0 + r < p.n; ++r) {
        const float s = tr.scales[r][0], b = bias ? to_float(bias[row0 + r]) : 0.0f;
        for (int64_t i = 0; i < p.m; ++i)
          out[i * p.out_row_stride + row0 + r] = from_float<T>(D::sum(totals.data() + (r * p.m + i) * kTotalLanes) * s + b);
      }
    }
  });
}
#endif

}  // namespace

void weight_only_matmul(const WeightOnlyParams& p) {
  const StagedX sx = stage_x(p);
#if defined(__AVX2__)
  if (p.format == WeightFormat::kInt8 && sx.loop == StagedX::Loop::kInt16) {
    dispatch_dtype(p.dtype, [&](auto tag) { matmul_int8_panels<decltype(tag)>(p, sx); });
    return;
  }
#endif
  dispatch_dtype(p.dtype, [&](auto tag) { matmul_typed<decltype(tag)>(p, sx); });
}

void weight_only_dequantize_rows(const WeightOnlyParams& p, int64_t row0, int64_t rows, void* dense,
                                 int64_t dense_row_stride) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* d = static_cast<T*>(dense);
    for (int64_t r = 0; r < rows; ++r) dequantize_row<T>(p, row0 + r, d + r * dense_row_stride);
  });
}

void weight_only_dequantize(const WeightOnlyParams& p, void* dense) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* d = static_cast<T*>(dense);
    parallel_for(0, p.n, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) dequantize_row<T>(p, row, d + row * p.k);
    });
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
