// RoPE CPU kernel (compiled once per ISA; see common/cpu/vec.h).
// Per token, cos/sin are read once into fp32 rows (sin negated for the
// inverse rotation) and reused for every head of the token. Each step loads
// both members of its pairs before storing either, so in place (out == x)
// needs no copy.
//   GPT-NeoX: C = c, S = s (rot_dim/2 long); pairs are whole vectors of the
//             two halves.
//   GPT-J:    C = [c0,c0,c1,c1..], S = [-s0,s0,-s1,s1..] (rot_dim long) and
//             out = x * C + swap_pairs(x) * S, pairs never straddling a vector.
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "rope/rotary.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

template <class CS>
void load_cos_sin(const RotaryParams& p, int64_t pos, float* C, float* S) {
  const CS* c = static_cast<const CS*>(p.cos) + pos * p.cs_row_stride;
  const CS* s = static_cast<const CS*>(p.sin) + pos * p.cs_row_stride;
  const float sign = p.inverse ? -1.0f : 1.0f;
  for (int64_t i = 0; i < p.rot_dim / 2; ++i) {
    const float ci = to_float(c[i]), si = sign * to_float(s[i]);
    if (p.interleaved) {
      C[2 * i] = C[2 * i + 1] = ci;
      S[2 * i] = -si;
      S[2 * i + 1] = si;
    } else {
      C[i] = ci;
      S[i] = si;
    }
  }
}

// out_a = a*c - b*s, out_b = b*c + a*s for n pairs a = x[i], b = x[i + half].
template <class T>
void rotate_halves(const T* x, T* out, const float* C, const float* S, int64_t half) {
  int64_t i = 0;
  for (; i + kW <= half; i += kW) {
    const Vec a = vload(x + i), b = vload(x + half + i), c = vload(C + i), s = vload(S + i);
    vstore(out + i, vfma(a, c, -(b * s)));
    vstore(out + half + i, vfma(b, c, a * s));
  }
  if (i < half) {
    const int64_t m = half - i;
    const Vec a = vload_partial(x + i, m), b = vload_partial(x + half + i, m);
    const Vec c = vload_partial(C + i, m), s = vload_partial(S + i, m);
    vstore_partial(out + i, vfma(a, c, -(b * s)), m);
    vstore_partial(out + half + i, vfma(b, c, a * s), m);
  }
}

template <class T>
void rotate_pairs(const T* x, T* out, const float* C, const float* S, int64_t rot) {
#if defined(__AVX2__) || defined(__AVX512F__)
  // kW is even, so a vector never splits a pair.
  int64_t i = 0;
  for (; i + kW <= rot; i += kW) {
    const Vec xv = vload(x + i);
    vstore(out + i, vfma(xv, vload(C + i), vswap_pairs(xv) * vload(S + i)));
  }
  if (i < rot) {
    const int64_t m = rot - i;
    const Vec xv = vload_partial(x + i, m);
    vstore_partial(out + i, vfma(xv, vload_partial(C + i, m), vswap_pairs(xv) * vload_partial(S + i, m)), m);
  }
#else
  for (int64_t i = 0; i < rot; i += 2) {
    const float a = to_float(x[i]), b = to_float(x[i + 1]);
    out[i] = from_float<T>(a * C[i] + b * S[i]);
    out[i + 1] = from_float<T>(b * C[i + 1] + a * S[i + 1]);
  }
#endif
}

template <class T, class CS>
void run(const RotaryParams& p) {
  const int64_t tokens = p.batch * p.seq_len;
  const int64_t grain = p.heads * p.head_dim >= 4096 ? 1 : 4096 / (p.heads * p.head_dim) + 1;
  const bool copy_tail = p.in != p.out && p.rot_dim < p.head_dim;
  parallel_for(0, tokens, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> C(static_cast<size_t>(p.rot_dim)), S(static_cast<size_t>(p.rot_dim));
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / p.seq_len, s = t % p.seq_len;
      const int64_t pos = p.positions[b * p.pos_batch_stride + s * p.pos_seq_stride];
      if (pos < 0 || pos >= p.max_position) continue;
      const T* x = static_cast<const T*>(p.in) + b * p.in_batch_stride + s * p.in_seq_stride;
      T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + s * p.out_seq_stride;
      load_cos_sin<CS>(p, pos, C.data(), S.data());
      for (int64_t h = 0; h < p.heads; ++h) {
        const T* xh = x + h * p.in_head_stride;
        T* oh = out + h * p.out_head_stride;
        if (p.interleaved)
          rotate_pairs(xh, oh, C.data(), S.data(), p.rot_dim);
        else
          rotate_halves(xh, oh, C.data(), S.data(), p.rot_dim / 2);
        if (copy_tail)
          for (int64_t i = p.rot_dim; i < p.head_dim; ++i) oh[i] = xh[i];
      }
    }
  });
}

}  // namespace

void rotary_fwd(const RotaryParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.cs_dtype == DType::kFloat32)
      run<T, float>(p);
    else
      run<T, T>(p);
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
