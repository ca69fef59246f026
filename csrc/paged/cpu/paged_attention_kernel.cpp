// Paged decode attention, CPU (compiled once per ISA; see common/cpu/vec.h).
//
// Decode is bound by reading K and V once, so a task is (sequence, split of
// the context) and reads each cache block it needs once, front to back, for
// every head; each K/V row serves all query heads of its GQA group. Keys are
// taken kChunk at a time: scores, one online-softmax rescale per chunk and
// head, then P V with head_dim in the outer loop so accumulators stay in
// registers. Splits write (m, l, o) partials that a combine step merges
// (Flash-Decoding).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "paged/paged_attention.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

constexpr int64_t kChunk = 64;      // keys per softmax step
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Partials {
  std::vector<float> o, m, l;  // (seqs, heads, splits, D) and (seqs, heads, splits)
  int64_t splits = 1, dp = 0;
};

// Scores of HT query heads (rows of q, dp apart) against n keys: four keys at
// a time, so 4 x HT independent FMA chains hide the latency and each K row is
// widened once for all HT heads.
template <int HT, class T>
void group_scores(const float* q, int64_t dp, int64_t D, const T* const* krows, int64_t n, float* sc) {
  for (int64_t c0 = 0; c0 < n; c0 += 4) {
    const int64_t nk = std::min<int64_t>(4, n - c0);
    const T* kr[4];
    for (int64_t u = 0; u < 4; ++u) kr[u] = krows[c0 + (u < nk ? u : 0)];  // repeat a row past the end
    Vec acc[HT][4];
    for (auto& a : acc)
      for (auto& x : a) x = vzero();
    int64_t d = 0;
    for (; d + kW <= D; d += kW) {
      Vec kv[4];
      for (int64_t u = 0; u < 4; ++u) kv[u] = vload(kr[u] + d);
      for (int g = 0; g < HT; ++g) {
        const Vec qv = vload(q + g * dp + d);
        for (int64_t u = 0; u < 4; ++u) acc[g][u] = vfma(qv, kv[u], acc[g][u]);
      }
    }
    if (d < D) {
      Vec kv[4];
      for (int64_t u = 0; u < 4; ++u) kv[u] = vload_partial(kr[u] + d, D - d);
      for (int g = 0; g < HT; ++g) {
        const Vec qv = vload(q + g * dp + d);  // q rows are zero-padded to dp
        for (int64_t u = 0; u < 4; ++u) acc[g][u] = vfma(qv, kv[u], acc[g][u]);
      }
    }
    for (int g = 0; g < HT; ++g) {
      float four[4];
      vsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], four);
      for (int64_t u = 0; u < nk; ++u) sc[g * kChunk + c0 + u] = four[u];
    }
  }
}

// acc[g] += sum_c P[g][c] V[c] for HT heads; head_dim outer so the
// accumulators stay in registers, two per head (even / odd keys) for more
// independent FMA chains.
template <int HT, class T>
void group_pv(const float* sc, const T* const* vrows, int64_t n, int64_t D, float* acc, int64_t dp) {
  for (int64_t d = 0; d < D; d += kW) {
    const int64_t w = std::min<int64_t>(kW, D - d);
    Vec a[HT][2];
    for (int g = 0; g < HT; ++g) {
      a[g][0] = vload(acc + g * dp + d);
      a[g][1] = vzero();
    }
    auto load_v = [&](int64_t c0) { return w == kW ? vload(vrows[c0] + d) : vload_partial(vrows[c0] + d, w); };
    int64_t c0 = 0;
    for (; c0 + 2 <= n; c0 += 2) {  // even and odd keys into separate accumulators
      const Vec v0 = load_v(c0), v1 = load_v(c0 + 1);
      for (int g = 0; g < HT; ++g) {
        a[g][0] = vfma(vset1(sc[g * kChunk + c0]), v0, a[g][0]);
        a[g][1] = vfma(vset1(sc[g * kChunk + c0 + 1]), v1, a[g][1]);
      }
    }
    if (c0 < n) {
      const Vec v0 = load_v(c0);
      for (int g = 0; g < HT; ++g) a[g][0] = vfma(vset1(sc[g * kChunk + c0]), v0, a[g][0]);
    }
    for (int g = 0; g < HT; ++g) vstore(acc + g * dp + d, a[g][0] + a[g][1]);
  }
}

