// W8A8 matmul: rows of x quantised to int8 on the fly (symmetric, one scale
// per row), int8 x int8 dot products with exact int32 accumulation, then
// out = acc * x_scale[m] * w_scale[n] + bias.
//
// The weight is packed in 16-row panels whose k-quads are 64-byte lines (see
// quant_matmul.h), so one load feeds 16 output columns x 4 k. A register
// tile of kTileRows rows of x by kTilePanels panels (64 columns) keeps 16
// int32 accumulators; the weight block of a tile column (64 x k bytes) stays
// in L2 while every row tile of x passes over it.
//
// VNNI's `vpdpbusd` multiplies unsigned by signed bytes, so x is stored as
// q + 128 and the 128 * sum_k w term (precomputed at packing time) is
// subtracted at the end. Without VNNI the dot uses maddubs/madd on |q| and
// sign(q) * w (|q| <= 127 keeps the int16 pair sums from saturating).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

constexpr int kTileRows = 4;
constexpr int kTilePanels = 4;
#if defined(__AVX512VNNI__)
constexpr bool kUnsignedX = true;
#else
constexpr bool kUnsignedX = false;
#endif

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Quantised rows of x: (m, k4) bytes, padding columns hold the code of 0.
struct QuantizedX {
  int64_t k4 = 0;
  std::vector<uint8_t> q;
  std::vector<float> scale;
};

template <class T>
void quantize_rows(const W8A8Params& p, QuantizedX& qx) {
  const T* x = static_cast<const T*>(p.x);
  parallel_for(0, p.m, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T* row = x + i * p.x_row_stride;
      float amax = 0.0f;
      for (int64_t j = 0; j < p.k; ++j) amax = std::max(amax, std::fabs(to_float(row[j])));
      const float scale = amax / 127.0f;
      const float div = scale == 0.0f ? 1.0f : scale;
      qx.scale[i] = scale;
      uint8_t* q = qx.q.data() + i * qx.k4;
      for (int64_t j = 0; j < p.k; ++j) {
        // Division (not a reciprocal multiply) and nearbyint (half to even)
        // match torch.round(x / scale) bit for bit.
        const float v = std::min(127.0f, std::max(-127.0f, std::nearbyint(to_float(row[j]) / div)));
        const int8_t s = static_cast<int8_t>(v);
        q[j] = kUnsignedX ? static_cast<uint8_t>(s + 128) : static_cast<uint8_t>(s);
      }
      std::memset(q + p.k, kUnsignedX ? 128 : 0, qx.k4 - p.k);
    }
  });
}

// acc[r][c] for r < MR rows of x and c < NP * 16 columns, over all k-quads.
template <int MR, int NP>
void tile_dot(const uint8_t* xq, int64_t x_stride, const int8_t* w, int64_t panel_stride, int64_t k4,
              int32_t acc_out[kTileRows][kTilePanels * kPanelRows]) {
#if defined(__AVX512F__)
  __m512i acc[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NP; ++c) acc[r][c] = _mm512_setzero_si512();
#if !defined(__AVX512VNNI__)
  const __m512i ones = _mm512_set1_epi16(1);
#endif
  for (int64_t q4 = 0; q4 < k4 / 4; ++q4) {
    __m512i wv[NP];
    for (int c = 0; c < NP; ++c) wv[c] = _mm512_loadu_si512(w + c * panel_stride + q4 * 64);
    for (int r = 0; r < MR; ++r) {
      int32_t xv;
      std::memcpy(&xv, xq + r * x_stride + q4 * 4, 4);
      const __m512i xb = _mm512_set1_epi32(xv);
#if defined(__AVX512VNNI__)
      for (int c = 0; c < NP; ++c) acc[r][c] = dpbusd(acc[r][c], xb, wv[c]);
#else
      const __m512i xa = _mm512_abs_epi8(xb);
      const __mmask64 neg = _mm512_movepi8_mask(xb);
      for (int c = 0; c < NP; ++c) {
        const __m512i ws = _mm512_mask_sub_epi8(wv[c], neg, _mm512_setzero_si512(), wv[c]);
        acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_madd_epi16(_mm512_maddubs_epi16(xa, ws), ones));
      }
#endif
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NP; ++c) _mm512_storeu_si512(acc_out[r] + c * 16, acc[r][c]);
#elif defined(__AVX2__)
  // A 64-byte panel line is two ymm halves (columns 0-7 and 8-15).
  __m256i acc[MR][NP][2];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NP; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q4 = 0; q4 < k4 / 4; ++q4) {
    __m256i wv[NP][2];
    for (int c = 0; c < NP; ++c)
      for (int h = 0; h < 2; ++h)
        wv[c][h] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c * panel_stride + q4 * 64 + h * 32));
    for (int r = 0; r < MR; ++r) {
      int32_t xv;
      std::memcpy(&xv, xq + r * x_stride + q4 * 4, 4);
      const __m256i xb = _mm256_set1_epi32(xv);
      const __m256i xa = _mm256_abs_epi8(xb);
      for (int c = 0; c < NP; ++c)
        for (int h = 0; h < 2; ++h) {
          const __m256i ws = _mm256_sign_epi8(wv[c][h], xb);
          acc[r][c][h] = _mm256_add_epi32(acc[r][c][h], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, ws), ones));
        }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NP; ++c)
      for (int h = 0; h < 2; ++h)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc_out[r] + c * 16 + h * 8), acc[r][c][h]);
