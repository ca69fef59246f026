// Paged decode attention, CPU (compiled once per ISA; see common/cpu/vec.h).
//
// Decode is bound by reading K and V once, so a task is (sequence, kv head,
// split of the context) and computes every query head of its GQA group from
// the same K/V rows. Keys are taken kChunk at a time: scores for the group,
// one online-softmax rescale per chunk, then P V accumulated with head_dim
// in the outer loop so the group's accumulators stay in registers. Splits
// write (m, l, o) partials that a combine step merges (Flash-Decoding).
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
constexpr int64_t kMaxGroup = 16;   // query heads per kv head handled in registers at once
constexpr float kInf = std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Partials {
  std::vector<float> o, m, l;  // (seqs, heads, splits, D) and (seqs, heads, splits)
  int64_t splits = 1, dp = 0;
};

template <class T>
const T* row(const void* cache, const CacheLayout& c, const int32_t* table, int64_t j, int64_t hk) {
  const int64_t block = table[j / c.block_size];
  return static_cast<const T*>(cache) + block * c.block_stride + (j % c.block_size) * c.pos_stride +
         hk * c.head_stride;
}

// One (sequence, kv head, split): partial softmax state for every head of the group.
template <class T>
void run_task(const PagedAttnParams& p, int64_t s, int64_t hk, int64_t split, int64_t keys_per_split, Partials& part) {
  const CacheLayout& c = p.cache;
  const int64_t D = c.head_dim, dp = part.dp, group = p.heads / c.heads_k;
  const int64_t len = p.seq_lens[s], diag = len - 1;
  const int64_t lo_mask = p.window_left >= 0 ? std::max<int64_t>(0, diag - p.window_left) : 0;
  const int64_t k0 = std::max(lo_mask, split * keys_per_split), k1 = std::min(len, (split + 1) * keys_per_split);
  const int32_t* table = p.block_table + s * p.block_table_stride;

  for (int64_t g0 = 0; g0 < group; g0 += kMaxGroup) {
    const int64_t G = std::min(kMaxGroup, group - g0);
    const int64_t h0 = hk * group + g0;
    auto at = [&](int64_t g) { return ((s * p.heads + h0 + g) * part.splits + split); };
    float m[kMaxGroup], l[kMaxGroup];
    std::vector<float> q(static_cast<size_t>(G * dp), 0.0f), acc(static_cast<size_t>(G * dp), 0.0f);
    std::vector<float> sc(static_cast<size_t>(G * kChunk));
    for (int64_t g = 0; g < G; ++g) {
      m[g] = -kInf;
      l[g] = 0.0f;
      const T* qh = static_cast<const T*>(p.q) + s * p.q_seq_stride + (h0 + g) * p.q_head_stride;
      const Vec vs = vset1(p.scale);
      int64_t d = 0;
      for (; d + kW <= D; d += kW) vstore(q.data() + g * dp + d, vload(qh + d) * vs);
      if (d < D) vstore_partial(q.data() + g * dp + d, vload_partial(qh + d, D - d) * vs, D - d);
    }
    for (int64_t j0 = k0; j0 < k1; j0 += kChunk) {
      const int64_t n = std::min(kChunk, k1 - j0);
      // Scores of the group for n keys.
      for (int64_t c0 = 0; c0 < n; ++c0) {
        const T* kr = row<T>(p.key_cache, c, table, j0 + c0, hk);
        Vec dot[kMaxGroup];
        for (int64_t g = 0; g < G; ++g) dot[g] = vzero();
        int64_t d = 0;
        for (; d + kW <= D; d += kW) {
          const Vec kv = vload(kr + d);
          for (int64_t g = 0; g < G; ++g) dot[g] = vfma(vload(q.data() + g * dp + d), kv, dot[g]);
        }
        if (d < D) {
          const Vec kv = vload_partial(kr + d, D - d);
          for (int64_t g = 0; g < G; ++g) dot[g] = vfma(vload(q.data() + g * dp + d), kv, dot[g]);
        }
        for (int64_t g = 0; g < G; ++g) {
          float x = vsum(dot[g]);
          if (p.softcap > 0.0f) x = p.softcap * std::tanh(x / p.softcap);
          if (p.alibi_slopes) x -= p.alibi_slopes[h0 + g] * static_cast<float>(std::abs(diag - (j0 + c0)));
          sc[g * kChunk + c0] = x;
        }
      }
      // Online softmax: one rescale per chunk and head.
      for (int64_t g = 0; g < G; ++g) {
        float* srow = sc.data() + g * kChunk;
        const float m_new = std::max(m[g], *std::max_element(srow, srow + n));
        const float alpha = std::exp(m[g] - m_new);
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
        l[g] = l[g] * alpha + vsum(sum) + tail;
        m[g] = m_new;
        if (alpha != 1.0f) {
          const Vec va = vset1(alpha);
          for (int64_t d = 0; d < dp; d += kW) vstore(acc.data() + g * dp + d, vload(acc.data() + g * dp + d) * va);
        }
      }
      // acc += P V, head_dim outer so the group's accumulators stay in registers.
      for (int64_t d = 0; d < D; d += kW) {
        const int64_t w = std::min<int64_t>(kW, D - d);
        Vec a[kMaxGroup];
        for (int64_t g = 0; g < G; ++g) a[g] = vload(acc.data() + g * dp + d);
        for (int64_t c0 = 0; c0 < n; ++c0) {
          const T* vr = row<T>(p.value_cache, c, table, j0 + c0, hk) + d;
          const Vec vv = w == kW ? vload(vr) : vload_partial(vr, w);
          for (int64_t g = 0; g < G; ++g) a[g] = vfma(vset1(sc[g * kChunk + c0]), vv, a[g]);
        }
        for (int64_t g = 0; g < G; ++g) vstore(acc.data() + g * dp + d, a[g]);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      part.m[at(g)] = m[g];
      part.l[at(g)] = l[g];
      std::copy_n(acc.data() + g * dp, dp, part.o.data() + at(g) * dp);
    }
  }
}

}  // namespace

void paged_attention(const PagedAttnParams& p) {
  const CacheLayout& c = p.cache;
  const int64_t D = c.head_dim, tasks_per_split = p.num_seqs * c.heads_k;
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
        const int64_t s = t / (c.heads_k * splits), hk = t / splits % c.heads_k, split = t % splits;
        run_task<T>(p, s, hk, split, keys_per_split, part);
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