// Online-softmax state of one query head within a task.
struct HeadState {
  float m, l;
};

// One (sequence, split of its context), every head: keys are visited chunk by
// chunk and, within a chunk, kv head by kv head, so the cache blocks are read
// once, front to back (a kv head's rows alone are strided across each block).
template <int HT, class T>
void run_task(const PagedAttnParams& p, int64_t s, int64_t split, int64_t keys_per_split, Partials& part) {
  const CacheLayout& c = p.cache;
  const int64_t D = c.head_dim, dp = part.dp, group = p.heads / c.heads_k;
  const int64_t len = p.seq_lens[s], diag = len - 1;
  const int64_t lo_mask = p.window_left >= 0 ? std::max<int64_t>(0, diag - p.window_left) : 0;
  const int64_t k0 = std::max(lo_mask, split * keys_per_split), k1 = std::min(len, (split + 1) * keys_per_split);
  const int32_t* table = p.block_table + s * p.block_table_stride;
  std::vector<float> q(static_cast<size_t>(p.heads * dp), 0.0f), acc(static_cast<size_t>(p.heads * dp), 0.0f);
  std::vector<HeadState> st(static_cast<size_t>(p.heads), HeadState{-kInf, 0.0f});
  const T* krows[kChunk];
  const T* vrows[kChunk];
  float sc[HT * kChunk];
  const Vec vs = vset1(p.scale);
  for (int64_t h = 0; h < p.heads; ++h) {
    const T* qh = static_cast<const T*>(p.q) + s * p.q_seq_stride + h * p.q_head_stride;
    int64_t d = 0;
    for (; d + kW <= D; d += kW) vstore(q.data() + h * dp + d, vload(qh + d) * vs);
    if (d < D) vstore_partial(q.data() + h * dp + d, vload_partial(qh + d, D - d) * vs, D - d);
  }

  for (int64_t j0 = k0; j0 < k1; j0 += kChunk) {
    const int64_t n = std::min(kChunk, k1 - j0);
    for (int64_t hk = 0; hk < c.heads_k; ++hk) {
      // Row addresses once per chunk and kv head: no division per key below.
      for (int64_t c0 = 0, blk = j0 / c.block_size, off = j0 % c.block_size; c0 < n; ++c0) {
        const int64_t where = table[blk] * c.block_stride + off * c.pos_stride + hk * c.head_stride;
        krows[c0] = static_cast<const T*>(p.key_cache) + where;
        vrows[c0] = static_cast<const T*>(p.value_cache) + where;
        if (++off == c.block_size) {
          off = 0;
          ++blk;
        }
      }
      // P V walks V in head_dim slices across rows, a strided pattern: ask for
      // the chunk's V rows now, sequentially, so they arrive during the scores;
      // and the K rows of the next chunk (same kv head) one chunk ahead.
      const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
      for (int64_t c0 = 0; c0 < n; ++c0)
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(vrows[c0]) + b);
      const int64_t jn = j0 + kChunk;
      for (int64_t c0 = 0, blk = jn / c.block_size, off = jn % c.block_size; jn + c0 < k1 && c0 < kChunk; ++c0) {
        const char* kr = reinterpret_cast<const char*>(static_cast<const T*>(p.key_cache) + table[blk] * c.block_stride +
                                                       off * c.pos_stride + hk * c.head_stride);
        for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(kr + b);
        if (++off == c.block_size) {
          off = 0;
          ++blk;
        }
      }
      for (int64_t h0 = hk * group; h0 < (hk + 1) * group; h0 += HT) {
        group_scores<HT>(q.data() + h0 * dp, dp, D, krows, n, sc);
        // softcap, ALiBi, then one online-softmax rescale per chunk and head.
        for (int g = 0; g < HT; ++g) {
          float* srow = sc + g * kChunk;
          HeadState& hs = st[h0 + g];
          if (p.softcap > 0.0f)
            for (int64_t c0 = 0; c0 < n; ++c0) srow[c0] = p.softcap * std::tanh(srow[c0] / p.softcap);
          if (p.alibi_slopes)
            for (int64_t c0 = 0; c0 < n; ++c0)
              srow[c0] -= p.alibi_slopes[h0 + g] * static_cast<float>(std::abs(diag - (j0 + c0)));
          const float m_new = std::max(hs.m, *std::max_element(srow, srow + n));
          const float alpha = std::exp(hs.m - m_new);
          const Vec vm = vset1(m_new);
          Vec sum = vzero();
          int64_t c0 = 0;
          for (; c0 + kW <= n; c0 += kW) {
            const Vec e = vexp(vload(srow + c0) - vm);
            vstore(srow + c0, e);
            sum = sum + e;
          }
          float tail = 0.0f;
          for (; c0 < n; ++c0) tail += (srow[c0] = std::exp(srow[c0] - m_new));
          hs.l = hs.l * alpha + vsum(sum) + tail;
          hs.m = m_new;
          if (alpha != 1.0f) {
            float* a = acc.data() + (h0 + g) * dp;
            const Vec va = vset1(alpha);
            for (int64_t d = 0; d < dp; d += kW) vstore(a + d, vload(a + d) * va);
          }
        }
        group_pv<HT>(sc, vrows, n, D, acc.data() + h0 * dp, dp);
      }
    }
  }
  for (int64_t h = 0; h < p.heads; ++h) {
    const int64_t at = (s * p.heads + h) * part.splits + split;
    part.m[at] = st[h].m;
    part.l[at] = st[h].l;
    std::copy_n(acc.data() + h * dp, dp, part.o.data() + at * dp);
  }
}

}  // namespace

