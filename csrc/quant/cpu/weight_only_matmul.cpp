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
// Two inner loops:
//  * fp32 (every ISA, every format): codes become fp32 through a 16-entry
//    table (int4: 0..15, nf4: the codebook) with one permute per 16 codes,
//    then FMA with x in fp32.
//  * bf16 dot products (AVX512_BF16, int4): 0x4300 | q is the bf16 bit
//    pattern of 128 + q, so one OR turns 32 codes into exact bf16 values and
//    `vdpbf16ps` multiplies them with x (the offset 128 joins the zero
//    point). x that is not already bf16 is split into hi + lo bf16 parts
//    (16 significant bits, enough for fp16 exactly and fp32 to 2^-17).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

#if defined(__AVX512F__)
constexpr int kRowsPerPass = 4;
#else
constexpr int kRowsPerPass = 2;  // 16 vector registers: more rows would spill
#endif

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

int64_t padded_k(const WeightOnlyParams& p) {
  return p.format == WeightFormat::kInt8 ? round_up(p.k, 16) : round_up(p.k, kNibbleChunk);
}

bool uses_bf16_dot(const WeightOnlyParams& p) {
#if defined(__AVX512BF16__)
  return p.format == WeightFormat::kInt4;
#else
  (void)p;
  return false;
#endif
}

// x in the form the inner loop reads, zero-padded to kp columns.
struct StagedX {
  int64_t kp = 0, groups = 0;
  std::vector<float> x;           // (m, kp) fp32 (fp32 loop)
  std::vector<uint16_t> hi, lo;   // (m, kp) bf16 bits, x = hi + lo (bf16 loop)
  bool split = false;             // lo is not all zero
  std::vector<float> group_sums;  // (m, groups), int4 zero points
};

