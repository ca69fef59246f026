// Quantisation of dense weights on CPU: the formulas of
// python/torchkiln/quant/quantize.py (which defines each scheme in plain
// PyTorch) in the same fp32 operations, one row per task, so a model's
// weights quantise at memory speed instead of through a dozen full-size
// temporaries. Divisions are true divisions (torch's `/`), rounding is half
// to even (torch.round), and a scale of 0 divides as 1.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

inline float safe(float scale) { return scale == 0.0f ? 1.0f : scale; }

// One group's statistics; `poison` turns NaN when an element is inf or nan.
struct GroupStats {
  float min, max, absmax;
};

template <class T>
GroupStats group_stats(const T* w, int64_t len, Vec& poison) {
  Vec lo = vload(w), hi = lo, am = vabs(lo);
  poison = vfma(lo, vzero(), poison);
  for (int64_t j = kW; j < len; j += kW) {
    const Vec v = vload(w + j);
    lo = vmin(lo, v);
    hi = vmax(hi, v);
    am = vmax(am, vabs(v));
    poison = vfma(v, vzero(), poison);
  }
  return {-vhmax(-lo), vhmax(hi), vhmax(am)};
}

// Codes of one 4-bit group into codes[0, len) (values 0..15).
template <class T>
void int4_group(const QuantizeParams& p, const T* w, int64_t len, int64_t row, int64_t g, uint8_t* codes,
                Vec& poison) {
  const int64_t groups = p.k / p.group_size;
  const GroupStats st = group_stats(w, len, poison);
  float divisor, zero;
  Vec lo_clip, hi_clip;
  if (p.symmetric) {
    const float scale = st.absmax / 7.0f;
    p.scales[row * groups + g] = scale;  // unguarded, as the reference returns it
    divisor = safe(scale);
    zero = 8.0f;
    lo_clip = vset1(-8.0f);
    hi_clip = vset1(7.0f);
  } else {
    const float lo = std::min(st.min, 0.0f), hi = std::max(st.max, 0.0f);
    divisor = safe((hi - lo) / 15.0f);
    zero = std::min(std::max(std::nearbyint(-lo / divisor), 0.0f), 15.0f);
    p.scales[row * groups + g] = divisor;
    lo_clip = vset1(-zero);  // round(w / s) + zero clamped to [0, 15]
    hi_clip = vset1(15.0f - zero);
  }
  p.zeros[row * groups + g] = static_cast<uint8_t>(zero);
  const Vec d = vset1(divisor), z = vset1(zero);
  alignas(64) float q[kW];
  for (int64_t j = 0; j < len; j += kW) {
    vstore(q, vmin(vmax(vround(vload(w + j) / d), lo_clip), hi_clip) + z);
    for (int l = 0; l < kW; ++l) codes[j + l] = static_cast<uint8_t>(q[l]);
  }
}

// Midpoints between neighbouring NF4 values, computed as the reference does.
struct Nf4Midpoints {
  float m[15];
  Nf4Midpoints() {
    for (int i = 0; i < 15; ++i) m[i] = (kNf4Codebook[i + 1] + kNf4Codebook[i]) / 2.0f;
  }
};

template <class T>
void nf4_group(const QuantizeParams& p, const T* w, int64_t len, int64_t row, int64_t g, uint8_t* codes,
               Vec& poison) {
  static const Nf4Midpoints mid;
  const GroupStats st = group_stats(w, len, poison);
  p.scales[row * (p.k / p.group_size) + g] = st.absmax;
  const Vec d = vset1(safe(st.absmax));
  alignas(64) float q[kW];
  for (int64_t j = 0; j < len; j += kW) {
    const Vec normed = vload(w + j) / d;
    Vec c = vzero();  // the number of midpoints below the value (a tie stays below)
#pragma GCC unroll 15
    for (int i = 0; i < 15; ++i) c = c + vgt(normed, vset1(mid.m[i]));
    vstore(q, c);
    for (int l = 0; l < kW; ++l) codes[j + l] = static_cast<uint8_t>(q[l]);
  }
}