void paged_attention(const PagedAttnParams& p) {
  const CacheLayout& c = p.cache;
  const int64_t D = c.head_dim, tasks_per_split = p.num_seqs, group = p.heads / c.heads_k;
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  // Split the context only as far as needed to feed every thread, in whole
  // blocks and at least kChunk keys per split.
  int64_t splits = tasks_per_split >= want ? 1 : (want + tasks_per_split - 1) / tasks_per_split;
  const int64_t keys_per_split =
      round_up(std::max<int64_t>((p.max_seq_len + splits - 1) / splits, kChunk), c.block_size);
  splits = std::max<int64_t>(1, (p.max_seq_len + keys_per_split - 1) / keys_per_split);

  Partials part;
  part.splits = splits;
  part.dp = round_up(D, kW);
  const int64_t partial_rows = p.num_seqs * p.heads * splits;
  part.o.assign(static_cast<size_t>(partial_rows * part.dp), 0.0f);
  part.m.assign(static_cast<size_t>(partial_rows), -kInf);
  part.l.assign(static_cast<size_t>(partial_rows), 0.0f);

  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_for(0, tasks_per_split * splits, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t s = t / splits, split = t % splits;
        // Query heads per register tile: the largest of 4, 2, 1 dividing the group.
        if (group % 4 == 0)
          run_task<4, T>(p, s, split, keys_per_split, part);
        else if (group % 2 == 0)
          run_task<2, T>(p, s, split, keys_per_split, part);
        else
          run_task<1, T>(p, s, split, keys_per_split, part);
      }
    });
    // Combine the splits of each (sequence, head).
    parallel_for(0, p.num_seqs * p.heads, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> o(static_cast<size_t>(part.dp));
      for (int64_t sh = lo; sh < hi; ++sh) {
        const int64_t base = sh * splits;
        float mx = -kInf;
        for (int64_t k = 0; k < splits; ++k) mx = std::max(mx, part.m[base + k]);
        std::fill(o.begin(), o.end(), 0.0f);
        float l = 0.0f;
        if (mx != -kInf) {
          for (int64_t k = 0; k < splits; ++k) {
            if (part.l[base + k] == 0.0f) continue;
            const float w = std::exp(part.m[base + k] - mx);
            l += w * part.l[base + k];
            const Vec vw = vset1(w);
            const float* src = part.o.data() + (base + k) * part.dp;
            for (int64_t d = 0; d < part.dp; d += kW) vstore(o.data() + d, vfma(vload(src + d), vw, vload(o.data() + d)));
          }
        }
        T* out = static_cast<T*>(p.out) + sh * D;
        const Vec inv = vset1(l > 0.0f ? 1.0f / l : 0.0f);
        int64_t d = 0;
        for (; d + kW <= D; d += kW) vstore(out + d, vload(o.data() + d) * inv);
        if (d < D) vstore_partial(out + d, vload_partial(o.data() + d, D - d) * inv, D - d);
        p.lse[sh] = l > 0.0f ? mx + std::log(l) : kInf;
      }
    });
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
