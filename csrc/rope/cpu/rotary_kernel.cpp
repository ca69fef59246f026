// RoPE CPU kernel (compiled once per ISA; see common/cpu/vec.h).
// Per token, cos/sin are expanded once into rot_dim-long fp32 rows laid out
// like the head (NeoX: [c, c] and [-s, s]; GPT-J: [c0,c0,c1,c1..] and
// [-s0,s0,-s1,s1..]), so every head of the token is one multiply-add pass:
//   out = x * C + partner(x) * S
// with partner(x) the other element of each pair.
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "rope/rotary.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

template <class T, class CS>
void expand_cos_sin(const RotaryParams& p, int64_t pos, float* C, float* S) {
  const CS* c = static_cast<const CS*>(p.cos) + pos * p.cs_row_stride;
  const CS* s = static_cast<const CS*>(p.sin) + pos * p.cs_row_stride;
  const int64_t half = p.rot_dim / 2;
  const float sign = p.inverse ? -1.0f : 1.0f;
  for (int64_t i = 0; i < half; ++i) {
    const float ci = to_float(c[i]), si = sign * to_float(s[i]);
    if (p.interleaved) {
      C[2 * i] = C[2 * i + 1] = ci;
      S[2 * i] = -si;
      S[2 * i + 1] = si;
    } else {
      C[i] = C[i + half] = ci;
      S[i] = -si;
      S[i + half] = si;
    }
  }
}

// out[i] = x[i]*C[i] + x[i + d]*S[i] for i in [0, n): NeoX halves (d = +-half).
template <class T>
void rotate_span(const T* x, const T* partner, const float* C, const float* S, T* out, int64_t n) {
  int64_t i = 0;
  for (; i + kW <= n; i += kW)
    vstore(out + i, vfma(vload(x + i), vload(C + i), vload(partner + i) * vload(S + i)));
  if (i < n) {
    const int64_t m = n - i;
    vstore_partial(out + i,
                   vfma(vload_partial(x + i, m), vload_partial(C + i, m),
                        vload_partial(partner + i, m) * vload_partial(S + i, m)),
                   m);
  }
}

template <class T>
void rotate_head(const RotaryParams& p, const T* x, T* out, const float* C, const float* S) {
  const int64_t rot = p.rot_dim, half = rot / 2;
  // Both halves are computed from x before anything is stored: in place,
  // out == x and the second half must still see the original first half.
  if (p.interleaved) {
    int64_t i = 0;
#if !defined(__AVX2__) && !defined(__AVX512F__)
    for (; i < rot; i += 2) {
      const float a = to_float(x[i]), b = to_float(x[i + 1]);
      out[i] = from_float<T>(a * C[i] + b * S[i]);
      out[i + 1] = from_float<T>(b * C[i + 1] + a * S[i + 1]);
    }
#else
    // kW is even, so a vector never splits a pair.
    for (; i + kW <= rot; i += kW) {
      Vec xv = vload(x + i);
      vstore(out + i, vfma(xv, vload(C + i), vswap_pairs(xv) * vload(S + i)));
    }
    if (i < rot) {
      const int64_t m = rot - i;
      Vec xv = vload_partial(x + i, m);
      vstore_partial(out + i, vfma(xv, vload_partial(C + i, m), vswap_pairs(xv) * vload_partial(S + i, m)), m);
    }
#endif
  } else if (static_cast<const void*>(x) != static_cast<void*>(out)) {
    rotate_span(x, x + half, C, S, out, half);
    rotate_span(x + half, x, C + half, S + half, out + half, half);
  } else {
    // In place: go chunk by chunk over both halves together.
    constexpr int64_t kChunk = 4 * kW;
    T a[kChunk], b[kChunk];
    for (int64_t i = 0; i < half; i += kChunk) {
      const int64_t n = half - i < kChunk ? half - i : kChunk;
      for (int64_t k = 0; k < n; ++k) {
        a[k] = x[i + k];
        b[k] = x[half + i + k];
      }
      rotate_span(a, b, C + i, S + i, out + i, n);
      rotate_span(b, a, C + half + i, S + half + i, out + half + i, n);
    }
  }
  if (x != out)
    for (int64_t i = rot; i < p.head_dim; ++i) out[i] = x[i];
}

template <class T, class CS>
void run(const RotaryParams& p) {
  const int64_t tokens = p.batch * p.seq_len;
  const int64_t grain = p.heads * p.head_dim >= 4096 ? 1 : 4096 / (p.heads * p.head_dim) + 1;
  parallel_for(0, tokens, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> C(static_cast<size_t>(p.rot_dim)), S(static_cast<size_t>(p.rot_dim));
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / p.seq_len, s = t % p.seq_len;
      const int64_t pos = p.positions[b * p.pos_batch_stride + s * p.pos_seq_stride];
      const T* x = static_cast<const T*>(p.in) + b * p.in_batch_stride + s * p.in_seq_stride;
      T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + s * p.out_seq_stride;
      if (pos < 0 || pos >= p.max_position) continue;
      expand_cos_sin<T, CS>(p, pos, C.data(), S.data());
      for (int64_t h = 0; h < p.heads; ++h)
        rotate_head(p, x + h * p.in_head_stride, out + h * p.out_head_stride, C.data(), S.data());
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
