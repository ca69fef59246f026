// FlashAttention-2 forward, CPU (compiled once per ISA; see common/cpu/vec.h).
//
// Work is split into tasks of (sequence, head, chunk of query rows) so a few
// long sequences still fill every thread. A task first widens the keys it can
// see to fp32, K transposed (head_dim x keys) and V as is, then walks its
// query rows in blocks of kBq:
//   S = (scale * Q) K^T        gemm_nt, kBk keys at a time
//   online softmax per row     running max m and sum l; O rescaled by exp(m_old - m_new)
//   O += P V                   gemm_acc
// All math is fp32; scratch is O(keys * head_dim) per task, never O(sq * sk).
//
// A few queries per sequence (decode) go to the paged decode kernel instead
// (flash_attn_decode.cpp).
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

// Scratch of one task, reused across its query blocks.
struct Scratch {
  std::vector<float> kt, v, q, s, o, m, l;
  std::vector<KeyRange> seen;  // visible columns of the current key block, per row
  std::vector<uint16_t> kt2, v2, qb, pb;  // bf16 dot-product path (see attn_common.h)
  int64_t ldk = 0, dp = 0;  // columns of kt (keys), padded head_dim of v / o
};

// bf16 inputs on CPUs with AVX512_BF16 multiply in bf16 (exact products, fp32
// sums), the probabilities rounded to bf16 for P V as torch's own CPU kernel does.
template <class T>
constexpr bool use_bf16_dot() {
  return kBf16Dot && std::is_same_v<T, bf16_t>;
}

#if defined(__AVX512BF16__)
// K transposed into column pairs (kt2: pairs x ldk 32-bit words, each the
// bf16 values of columns 2i and 2i + 1 of one key), V into key pairs (v2:
// ldk / 2 x dp words, values of keys 2j and 2j + 1 in one column): the
// operand layouts of vdpbf16ps.
void load_keys_bf16(const FlashAttnParams& p, int64_t b, const Sequence& s, int64_t hk, int64_t lo, int64_t hi,
                    Scratch& w) {
  const int64_t D = p.head_dim, pairs = (D + 1) / 2, n = hi - lo;
  w.ldk = round_up(n, kBk);
  w.dp = round_up(D, kTileW);
  w.kt2.assign(static_cast<size_t>(pairs * w.ldk * 2), 0);
  w.v2.assign(static_cast<size_t>(w.ldk / 2 * w.dp * 2), 0);
  transpose_column_pairs(key_rows<uint16_t>(p.k, p, b, s, hk, lo, n).data(), n, D, w.kt2.data(), w.ldk);
  interleave_row_pairs(key_rows<uint16_t>(p.v, p, b, s, hk, lo, n).data(), n, D, w.v2.data(), w.dp);
}
#endif

// K transposed and widened in panels of kTileW keys, the layout gemm_nt
// reads front to back (kt: ldk / kTileW panels of D x kTileW), V widened
// (v: ldk x dp; in panels too it measured no faster).
template <class T>
void load_keys(const FlashAttnParams& p, int64_t b, const Sequence& s, int64_t hk, int64_t lo, int64_t hi,
               Scratch& w) {
  const int64_t D = p.head_dim, n = hi - lo;
  w.ldk = round_up(n, kBk);
  w.dp = round_up(D, kTileW);
  w.kt.assign(static_cast<size_t>(D * w.ldk), 0.0f);
  w.v.assign(static_cast<size_t>(w.ldk * w.dp), 0.0f);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  constexpr int64_t kAhead = 16;  // rows prefetched ahead of the widening
  const std::vector<const T*> vrows = key_rows<T>(p.v, p, b, s, hk, lo, n);
  prefetch_rows(vrows.data(), std::min(kAhead, n), row_bytes);
  for (int64_t j = 0; j < n; ++j) {
    if (j + kAhead < n) prefetch_rows(vrows.data() + j + kAhead, 1, row_bytes);
    widen(vrows[j], w.v.data() + j * w.dp, D);
  }
  const std::vector<const T*> krows = key_rows<T>(p.k, p, b, s, hk, lo, n);
  prefetch_rows(krows.data(), std::min(kTileW, n), row_bytes);
  for (int64_t j = 0; j < n; j += kTileW) {
    if (j + kTileW < n) prefetch_rows(krows.data() + j + kTileW, std::min(kTileW, n - j - kTileW), row_bytes);
    transpose_rows(krows.data() + j, std::min(kTileW, n - j), D, w.kt.data() + j * D, kTileW);
  }
}

