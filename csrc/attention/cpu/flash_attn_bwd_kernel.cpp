// FlashAttention-2 backward, CPU (compiled once per ISA; see common/cpu/vec.h).
//
// With P = exp(S - lse) recomputed block by block (no S matrix is stored):
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//   dX = dS (* (1 - tanh^2) under softcap),  dK = dX^T (scale Q),  dQ = scale dX K
// Tasks are (sequence, kv head, chunk of keys): a task owns dK and dV of its
// keys and sums the whole GQA group into them, so they need no reduction. dQ
// gets one fp32 partial per key chunk, summed in chunk order at the end:
// results are bitwise the same on every run.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attention/cpu/attn_common.h"
#include "common/cpu/layouts.h"
#include "common/parallel.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

using namespace attn;

struct Scratch {
  std::vector<float> kt, vt, k;      // keys of the task: K^T, V^T (panels, see load_keys), K (ldk x dp)
  std::vector<float> dk, dv;         // accumulators (ldk x dp)
  std::vector<float> q, dout;        // one query block (kBq x dp), q pre-scaled
  std::vector<float> s, dp, th;      // (kBq x kBk): scores -> P, dP -> dS, tanh for softcap
  std::vector<float> pt, dst, dq;    // P^T, dS^T (kBk x kBq), dQ of the block (kBq x dp)
  // bf16 dot-product path (attn_common.h): the same operands in bf16, pair-
  // interleaved along each product's reduction dimension.
  std::vector<uint16_t> kt2, vt2, k2;           // over head_dim (K^T, V^T), over keys (K)
  std::vector<uint16_t> qb, dob, q2, do2;       // rows as given; pair-interleaved over queries
  std::vector<uint16_t> pt_b, dst_b, ds_b;      // P^T, dS^T, dS rounded to bf16
  int64_t ldk = 0, dpad = 0;
};

// bf16 inputs on AVX512_BF16: all five products in bf16 with fp32 sums, P and
// dS rounded to bf16 as torch's own CPU kernel does.
template <class T>
constexpr bool use_bf16_dot() {
  return kBf16Dot && std::is_same_v<T, bf16_t>;
}

#if defined(__AVX512BF16__)
void load_keys_bf16(const FlashAttnParams& p, int64_t b, const Sequence& s, int64_t hk, int64_t k0, int64_t n,
                    Scratch& w) {
  const int64_t D = p.head_dim, pairs = (D + 1) / 2;
  w.ldk = round_up(n, kBk);
  w.dpad = round_up(D, kTileW);
  w.kt2.assign(static_cast<size_t>(pairs * w.ldk * 2), 0);
  w.vt2.assign(static_cast<size_t>(pairs * w.ldk * 2), 0);
  w.k2.assign(static_cast<size_t>(w.ldk / 2 * w.dpad * 2), 0);
  w.dk.assign(static_cast<size_t>(w.ldk * w.dpad), 0.0f);
  w.dv.assign(static_cast<size_t>(w.ldk * w.dpad), 0.0f);
  const std::vector<const uint16_t*> krows = key_rows<uint16_t>(p.k, p, b, s, hk, k0, n);
  const std::vector<const uint16_t*> vrows = key_rows<uint16_t>(p.v, p, b, s, hk, k0, n);
  transpose_column_pairs(krows.data(), n, D, w.kt2.data(), w.ldk);
  transpose_column_pairs(vrows.data(), n, D, w.vt2.data(), w.ldk);
  interleave_row_pairs(krows.data(), n, D, w.k2.data(), w.dpad);
}

void to_bf16(const float* src, uint16_t* dst, int64_t n) {  // n a multiple of kW
  for (int64_t c = 0; c < n; c += kW) vstore(reinterpret_cast<bf16_t*>(dst) + c, vload(src + c));
}
#endif

