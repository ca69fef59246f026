// FlashAttention-2 forward, CPU (compiled once per ISA; see common/cpu/vec.h).
//
// Work is split into tasks of (sequence, head, chunk of query rows) so a few
// long sequences still fill every thread. A task first widens the keys it can
// see to fp32, K transposed (head_dim x keys) and V as is, then walks its
// query rows in blocks of kBq:
//   S = (scale * Q) K^T        register tiles of kRows rows x kTileCols vectors of keys
//   online softmax per row     running max m and sum l; O rescaled by exp(m_old - m_new)
//   O += P V                   register tiles of kRows rows x kTileCols vectors of head_dim
// All math is fp32; scratch is O(keys * head_dim) per task, never O(sq * sk).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention/flash_attn.h"
#include "common/cpu/vec.h"
#include "common/parallel.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

constexpr int64_t kBq = 64;    // query rows per block
constexpr int64_t kBk = 64;    // keys per block
constexpr int64_t kRows = 4;   // rows of a register tile
constexpr int64_t kTileCols = kW >= 16 ? 4 : 2;  // vectors per register tile row (fits 16 ymm on AVX2)
constexpr int64_t kTileW = kTileCols * kW;
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Sequence {
  int64_t q_begin, k_begin;  // first token (varlen) or 0
  int64_t sq, sk;
};

Sequence sequence(const FlashAttnParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr) return {0, 0, p.seqlen_q, p.seqlen_k};
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  return {q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
}

template <class T>
const T* token_ptr(const FlashAttnTensor& t, const FlashAttnParams& p, int64_t b, int64_t first, int64_t tok,
                   int64_t h) {
  const int64_t batch_off = p.cu_seqlens_q ? 0 : b * t.batch_stride;
  return static_cast<const T*>(t.ptr) + batch_off + (first + tok) * t.row_stride + h * t.head_stride;
}

// Keys query row i may attend to: [lo, hi).
struct KeyRange {
  int64_t lo, hi;
};
KeyRange key_range(const FlashAttnParams& p, const Sequence& s, int64_t i) {
  const int64_t diag = i + s.sk - s.sq;
  int64_t lo = p.window_left >= 0 ? diag - p.window_left : 0;
  int64_t hi = p.window_right >= 0 ? diag + p.window_right + 1 : s.sk;
  lo = lo < 0 ? 0 : lo;
  hi = hi > s.sk ? s.sk : hi;
  return {lo, hi < lo ? lo : hi};
}

// Scratch of one task, reused across its query blocks.
struct Scratch {
  std::vector<float> kt, v, q, s, o, m, l;
  int64_t ldk = 0, dp = 0;  // columns of kt (keys), padded head_dim of v / o
};

template <class T>
void load_keys(const FlashAttnParams& p, int64_t b, const Sequence& s, int64_t hk, int64_t lo, int64_t hi,
               Scratch& w) {
  const int64_t D = p.head_dim, n = hi - lo;
  w.ldk = round_up(n, kBk);
  w.dp = round_up(D, kTileW);
  w.kt.assign(static_cast<size_t>(D * w.ldk), 0.0f);
  w.v.assign(static_cast<size_t>(w.ldk * w.dp), 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = token_ptr<T>(p.k, p, b, s.k_begin, lo + j, hk);
    const T* vj = token_ptr<T>(p.v, p, b, s.k_begin, lo + j, hk);
    for (int64_t d = 0; d < D; ++d) w.kt[d * w.ldk + j] = to_float(kj[d]);
    float* vrow = w.v.data() + j * w.dp;
    int64_t d = 0;
    for (; d + kW <= D; d += kW) vstore(vrow + d, vload(vj + d));
    if (d < D) vstore_partial(vrow + d, vload_partial(vj + d, D - d), D - d);
  }
}

// S[r][c] = Q[r] . K[j0 + c] for rows [0, rows) (a multiple of kRows) and kBk keys.
void scores(const Scratch& w, int64_t D, int64_t rows, int64_t col0, float* S) {
  for (int64_t r = 0; r < rows; r += kRows) {
    const float* q = w.q.data() + r * D;
    for (int64_t c0 = 0; c0 < kBk; c0 += kTileW) {
      Vec acc[kRows][kTileCols];
      for (auto& row : acc)
        for (auto& a : row) a = vzero();
      const float* kt = w.kt.data() + col0 + c0;
      for (int64_t d = 0; d < D; ++d) {
        Vec kv[kTileCols];
        for (int64_t t = 0; t < kTileCols; ++t) kv[t] = vload(kt + d * w.ldk + t * kW);
        for (int64_t rr = 0; rr < kRows; ++rr) {
          const Vec qb = vset1(q[rr * D + d]);
          for (int64_t t = 0; t < kTileCols; ++t) acc[rr][t] = vfma(qb, kv[t], acc[rr][t]);
        }
      }
      for (int64_t rr = 0; rr < kRows; ++rr)
        for (int64_t t = 0; t < kTileCols; ++t) vstore(S + (r + rr) * kBk + c0 + t * kW, acc[rr][t]);
    }
  }
}