// Online-softmax update of one row of scores (turned into probabilities in
// place); rescales the row's output accumulator.
void softmax_step(float* row, KeyRange keep, float& m, float& l, float* o, int64_t dp) {
  Vec mx = vset1(-kInf);
  for (int64_t c = 0; c < kBk; c += kW) mx = vmax(mx, vload(row + c));
  const float m_new = std::max(m, vhmax(mx));
  if (m_new == -kInf) {  // nothing visible yet: P = 0
    for (int64_t c = 0; c < kBk; ++c) row[c] = 0.0f;
    return;
  }
  const float alpha = m_new == m ? 1.0f : std::exp(m - m_new);  // 0 when m was -inf
  const Vec vm = vset1(m_new);
  Vec sum = vzero();
  if (keep.lo == 0 && keep.hi == kBk) {
    for (int64_t c = 0; c < kBk; c += kW) {
      const Vec e = vexp_nonpos(vload(row + c) - vm);
      vstore(row + c, e);
      sum = sum + e;
    }
  } else {
    for (int64_t c = 0; c < kBk; c += kW) vstore(row + c, vexp_nonpos(vload(row + c) - vm));
    // vexp_nonpos saturates at 2^-125 rather than 0: hidden keys are
    // zeroed explicitly so they stay out of l and O.
    fill_outside(keep, row, 0.0f);
    for (int64_t c = 0; c < kBk; c += kW) sum = sum + vload(row + c);
  }
  l = l * alpha + vsum(sum);
  m = m_new;
  if (alpha != 1.0f) {
    const Vec va = vset1(alpha);
    for (int64_t d = 0; d < dp; d += kW) vstore(o + d, vload(o + d) * va);
  }
}

// Query rows [r0, r1) of sequence b for every query head of kv head hk:
// the keys are widened once for the whole GQA group.
template <class T>
void run_task(const FlashAttnParams& p, int64_t b, int64_t hk, int64_t r0, int64_t r1, Scratch& w) {
  const Sequence s = sequence(p, b);
  r1 = std::min(r1, s.sq);
  if (r0 >= r1) return;
  const int64_t D = p.head_dim, group = p.heads / p.heads_k;
  const int64_t lo = key_range(p, s, r0).lo, hi = std::max(key_range(p, s, r1 - 1).hi, lo);
  constexpr bool bf16_dot = use_bf16_dot<T>();
  const int64_t pairs = (D + 1) / 2;
#if defined(__AVX512BF16__)
  if constexpr (bf16_dot) {
    load_keys_bf16(p, b, s, hk, lo, hi, w);
    w.qb.resize(static_cast<size_t>(kBq * 2 * pairs));
    w.pb.resize(static_cast<size_t>(kBq * kBk));
  } else
#endif
    load_keys<T>(p, b, s, hk, lo, hi, w);
  w.q.resize(static_cast<size_t>(kBq * D));
  w.s.resize(static_cast<size_t>(kBq * kBk));
  w.o.resize(static_cast<size_t>(kBq * w.dp));
  w.seen.resize(kBq);
  w.m.resize(kBq);
  w.l.resize(kBq);

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const float slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.0f;
    for (int64_t i0 = r0; i0 < r1; i0 += kBq) {
      const int64_t nr = std::min(r1 - i0, kBq), rows = round_up(nr, kRows);
      // Only the rows the tiles use (a short prompt's block has few of
      // kBq: clearing all of them was 14% of a 16-row fp32 forward).
      std::fill_n(w.o.begin(), rows * w.dp, 0.0f);
      if (bf16_dot)
        std::fill_n(w.qb.begin(), rows * 2 * pairs, 0);
      else
        std::fill_n(w.q.begin(), rows * D, 0.0f);
      for (int64_t r = 0; r < nr; ++r) {
        const T* qr = static_cast<const T*>(p.q.ptr) + token_offset(p.q, p, b, s.q_begin, i0 + r, h);
        if (bf16_dot)
          std::memcpy(w.qb.data() + r * 2 * pairs, qr, static_cast<size_t>(D) * sizeof(T));
        else
          widen(qr, w.q.data() + r * D, D, p.scale);
        w.m[r] = -kInf;
        w.l[r] = 0.0f;
      }
      if (i0 + kBq < r1) {  // the next block's query rows, into L2 while this block computes
        const T* next = static_cast<const T*>(p.q.ptr) + token_offset(p.q, p, b, s.q_begin, i0 + kBq, h);
        prefetch_rows(next, p.q.row_stride, std::min(kBq, r1 - i0 - kBq), D * static_cast<int64_t>(sizeof(T)));
      }
      // Keys this block can see, in kBk steps from the task's first key.
      const int64_t blo = key_range(p, s, i0).lo, bhi = key_range(p, s, i0 + nr - 1).hi;
      for (int64_t j0 = lo + (blo - lo) / kBk * kBk; j0 < bhi; j0 += kBk) {
        const int64_t n = std::min(bhi - j0, kBk);
        for (int64_t r = 0; r < rows; ++r) w.seen[r] = visible(p, s, i0 + std::min(r, nr - 1), j0, n);
#if defined(__AVX512BF16__)
        if constexpr (bf16_dot)
          gemm_nt_bf16(w.qb.data(), 2 * pairs, w.kt2.data() + (j0 - lo) * 2, w.ldk, w.s.data(), kBk, rows, pairs, kBk,
                       p.scale, w.seen.data());
        else
#endif
          gemm_nt(w.q.data(), D, w.kt.data() + (j0 - lo) * D, kTileW, w.s.data(), kBk, rows, D, kBk, D * kTileW,
                  w.seen.data());
        for (int64_t r = 0; r < nr; ++r) {
          float* row = w.s.data() + r * kBk;
          shape_scores(p, s, i0 + r, j0, n, slope, row);
          softmax_step(row, w.seen[r], w.m[r], w.l[r], w.o.data() + r * w.dp, w.dp);
        }
        for (int64_t r = nr; r < rows; ++r) std::fill_n(w.s.data() + r * kBk, kBk, 0.0f);
#if defined(__AVX512BF16__)
        if constexpr (bf16_dot) {
          auto* pb = reinterpret_cast<bf16_t*>(w.pb.data());
          for (int64_t c = 0; c < rows * kBk; c += kW) vstore(pb + c, vload(w.s.data() + c));
          gemm_acc_bf16(w.pb.data(), kBk, w.v2.data() + (j0 - lo) / 2 * w.dp * 2, w.dp, w.o.data(), w.dp, rows,
                        (n + 1) / 2, w.dp, w.seen.data());
        } else
#endif
          gemm_acc(w.s.data(), kBk, w.v.data() + (j0 - lo) * w.dp, w.dp, w.o.data(), w.dp, rows, n, w.dp,
                   w.seen.data());
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t i = i0 + r;
        T* out = static_cast<T*>(p.out.ptr) + token_offset(p.out, p, b, s.q_begin, i, h);
        const float l = w.l[r];
        narrow(w.o.data() + r * w.dp, out, D, l > 0.0f ? 1.0f / l : 0.0f);
        p.lse[lse_index(p, s, b, h, i)] = l > 0.0f ? w.m[r] + std::log(l) : kInf;
      }
    }
  }
}

}  // namespace