template <class T>
void load_keys(const FlashAttnParams& p, int64_t b, const Sequence& s, int64_t hk, int64_t k0, int64_t n,
               Scratch& w) {
  const int64_t D = p.head_dim;
  w.ldk = round_up(n, kBk);
  w.dpad = round_up(D, kTileW);
  w.kt.assign(static_cast<size_t>(D * w.ldk), 0.0f);
  w.vt.assign(static_cast<size_t>(D * w.ldk), 0.0f);
  w.k.assign(static_cast<size_t>(w.ldk * w.dpad), 0.0f);
  w.dk.assign(static_cast<size_t>(w.ldk * w.dpad), 0.0f);
  w.dv.assign(static_cast<size_t>(w.ldk * w.dpad), 0.0f);
  const std::vector<const T*> krows = key_rows<T>(p.k, p, b, s, hk, k0, n), vrows = key_rows<T>(p.v, p, b, s, hk, k0, n);
  for (int64_t j = 0; j < n; ++j) widen(krows[j], w.k.data() + j * w.dpad, D);
  // K^T and V^T in panels of kTileW keys, as the forward packs K (see gemm_nt).
  for (int64_t j = 0; j < n; j += kTileW) {
    transpose_rows(krows.data() + j, std::min(kTileW, n - j), D, w.kt.data() + j * D, kTileW);
    transpose_rows(vrows.data() + j, std::min(kTileW, n - j), D, w.vt.data() + j * D, kTileW);
  }
}

void transpose_block(const float* src, float* dst) {  // (kBq x kBk) -> (kBk x kBq)
  transpose_tile(src, kBk, dst, kBq, kBq, kBk);
}

// One block of query rows (and their output gradients) of head h, zero-padded to kBq.
template <class T>
void load_query_block(const FlashAttnBwdParams& bp, int64_t b, const Sequence& s, int64_t h, int64_t i0, int64_t nr,
                      Scratch& w) {
  const FlashAttnParams& p = bp.fwd;
  const int64_t D = p.head_dim, dp = w.dpad;
  std::fill(w.q.begin(), w.q.end(), 0.0f);
  std::fill(w.dout.begin(), w.dout.end(), 0.0f);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = i0 + r;
    widen(static_cast<const T*>(p.q.ptr) + token_offset(p.q, p, b, s.q_begin, i, h), w.q.data() + r * dp, D, p.scale);
    widen(static_cast<const T*>(bp.dout.ptr) + token_offset(bp.dout, p, b, s.q_begin, i, h), w.dout.data() + r * dp,
          D);
  }
}

#if defined(__AVX512BF16__)
void load_query_block_bf16(const FlashAttnBwdParams& bp, int64_t b, const Sequence& s, int64_t h, int64_t i0,
                           int64_t nr, Scratch& w) {
  const FlashAttnParams& p = bp.fwd;
  const int64_t D = p.head_dim, dp = w.dpad, ld = 2 * ((D + 1) / 2);
  for (auto* v : {&w.qb, &w.dob, &w.q2, &w.do2}) std::fill(v->begin(), v->end(), 0);
  const uint16_t* qrows[kBq];
  const uint16_t* grows[kBq];
  for (int64_t r = 0; r < nr; ++r) {
    qrows[r] = static_cast<const uint16_t*>(p.q.ptr) + token_offset(p.q, p, b, s.q_begin, i0 + r, h);
    grows[r] = static_cast<const uint16_t*>(bp.dout.ptr) + token_offset(bp.dout, p, b, s.q_begin, i0 + r, h);
    std::memcpy(w.qb.data() + r * ld, qrows[r], static_cast<size_t>(D) * 2);
    std::memcpy(w.dob.data() + r * ld, grows[r], static_cast<size_t>(D) * 2);
  }
  interleave_row_pairs(qrows, nr, D, w.q2.data(), dp);
  interleave_row_pairs(grows, nr, D, w.do2.data(), dp);
}
#endif