template <class T>
void stage_rows(const WeightOnlyParams& p, bool bf16_dot, StagedX& s) {
  const T* x = static_cast<const T*>(p.x);
  for (int64_t i = 0; i < p.m; ++i) {
    const T* row = x + i * p.x_row_stride;
    for (int64_t j = 0; j < p.k; ++j) {
      const float v = to_float(row[j]);
      if (bf16_dot) {
        const bf16_t h = from_float<bf16_t>(v);
        s.hi[i * s.kp + j] = h.bits;
        s.lo[i * s.kp + j] = from_float<bf16_t>(v - to_float(h)).bits;
      } else {
        s.x[i * s.kp + j] = v;
      }
    }
    if (p.format == WeightFormat::kInt4) {
      const int64_t g = p.group_size;
      for (int64_t gi = 0; gi < s.groups; ++gi) {
        float sum = 0.0f;
        for (int64_t j = gi * g; j < (gi + 1) * g; ++j) sum += to_float(row[j]);
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
  return s;
}

// ------------------------------------------------------------ code decoding
// decode_nibbles: Vec::kWidth bytes at p -> the low-nibble values (columns
// j..j+W of the chunk) and the high-nibble values (columns 32+j..32+j+W).
// decode_int8: Vec::kWidth int8 codes -> fp32.
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
#endif

constexpr float kInt4Values[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

const float* code_values(WeightFormat f) { return f == WeightFormat::kNf4 ? kNf4Codebook : kInt4Values; }

// Folding a group's partial sums happens every `fold` chunks; for group 32
// the two halves of a chunk belong to different groups.
struct Folding {
  int64_t chunks_per_fold;
  explicit Folding(int64_t group_size) : chunks_per_fold(std::max<int64_t>(1, group_size / kNibbleChunk)) {}
};

// ------------------------------------------------------------ fp32 inner loops
// y[i] = sum_k x[m0+i, k] * s * code(q) for one weight row (zero points excluded).
template <int MB>
void dot_4bit_fp32(const WeightOnlyParams& p, const StagedX& sx, int64_t row, int64_t m0, float* y) {
  constexpr int W = Vec::kWidth;
  const Table16 tab(code_values(p.format));
  const uint8_t* w = p.qweight + row * p.qweight_row_stride;
  const float* sc = p.scales + row * sx.groups;
  const int64_t chunks = sx.kp / kNibbleChunk, fold = Folding(p.group_size).chunks_per_fold;
  const float* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = sx.x.data() + (m0 + i) * sx.kp;
  Vec total[MB];
  for (int i = 0; i < MB; ++i) total[i] = vzero();
  for (int64_t c0 = 0; c0 < chunks; c0 += fold) {
    // Two chains per half so FMA latency does not bound one row of x.
    Vec lo_acc[MB][2], hi_acc[MB][2];
    for (int i = 0; i < MB; ++i) lo_acc[i][0] = lo_acc[i][1] = hi_acc[i][0] = hi_acc[i][1] = vzero();
    const int64_t c1 = std::min(chunks, c0 + fold);
    for (int64_t c = c0; c < c1; ++c) {
      const uint8_t* wc = w + c * (kNibbleChunk / 2);
      for (int j = 0; j < 32; j += W) {
        const int chain = (j / W) & 1;
        Vec lo, hi;
        decode_nibbles(wc + j, tab, lo, hi);
        for (int i = 0; i < MB; ++i) {
          const float* xc = xr[i] + c * kNibbleChunk + j;
          lo_acc[i][chain] = vfma(lo, vload(xc), lo_acc[i][chain]);
          hi_acc[i][chain] = vfma(hi, vload(xc + 32), hi_acc[i][chain]);
        }
      }
    }
    const int64_t col = c0 * kNibbleChunk;
    const Vec s_lo = vset1(sc[col / p.group_size]);
    // A k that is 32 mod 64 leaves the last high half as padding (x is 0 there).
    const Vec s_hi = vset1(col + 32 < p.k ? sc[(col + 32) / p.group_size] : 0.0f);
    for (int i = 0; i < MB; ++i) {
      total[i] = vfma(lo_acc[i][0] + lo_acc[i][1], s_lo, total[i]);
      total[i] = vfma(hi_acc[i][0] + hi_acc[i][1], s_hi, total[i]);
    }
  }
  for (int i = 0; i < MB; ++i) y[i] = vsum(total[i]);
}

template <int MB>
void dot_int8_fp32(const WeightOnlyParams& p, const StagedX& sx, int64_t row, int64_t m0, float* y) {
  constexpr int W = Vec::kWidth;
  const int8_t* w = reinterpret_cast<const int8_t*>(p.qweight + row * p.qweight_row_stride);
  const float* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = sx.x.data() + (m0 + i) * sx.kp;
  Vec acc[MB][2];
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = vzero();
  const int64_t kv = p.k / (2 * W) * (2 * W);
  int64_t j = 0;
  for (; j < kv; j += 2 * W) {
    const Vec w0 = decode_int8(w + j), w1 = decode_int8(w + j + W);
    for (int i = 0; i < MB; ++i) {
      acc[i][0] = vfma(w0, vload(xr[i] + j), acc[i][0]);
      acc[i][1] = vfma(w1, vload(xr[i] + j + W), acc[i][1]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float tail = 0.0f;
    for (int64_t t = j; t < p.k; ++t) tail += static_cast<float>(w[t]) * xr[i][t];
    y[i] = (vsum(acc[i][0] + acc[i][1]) + tail) * p.scales[row];
  }
}

#if defined(__AVX512BF16__)
// ------------------------------------------------------------ bf16 dot-product loop (int4)
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }
inline __m512i load_bh(const uint16_t* p) { return _mm512_loadu_si512(p); }

template <int MB, bool kSplit>
void dot_int4_bf16(const WeightOnlyParams& p, const StagedX& sx, int64_t row, int64_t m0, float* y) {
  const __m512i low4 = _mm512_set1_epi16(0x000F), base = _mm512_set1_epi16(0x4300);  // bf16(128.0)
  const uint8_t* w = p.qweight + row * p.qweight_row_stride;
  const float* sc = p.scales + row * sx.groups;
  const int64_t chunks = sx.kp / kNibbleChunk, fold = Folding(p.group_size).chunks_per_fold;
  const uint16_t* hr[MB];
  const uint16_t* lr[MB];
  for (int i = 0; i < MB; ++i) {
    hr[i] = sx.hi.data() + (m0 + i) * sx.kp;
    lr[i] = sx.lo.data() + (m0 + i) * sx.kp;
  }
  __m512 total[MB];
  for (int i = 0; i < MB; ++i) total[i] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < chunks; c0 += fold) {
    __m512 lo_acc[MB][2], hi_acc[MB][2];  // chains by chunk parity
    for (int i = 0; i < MB; ++i)
      lo_acc[i][0] = lo_acc[i][1] = hi_acc[i][0] = hi_acc[i][1] = _mm512_setzero_ps();
    const int64_t c1 = std::min(chunks, c0 + fold);
    for (int64_t c = c0; c < c1; ++c) {
      const int par = c & 1;
      const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * 32)));
      const __m512bh lo = as_bh(_mm512_ternarylogic_epi32(b, low4, base, 0xEA));  // (b & 15) | base
      const __m512bh hi = as_bh(_mm512_or_si512(_mm512_srli_epi16(b, 4), base));
      for (int i = 0; i < MB; ++i) {
        const int64_t o = c * kNibbleChunk;
        lo_acc[i][par] = _mm512_dpbf16_ps(lo_acc[i][par], lo, as_bh(load_bh(hr[i] + o)));
        hi_acc[i][par] = _mm512_dpbf16_ps(hi_acc[i][par], hi, as_bh(load_bh(hr[i] + o + 32)));
        if (kSplit) {
          lo_acc[i][par] = _mm512_dpbf16_ps(lo_acc[i][par], lo, as_bh(load_bh(lr[i] + o)));
          hi_acc[i][par] = _mm512_dpbf16_ps(hi_acc[i][par], hi, as_bh(load_bh(lr[i] + o + 32)));
        }
      }
    }
    const int64_t col = c0 * kNibbleChunk;
    const __m512 s_lo = _mm512_set1_ps(sc[col / p.group_size]);
    const __m512 s_hi = _mm512_set1_ps(col + 32 < p.k ? sc[(col + 32) / p.group_size] : 0.0f);
    for (int i = 0; i < MB; ++i) {
      total[i] = _mm512_fmadd_ps(_mm512_add_ps(lo_acc[i][0], lo_acc[i][1]), s_lo, total[i]);
      total[i] = _mm512_fmadd_ps(_mm512_add_ps(hi_acc[i][0], hi_acc[i][1]), s_hi, total[i]);
    }
  }
  for (int i = 0; i < MB; ++i) y[i] = _mm512_reduce_add_ps(total[i]);
}
#endif

// Zero-point term of one weight row: sum_g s_g * z_g * sum_{k in g} x_k.
float zero_point_term(const WeightOnlyParams& p, const StagedX& sx, int64_t row, int64_t m, float code_offset) {
  const float* sc = p.scales + row * sx.groups;
  const float* z = p.zeros + row * sx.groups;
  const float* xs = sx.group_sums.data() + m * sx.groups;
  float t = 0.0f;
  for (int64_t g = 0; g < sx.groups; ++g) t += sc[g] * (z[g] + code_offset) * xs[g];
  return t;
}

template <int MB>
void dot_rows(const WeightOnlyParams& p, const StagedX& sx, int64_t row, int64_t m0, float* y) {
  if (p.format == WeightFormat::kInt8) return dot_int8_fp32<MB>(p, sx, row, m0, y);
  float code_offset = 0.0f;
#if defined(__AVX512BF16__)
  if (uses_bf16_dot(p)) {
    if (sx.split)
      dot_int4_bf16<MB, true>(p, sx, row, m0, y);
    else
      dot_int4_bf16<MB, false>(p, sx, row, m0, y);
    code_offset = 128.0f;
  } else
#endif
  {
    dot_4bit_fp32<MB>(p, sx, row, m0, y);
  }
  if (p.format == WeightFormat::kInt4)
    for (int i = 0; i < MB; ++i) y[i] -= zero_point_term(p, sx, row, m0 + i, code_offset);
}

template <class T>
void matmul_typed(const WeightOnlyParams& p, const StagedX& sx) {
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  parallel_for(0, p.n, 4, [&](int64_t lo, int64_t hi) {
    float y[kRowsPerPass];
    for (int64_t row = lo; row < hi; ++row) {
      const float b = bias ? to_float(bias[row]) : 0.0f;
      for (int64_t m0 = 0; m0 < p.m; m0 += kRowsPerPass) {
        const int mb = static_cast<int>(std::min<int64_t>(kRowsPerPass, p.m - m0));
        switch (mb) {
#if defined(__AVX512F__)
          case 4:
            dot_rows<4>(p, sx, row, m0, y);
            break;
          case 3:
            dot_rows<3>(p, sx, row, m0, y);
            break;
#endif
          case 2:
            dot_rows<2>(p, sx, row, m0, y);
            break;
          default:
            dot_rows<1>(p, sx, row, m0, y);
            break;
        }
        for (int i = 0; i < mb; ++i) out[(m0 + i) * p.out_row_stride + row] = from_float<T>(y[i] + b);
      }
    }
  });
}

// ------------------------------------------------------------ dequantisation
template <class T>
void dequantize_row(const WeightOnlyParams& p, int64_t row, T* dst) {
  const float* sc = p.scales + row * (p.k / p.group_size);
  if (p.format == WeightFormat::kInt8) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.qweight + row * p.qweight_row_stride);
    for (int64_t j = 0; j < p.k; ++j) dst[j] = from_float<T>(static_cast<float>(w[j]) * sc[0]);
    return;
  }
  constexpr int W = Vec::kWidth;
  const Table16 tab(code_values(p.format));
  const uint8_t* w = p.qweight + row * p.qweight_row_stride;
  const float* z = p.zeros ? p.zeros + row * (p.k / p.group_size) : nullptr;
  for (int64_t col = 0; col < p.k; col += kNibbleChunk) {
    const uint8_t* wc = w + col / 2;
    const bool has_hi = col + 32 < p.k;
    const int64_t g_lo = col / p.group_size, g_hi = has_hi ? (col + 32) / p.group_size : g_lo;
    for (int j = 0; j < 32; j += W) {
      Vec lo, hi;
      decode_nibbles(wc + j, tab, lo, hi);
      if (z) {  // (q - zero) * scale, the reference's order of operations
        lo = (lo - vset1(z[g_lo])) * vset1(sc[g_lo]);
        hi = (hi - vset1(z[g_hi])) * vset1(sc[g_hi]);
      } else {
        lo = lo * vset1(sc[g_lo]);
        hi = hi * vset1(sc[g_hi]);
      }
      vstore(dst + col + j, lo);
      if (has_hi) vstore(dst + col + 32 + j, hi);
    }
  }
}

}  // namespace

void weight_only_matmul(const WeightOnlyParams& p) {
  const StagedX sx = stage_x(p);
  dispatch_dtype(p.dtype, [&](auto tag) { matmul_typed<decltype(tag)>(p, sx); });
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