// O[r] += sum_c P[r][c] V[col0 + c] for rows [0, rows) and keys [0, n).
void accumulate_pv(Scratch& w, int64_t rows, int64_t col0, int64_t n, const float* P) {
  for (int64_t r = 0; r < rows; r += kRows) {
    for (int64_t d0 = 0; d0 < w.dp; d0 += kTileW) {
      Vec acc[kRows][kTileCols];
      for (int64_t rr = 0; rr < kRows; ++rr)
        for (int64_t t = 0; t < kTileCols; ++t) acc[rr][t] = vload(w.o.data() + (r + rr) * w.dp + d0 + t * kW);
      for (int64_t c = 0; c < n; ++c) {
        const float* vrow = w.v.data() + (col0 + c) * w.dp + d0;
        Vec vv[kTileCols];
        for (int64_t t = 0; t < kTileCols; ++t) vv[t] = vload(vrow + t * kW);
        for (int64_t rr = 0; rr < kRows; ++rr) {
          const Vec pb = vset1(P[(r + rr) * kBk + c]);
          for (int64_t t = 0; t < kTileCols; ++t) acc[rr][t] = vfma(pb, vv[t], acc[rr][t]);
        }
      }
      for (int64_t rr = 0; rr < kRows; ++rr)
        for (int64_t t = 0; t < kTileCols; ++t) vstore(w.o.data() + (r + rr) * w.dp + d0 + t * kW, acc[rr][t]);
    }
  }
}

// Columns [lo, hi) of a kBk block whose keys row i may attend to (keys past
// n, the block's real length, never count).
KeyRange visible(const FlashAttnParams& p, const Sequence& s, int64_t i, int64_t j0, int64_t n) {
  const KeyRange kr = key_range(p, s, i);
  const int64_t lo = std::clamp<int64_t>(kr.lo - j0, 0, n), hi = std::clamp<int64_t>(kr.hi - j0, lo, n);
  return {lo, hi};
}

void mask_outside(KeyRange keep, float* row, float value) {
  for (int64_t c = 0; c < keep.lo; ++c) row[c] = value;
  for (int64_t c = keep.hi; c < kBk; ++c) row[c] = value;
}

// softcap, ALiBi and the mask on one row of scores; keys j0 + c, c < kBk.
void shape_scores(const FlashAttnParams& p, const Sequence& s, int64_t i, int64_t j0, int64_t n, float slope,
                  float* row) {
  if (p.softcap > 0.0f) {
    const Vec inv = vset1(2.0f / p.softcap), cap = vset1(p.softcap), one = vset1(1.0f), two = vset1(2.0f);
    for (int64_t c = 0; c < kBk; c += kW) {  // softcap * tanh(x / softcap), tanh(y) = 1 - 2 / (exp(2y) + 1)
      const Vec e = vexp(vload(row + c) * inv);
      vstore(row + c, cap * (one - two * vrecip(e + one)));
    }
  }
  if (slope != 0.0f) {
    const Vec diag = vset1(static_cast<float>(i + s.sk - s.sq - j0)), ns = vset1(-slope);
    for (int64_t c = 0; c < kBk; c += kW) {
      const Vec dist = vabs(diag - (viota() + vset1(static_cast<float>(c))));
      vstore(row + c, vfma(ns, dist, vload(row + c)));
    }
  }
  mask_outside(visible(p, s, i, j0, n), row, -kInf);
}