template <class T>
void run_task(const FlashAttnBwdParams& bp, const float* delta, float* dq_partial, int64_t b, int64_t hk,
              int64_t k0, int64_t k1, Scratch& w) {
  const FlashAttnParams& p = bp.fwd;
  const Sequence s = sequence(p, b);
  k1 = std::min(k1, s.sk);
  if (k0 >= k1) return;
  const int64_t D = p.head_dim, group = p.heads / p.heads_k, nk = k1 - k0;
  if (s.sq == 0) {  // keys no query reads: their gradients are zero (and must be written)
    for (int64_t j = k0; j < k1; ++j) {
      std::fill_n(static_cast<T*>(bp.dk.ptr) + token_offset(bp.dk, p, b, s.k_begin, j, hk), D, from_float<T>(0.0f));
      std::fill_n(static_cast<T*>(bp.dv.ptr) + token_offset(bp.dv, p, b, s.k_begin, j, hk), D, from_float<T>(0.0f));
    }
    return;
  }
  constexpr bool bf16_dot = use_bf16_dot<T>();
  [[maybe_unused]] const int64_t pairs = (D + 1) / 2;  // bf16 dot-product path only
#if defined(__AVX512BF16__)
  if constexpr (bf16_dot) {
    load_keys_bf16(p, b, s, hk, k0, nk, w);
    w.qb.resize(static_cast<size_t>(kBq * 2 * pairs));
    w.dob.resize(static_cast<size_t>(kBq * 2 * pairs));
    w.q2.resize(static_cast<size_t>(kBq * w.dpad));
    w.do2.resize(static_cast<size_t>(kBq * w.dpad));
    w.pt_b.resize(kBk * kBq);
    w.dst_b.resize(kBk * kBq);
    w.ds_b.resize(kBq * kBk);
  } else
#endif
    load_keys<T>(p, b, s, hk, k0, nk, w);
  const int64_t dp = w.dpad;
  w.q.resize(static_cast<size_t>(kBq * dp));
  w.dout.resize(static_cast<size_t>(kBq * dp));
  w.s.resize(kBq * kBk);
  w.dp.resize(kBq * kBk);
  w.th.resize(kBq * kBk);
  w.pt.resize(kBk * kBq);
  w.dst.resize(kBk * kBq);
  w.dq.resize(static_cast<size_t>(kBq * dp));

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
    for (int64_t i0 = 0; i0 < s.sq; i0 += kBq) {
      const int64_t nr = std::min(s.sq - i0, kBq), rows = round_up(nr, kRows);
      // Skip query blocks that see none of this task's keys.
      if (key_range(p, s, i0 + nr - 1).hi <= k0 || key_range(p, s, i0).lo >= k1) continue;
#if defined(__AVX512BF16__)
      if constexpr (bf16_dot)
        load_query_block_bf16(bp, b, s, h, i0, nr, w);
      else
#endif
        load_query_block<T>(bp, b, s, h, i0, nr, w);
      std::fill(w.dq.begin(), w.dq.end(), 0.0f);
      const int64_t blo = std::max(key_range(p, s, i0).lo, k0), bhi = std::min(key_range(p, s, i0 + nr - 1).hi, k1);
      for (int64_t j0 = k0 + (blo - k0) / kBk * kBk; j0 < bhi; j0 += kBk) {
        const int64_t col0 = j0 - k0, n = std::min(k1 - j0, kBk);
#if defined(__AVX512BF16__)
        if constexpr (bf16_dot) {
          gemm_nt_bf16(w.qb.data(), 2 * pairs, w.kt2.data() + col0 * 2, w.ldk, w.s.data(), kBk, rows, pairs, kBk,
                       p.scale);
          gemm_nt_bf16(w.dob.data(), 2 * pairs, w.vt2.data() + col0 * 2, w.ldk, w.dp.data(), kBk, rows, pairs,
                       kBk, 1.0f);
        } else
#endif
        {
          gemm_nt(w.q.data(), dp, w.kt.data() + col0 * D, kTileW, w.s.data(), kBk, rows, D, kBk, D * kTileW);
          gemm_nt(w.dout.data(), dp, w.vt.data() + col0 * D, kTileW, w.dp.data(), kBk, rows, D, kBk, D * kTileW);
        }
        for (int64_t r = 0; r < kBq; ++r) {
          float* prow = w.s.data() + r * kBk;
          float* dsrow = w.dp.data() + r * kBk;
          if (r >= nr) {
            std::fill_n(prow, kBk, 0.0f);
            std::fill_n(dsrow, kBk, 0.0f);
            continue;
          }
          const int64_t i = i0 + r;
          float* th = p.softcap > 0.0f ? w.th.data() + r * kBk : nullptr;
          shape_scores(p, s, i, j0, n, slope, prow, th);
          const float lse = p.lse[lse_index(p, s, b, h, i)];
          const KeyRange keep = visible(p, s, i, j0, n);
          if (lse == kInf) {  // the row saw no key: no gradient through it
            std::fill_n(prow, kBk, 0.0f);
            std::fill_n(dsrow, kBk, 0.0f);
            continue;
          }
          const Vec vl = vset1(lse), vdelta = vset1(delta[lse_index(p, s, b, h, i)]), one = vset1(1.0f);
          for (int64_t c = 0; c < kBk; c += kW) {
            const Vec pv = vexp_nonpos(vload(prow + c) - vl);
            Vec ds = pv * (vload(dsrow + c) - vdelta);
            if (th) {
              const Vec t = vload(th + c);
              ds = ds * (one - t * t);
            }
            vstore(prow + c, pv);
            vstore(dsrow + c, ds);
          }
          fill_outside(keep, prow, 0.0f);
          fill_outside(keep, dsrow, 0.0f);
        }
        transpose_block(w.s.data(), w.pt.data());
        transpose_block(w.dp.data(), w.dst.data());
        const int64_t key_rows = round_up(n, kRows);
#if defined(__AVX512BF16__)
        if constexpr (bf16_dot) {
          to_bf16(w.pt.data(), w.pt_b.data(), kBk * kBq);
          to_bf16(w.dst.data(), w.dst_b.data(), kBk * kBq);
          to_bf16(w.dp.data(), w.ds_b.data(), kBq * kBk);
          gemm_acc_bf16(w.pt_b.data(), kBq, w.do2.data(), dp, w.dv.data() + col0 * dp, dp, key_rows, rows / 2, dp);
          gemm_acc_bf16(w.dst_b.data(), kBq, w.q2.data(), dp, w.dk.data() + col0 * dp, dp, key_rows, rows / 2, dp);
          gemm_acc_bf16(w.ds_b.data(), kBk, w.k2.data() + col0 / 2 * dp * 2, dp, w.dq.data(), dp, rows, (n + 1) / 2,
                        dp);
        } else
#endif
        {
          gemm_acc(w.pt.data(), kBq, w.dout.data(), dp, w.dv.data() + col0 * dp, dp, key_rows, rows, dp);
          gemm_acc(w.dst.data(), kBq, w.q.data(), dp, w.dk.data() + col0 * dp, dp, key_rows, rows, dp);
          gemm_acc(w.dp.data(), kBk, w.k.data() + col0 * dp, dp, w.dq.data(), dp, rows, n, dp);
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        float* dst = dq_partial + token_offset(bp.dq, p, b, s.q_begin, i0 + r, h);
        const float* src = w.dq.data() + r * dp;
        for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
      }
    }
  }
  // The fp32 path pre-scales Q; the bf16 one keeps Q exact and scales dK here.
  const float dk_scale = bf16_dot ? p.scale : 1.0f;
  for (int64_t j = 0; j < nk; ++j) {
    narrow(w.dk.data() + j * dp, static_cast<T*>(bp.dk.ptr) + token_offset(bp.dk, p, b, s.k_begin, k0 + j, hk), D,
           dk_scale);
    narrow(w.dv.data() + j * dp, static_cast<T*>(bp.dv.ptr) + token_offset(bp.dv, p, b, s.k_begin, k0 + j, hk), D);
  }
}