void flash_attn_fwd(const FlashAttnParams& p) {
  if (attn::forward_in_decode_kernel(p)) return;
  // Tasks of (sequence, kv head, chunk of query rows); enough of them for
  // every thread even when batch * heads_k is small.
  const int64_t bh = p.batch * p.heads_k;
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t chunks = bh >= want ? 1 : (want + bh - 1) / bh;
  const int64_t chunk_rows = round_up((p.seqlen_q + chunks - 1) / chunks, kBq);
  chunks = (p.seqlen_q + chunk_rows - 1) / chunk_rows;
  // Largest tasks first (query rows times the keys they see), dealt to
  // threads one at a time: a varlen batch's long sequence, or a causal
  // sequence's last chunk, starts early instead of ending some thread's
  // fixed share late.
  std::vector<int64_t> work(static_cast<size_t>(bh * chunks), 0);
  for (int64_t t = 0; t < bh * chunks; ++t) {
    const Sequence s = sequence(p, t / (p.heads_k * chunks));
    const int64_t r0 = t % chunks * chunk_rows, r1 = std::min(r0 + chunk_rows, s.sq);
    if (r0 < r1) {
      const KeyRange first = key_range(p, s, r0), last = key_range(p, s, r1 - 1);
      work[t] = (first.hi - first.lo + last.hi - last.lo) * (r1 - r0);  // twice the keys seen, rows linear in between
    }
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_tasks_largest_first(work, [] { return Scratch{}; }, [&](Scratch& w, int64_t t) {
      const int64_t b = t / (p.heads_k * chunks), hk = t / chunks % p.heads_k, c = t % chunks;
      run_task<T>(p, b, hk, c * chunk_rows, (c + 1) * chunk_rows, w);
    });
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