template <class T>
void run_task(const FlashAttnParams& p, int64_t b, int64_t h, int64_t r0, int64_t r1, Scratch& w) {
  const Sequence s = sequence(p, b);
  r1 = r1 < s.sq ? r1 : s.sq;
  if (r0 >= r1) return;
  const int64_t D = p.head_dim, hk = h / (p.heads / p.heads_k);
  const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
  const KeyRange first = key_range(p, s, r0), last = key_range(p, s, r1 - 1);
  const int64_t lo = first.lo, hi = last.hi > lo ? last.hi : lo;  // window bounds grow with i
  load_keys<T>(p, b, s, hk, lo, hi, w);
  w.q.resize(static_cast<size_t>(kBq * D));
  w.s.resize(static_cast<size_t>(kBq * kBk));
  w.o.resize(static_cast<size_t>(kBq * w.dp));
  w.m.resize(kBq);
  w.l.resize(kBq);

  for (int64_t i0 = r0; i0 < r1; i0 += kBq) {
    const int64_t nr = r1 - i0 < kBq ? r1 - i0 : kBq, rows = round_up(nr, kRows);
    std::fill(w.q.begin(), w.q.end(), 0.0f);
    std::fill(w.o.begin(), w.o.end(), 0.0f);
    const Vec vscale = vset1(p.scale);
    for (int64_t r = 0; r < nr; ++r) {
      const T* qr = token_ptr<T>(p.q, p, b, s.q_begin, i0 + r, h);
      float* dst = w.q.data() + r * D;
      int64_t d = 0;
      for (; d + kW <= D; d += kW) vstore(dst + d, vload(qr + d) * vscale);
      if (d < D) vstore_partial(dst + d, vload_partial(qr + d, D - d) * vscale, D - d);
      w.m[r] = -kInf;
      w.l[r] = 0.0f;
    }
    // Keys this block can see, in kBk steps from the task's first key.
    const int64_t blo = key_range(p, s, i0).lo, bhi = key_range(p, s, i0 + nr - 1).hi;
    for (int64_t j0 = lo + (blo - lo) / kBk * kBk; j0 < bhi; j0 += kBk) {
      const int64_t n = bhi - j0 < kBk ? bhi - j0 : kBk;
      scores(w, D, rows, j0 - lo, w.s.data());
      for (int64_t r = 0; r < nr; ++r) {
        float* row = w.s.data() + r * kBk;
        shape_scores(p, s, i0 + r, j0, n, slope, row);
        Vec mx = vset1(-kInf);
        for (int64_t c = 0; c < kBk; c += kW) mx = vmax(mx, vload(row + c));
        const float m_new = std::max(w.m[r], vhmax(mx));
        if (m_new == -kInf) {  // nothing visible yet: P = 0
          for (int64_t c = 0; c < kBk; ++c) row[c] = 0.0f;
          continue;
        }
        const float alpha = std::exp(w.m[r] - m_new);  // 0 when m was -inf
        const Vec vm = vset1(m_new);
        for (int64_t c = 0; c < kBk; c += kW) vstore(row + c, vexp(vload(row + c) - vm));
        // vexp saturates at exp(-87) ~ 1.6e-38 rather than 0: masked keys are
        // zeroed explicitly so they stay out of l and O.
        mask_outside(visible(p, s, i0 + r, j0, n), row, 0.0f);
        Vec sum = vzero();
        for (int64_t c = 0; c < kBk; c += kW) sum = sum + vload(row + c);
        w.l[r] = w.l[r] * alpha + vsum(sum);
        w.m[r] = m_new;
        if (alpha != 1.0f) {
          const Vec va = vset1(alpha);
          float* o = w.o.data() + r * w.dp;
          for (int64_t d = 0; d < w.dp; d += kW) vstore(o + d, vload(o + d) * va);
        }
      }
      accumulate_pv(w, rows, j0 - lo, n, w.s.data());
    }
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t i = i0 + r;
      T* out = static_cast<T*>(p.out) + (p.cu_seqlens_q ? 0 : b * p.out_batch_stride) +
               (s.q_begin + i) * p.out_row_stride + h * p.out_head_stride;
      const float l = w.l[r];
      const Vec inv = vset1(l > 0.0f ? 1.0f / l : 0.0f);
      const float* o = w.o.data() + r * w.dp;
      int64_t d = 0;
      for (; d + kW <= D; d += kW) vstore(out + d, vload(o + d) * inv);
      if (d < D) vstore_partial(out + d, vload_partial(o + d, D - d) * inv, D - d);
      const int64_t lse_at = (p.cu_seqlens_q ? s.q_begin + i : b * p.lse_batch_stride + i) + h * p.lse_head_stride;
      p.lse[lse_at] = l > 0.0f ? w.m[r] + std::log(l) : kInf;
    }
  }
}

}  // namespace

void flash_attn_fwd(const FlashAttnParams& p) {
  // Enough tasks for every thread even when batch * heads is small.
  const int64_t bh = p.batch * p.heads;
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t chunks = bh >= want ? 1 : (want + bh - 1) / bh;
  const int64_t chunk_rows = round_up((p.seqlen_q + chunks - 1) / chunks, kBq);
  chunks = (p.seqlen_q + chunk_rows - 1) / chunk_rows;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, bh * chunks, 1, [&](int64_t lo, int64_t hi) {
      Scratch w;
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t b = t / (p.heads * chunks), h = t / chunks % p.heads, c = t % chunks;
        run_task<T>(p, b, h, c * chunk_rows, (c + 1) * chunk_rows, w);
      }
    });
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