// Score entries a task of keys [k0, k1) computes (per head), counted the way
// run_task walks the query blocks: the ordering key for dealing tasks.
int64_t task_work(const FlashAttnParams& p, const Sequence& s, int64_t k0, int64_t k1) {
  k1 = std::min(k1, s.sk);
  int64_t work = 0;
  for (int64_t i0 = 0; i0 < s.sq && k0 < k1; i0 += kBq) {
    const int64_t nr = std::min(s.sq - i0, kBq);
    const int64_t lo = std::max(key_range(p, s, i0).lo, k0), hi = std::min(key_range(p, s, i0 + nr - 1).hi, k1);
    if (lo < hi) work += nr * (hi - lo);
  }
  return work;
}

// delta_i = sum_d dout_i[d] * out_i[d], laid out like lse.
template <class T>
std::vector<float> row_deltas(const FlashAttnBwdParams& bp) {
  const FlashAttnParams& p = bp.fwd;
  const int64_t lse_size = p.cu_seqlens_q ? p.heads * p.lse_head_stride : p.batch * p.lse_batch_stride;
  std::vector<float> delta(static_cast<size_t>(lse_size), 0.0f);
  parallel_for(0, p.batch * p.heads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / p.heads, h = t % p.heads;
      const Sequence s = sequence(p, b);
      for (int64_t i = 0; i < s.sq; ++i) {
        const T* o = static_cast<const T*>(p.out.ptr) + token_offset(p.out, p, b, s.q_begin, i, h);
        const T* g = static_cast<const T*>(bp.dout.ptr) + token_offset(bp.dout, p, b, s.q_begin, i, h);
        float acc = 0.0f;
        for (int64_t d = 0; d < p.head_dim; ++d) acc += to_float(o[d]) * to_float(g[d]);
        delta[lse_index(p, s, b, h, i)] = acc;
      }
    }
  });
  return delta;
}

}  // namespace