#else
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NP * 16; ++c) acc_out[r][c] = 0;
  for (int64_t q4 = 0; q4 < k4 / 4; ++q4)
    for (int r = 0; r < MR; ++r) {
      const int8_t* xr = reinterpret_cast<const int8_t*>(xq + r * x_stride + q4 * 4);
      for (int c = 0; c < NP; ++c) {
        const int8_t* line = w + c * panel_stride + q4 * 64;
        for (int col = 0; col < 16; ++col) {
          int32_t s = 0;
          for (int t = 0; t < 4; ++t) s += int32_t{xr[t]} * int32_t{line[col * 4 + t]};
          acc_out[r][c * 16 + col] += s;
        }
      }
    }
#endif
}

using TileFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t,
                        int32_t[kTileRows][kTilePanels * kPanelRows]);

template <int MR>
TileFn pick_panels(int np) {
  switch (np) {
    case 4:
      return tile_dot<MR, 4>;
    case 3:
      return tile_dot<MR, 3>;
    case 2:
      return tile_dot<MR, 2>;
    default:
      return tile_dot<MR, 1>;
  }
}

TileFn pick_tile(int mr, int np) {
  switch (mr) {
    case 4:
      return pick_panels<4>(np);
    case 3:
      return pick_panels<3>(np);
    case 2:
      return pick_panels<2>(np);
    default:
      return pick_panels<1>(np);
  }
}

template <class T>
void matmul_typed(const W8A8Params& p, const QuantizedX& qx) {
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const int64_t panels = round_up(p.n, kPanelRows) / kPanelRows;
  const int64_t panel_stride = qx.k4 * kPanelRows;  // bytes per panel
  const int64_t col_tiles = (panels + kTilePanels - 1) / kTilePanels;
  parallel_for(0, col_tiles, 1, [&](int64_t lo, int64_t hi) {
    int32_t acc[kTileRows][kTilePanels * kPanelRows];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t p0 = t * kTilePanels;
      const int np = static_cast<int>(std::min<int64_t>(kTilePanels, panels - p0));
      const int8_t* w = p.qweight + p0 * panel_stride;
      const int64_t n0 = p0 * kPanelRows, n1 = std::min(p.n, n0 + np * kPanelRows);
      for (int64_t m0 = 0; m0 < p.m; m0 += kTileRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kTileRows, p.m - m0));
        pick_tile(mr, np)(qx.q.data() + m0 * qx.k4, qx.k4, w, panel_stride, qx.k4, acc);
        for (int r = 0; r < mr; ++r) {
          T* o = out + (m0 + r) * p.out_row_stride;
          const float sx = qx.scale[m0 + r];
          for (int64_t n = n0; n < n1; ++n) {
            int32_t a = acc[r][n - n0];
            if (kUnsignedX) a -= p.weight_sums[n];
            const float v = static_cast<float>(a) * (sx * p.scales[n]);
            o[n] = from_float<T>(bias ? v + to_float(bias[n]) : v);
          }
        }
      }
    }
  });
}

}  // namespace

void w8a8_matmul(const W8A8Params& p) {
  QuantizedX qx;
  qx.k4 = round_up(p.k, 4);
  qx.q.resize(p.m * qx.k4);
  qx.scale.resize(p.m);
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_rows<T>(p, qx);
    matmul_typed<T>(p, qx);
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