template <class T>
void quantize_4bit_row(const QuantizeParams& p, const T* w, int64_t row, uint8_t* codes, Vec& poison) {
  const int64_t groups = p.k / p.group_size;
  for (int64_t g = 0; g < groups; ++g) {
    const T* wg = w + g * p.group_size;
    uint8_t* cg = codes + g * p.group_size;
    if (p.format == WeightFormat::kInt4)
      int4_group(p, wg, p.group_size, row, g, cg, poison);
    else
      nf4_group(p, wg, p.group_size, row, g, cg, poison);
  }
  // Pack: byte j of each 64-column chunk holds column j (low nibble) and
  // column 32 + j (high); columns past k (codes zero-padded) hold 0.
  const int64_t kp = (p.k + kNibbleChunk - 1) / kNibbleChunk * kNibbleChunk;
  std::fill(codes + p.k, codes + kp, uint8_t{0});
  uint8_t* out = p.qweight + row * (kp / 2);
  for (int64_t c = 0; c < kp; c += kNibbleChunk)
    for (int j = 0; j < 32; ++j) out[c / 2 + j] = static_cast<uint8_t>(codes[c + j] | (codes[c + 32 + j] << 4));
}

template <class T>
void quantize_int8_row(const QuantizeParams& p, const T* w, int64_t row, Vec& poison) {
  const int64_t full = p.k / kW * kW;
  Vec am = vzero();
  for (int64_t j = 0; j < full; j += kW) {
    const Vec v = vload(w + j);
    am = vmax(am, vabs(v));
    poison = vfma(v, vzero(), poison);
  }
  float absmax = vhmax(am);
  for (int64_t j = full; j < p.k; ++j) {
    const float v = to_float(w[j]);
    absmax = std::max(absmax, std::fabs(v));
    poison = vfma(vset1(v), vzero(), poison);
  }
  const float scale = absmax / 127.0f;
  p.scales[row] = scale;
  const float divisor = safe(scale);
  const Vec d = vset1(divisor), lo = vset1(-127.0f), hi = vset1(127.0f);
  int8_t* out = reinterpret_cast<int8_t*>(p.qweight) + row * p.k;
  alignas(64) float q[kW];
  for (int64_t j = 0; j < full; j += kW) {
    vstore(q, vmin(vmax(vround(vload(w + j) / d), lo), hi));
    for (int l = 0; l < kW; ++l) out[j + l] = static_cast<int8_t>(q[l]);
  }
  for (int64_t j = full; j < p.k; ++j)
    out[j] = static_cast<int8_t>(std::min(std::max(std::nearbyint(to_float(w[j]) / divisor), -127.0f), 127.0f));
}

template <class T>
void quantize_typed(const QuantizeParams& p) {
  const T* w = static_cast<const T*>(p.w);
  std::atomic<bool> bad{false};
  const int64_t kp = (p.k + kNibbleChunk - 1) / kNibbleChunk * kNibbleChunk;
  parallel_for(0, p.n, 16, [&](int64_t lo, int64_t hi) {
    std::vector<uint8_t> codes(p.format == WeightFormat::kInt8 ? 0 : static_cast<size_t>(kp));
    Vec poison = vzero();
    for (int64_t row = lo; row < hi; ++row) {
      if (p.format == WeightFormat::kInt8)
        quantize_int8_row(p, w + row * p.w_row_stride, row, poison);
      else
        quantize_4bit_row(p, w + row * p.w_row_stride, row, codes.data(), poison);
    }
    if (!std::isfinite(vsum(poison))) bad.store(true, std::memory_order_relaxed);
  });
  if (p.non_finite) *p.non_finite = bad.load();
}

}  // namespace

void quantize_weight(const QuantizeParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) { quantize_typed<decltype(tag)>(p); });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