void flash_attn_bwd(const FlashAttnBwdParams& bp) {
  const FlashAttnParams& p = bp.fwd;
  const int64_t bh = p.batch * p.heads_k;
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  // Key chunks per (sequence, kv head): enough tasks for every thread, at most
  // four dQ partials.
  int64_t chunks = std::min<int64_t>(bh >= want ? 1 : (want + bh - 1) / bh, 4);
  const int64_t chunk_keys = round_up((p.seqlen_k + chunks - 1) / chunks, kBk);
  chunks = (p.seqlen_k + chunk_keys - 1) / chunk_keys;
  // dQ partials share dq's (contiguous) layout, one full copy per chunk.
  const int64_t q_tokens = p.cu_seqlens_q ? p.lse_head_stride : p.batch * p.seqlen_q;
  const int64_t dq_size = q_tokens * p.heads * p.head_dim;
  // Largest tasks first, as in the forward: a causal sequence's first key
  // chunk is read by every query, its last by few.
  std::vector<int64_t> work(static_cast<size_t>(bh * chunks));
  for (int64_t t = 0; t < bh * chunks; ++t) {
    const int64_t c = t % chunks;
    work[t] = task_work(p, sequence(p, t / (p.heads_k * chunks)), c * chunk_keys, (c + 1) * chunk_keys);
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> delta = row_deltas<T>(bp);
    std::vector<float> partial(static_cast<size_t>(chunks * dq_size), 0.0f);
    // Each task writes only its own keys' dK, dV and its own rows of partial
    // c, so dealing the tasks dynamically keeps the result deterministic.
    parallel_tasks_largest_first(work, [] { return Scratch{}; }, [&](Scratch& w, int64_t t) {
      const int64_t b = t / (p.heads_k * chunks), hk = t / chunks % p.heads_k, c = t % chunks;
      run_task<T>(bp, delta.data(), partial.data() + c * dq_size, b, hk, c * chunk_keys, (c + 1) * chunk_keys, w);
    });
    // dq = scale * sum of the partials, in chunk order.
    T* dq = static_cast<T*>(bp.dq.ptr);
    parallel_for(0, dq_size, 1 << 14, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        float acc = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) acc += partial[c * dq_size + e];
        dq[e] = from_float<T>(acc * p.scale);
      }
    });
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
