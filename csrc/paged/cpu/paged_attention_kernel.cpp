// Paged decode attention, CPU (compiled once per ISA; see common/cpu/vec.h).
//
// Decode is bound by reading K and V once, so a task is (sequence, split of
// the context, kv heads) and reads each cache block it needs once, in memory
// order, for its kv heads (all of them, unless a sequence has more query
// vectors than a task holds well or too few keys to split); each K/V row
// serves all query heads of its GQA group. Keys
// are taken kChunk at a time: scores, one online-softmax rescale per chunk
// and head, then P V. Splits write (m, l, o) partials that a combine step
// merges (Flash-Decoding).
//
// With several query rows per sequence (flash_attn's few-query forward)
// the work per K/V byte grows until the kernel is compute bound; then bf16
// K and V go through bf16 dot products (AVX512_BF16) instead of being
// widened to fp32: bf16 16 x 2048, 4 rows 14.0-14.5 -> 11.4 ms. With a
// multiple of 16 query vectors per kv head (rows x group) they run with the
// query vectors in the lanes (lane_scores, lane_softmax): no horizontal
// sums, and K's next chunk streams in during P V as V does during the
// scores. On the Zen 4, against the 4 x 4 blocks and the GEMM route, medians
// of 6 alternated runs: bf16 16 x 2048, 32 / 8 heads, 4 rows 11.6 -> 11.5
// ms, 8 rows 18.9 -> 16.7, 2 x 2048 4 rows 1.68 -> 1.54; decode 16 x 2048
// 32 / 2 heads 2.67 -> 2.57, 32 / 1 2.18 -> 1.89 (K/V in cache, 4 rows:
// 9.2-9.5 -> 7.3-7.8 ms). Exactly 8 query vectors per kv head take the
// lanes too, two keys per vector (pair_lane_scores).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "attention/cpu/attn_common.h"  // gemm_nt_bf16
#include "common/cpu/layouts.h"
#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "paged/paged_attention.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

constexpr int64_t kChunk = 64;      // keys per softmax step
constexpr int64_t kMaxHeadDim = 256;  // the ops refuse larger
constexpr int64_t kAheadBytes = 8 << 10;  // software prefetch distance of the scores (bytes of K)
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kDotScoresMinVectors = 8;  // query vectors per kv head from which bf16 K is scored in bf16
// From this many query vectors per kv head the bf16 scores run as a GEMM
// (see gemm_scores in run_task), unless they fit the lanes (a multiple of
// 16 vectors, head_dim a multiple of 64). bf16 16 x 2048, 32 / 8 heads, d128, on the
// Zen 4, query rows (vectors = 4 x rows): 2 rows 6.3-6.9 -> 8.5 ms as a
// GEMM, 4 rows 10.0-10.6 -> 10.4-10.6, 6 rows 13.6-13.8 -> 13.0-13.2, 8 rows
// 17.7-18.5 -> 16.2-16.8.
constexpr int64_t kGemmScoresMinVectors = 24;
// Most query vectors (rows x heads) one task holds: its fp32 queries and
// accumulators (2 x 128 KiB at head_dim 128) and scores stay in L2. More
// than that, and the task takes fewer kv heads. (flash_attn forward, bf16,
// 1 sequence x 64 rows x 32 heads, 64 keys, causal: one task of all 2048
// vectors, 2.74 ms; tasks of 4 kv heads, 0.38 ms.)
constexpr int64_t kMaxTaskVectors = 256;
// Query vectors in the lanes (see lane_scores): keys per register tile,
// and bf16 elements between staged K rows (the largest head_dim).
constexpr int64_t kLaneKeys = 16;
constexpr int64_t kStageStride = 256;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Query rows of sequence s: a task works on rows x heads query vectors.
int64_t rows_of(const PagedAttnParams& p, int64_t s) {
  return p.q_start ? p.q_start[s + 1] - p.q_start[s] : p.max_rows;
}

// Partial (m, l, o) of every split, per (sequence, query vector): a task's
// query vectors are its rows x heads, ordered (kv head, row, head of the
// group) so that each kv head's are consecutive; `vectors` is the most any
// sequence has (heads x max_rows).
struct Partials {
  std::vector<float> o, m, l;  // (seqs, vectors, splits, D) and (seqs, vectors, splits)
  int64_t splits = 1, dp = 0, vectors = 0;
  // One split: the tasks write the output and lse themselves, with no
  // partials and no combine step (a second round of the thread pool).
  bool direct = false;
};

// Scores of HT query heads (rows of q, dp apart) against two key rows:
// 2 x HT independent FMA chains; each K row is widened once for all HT heads.
template <int HT, class T>
void two_key_scores(const float* q, int64_t dp, int64_t D, const T* k0, const T* k1, float* s0, float* s1) {
  Vec a[HT][2];
  for (auto& x : a) x[0] = x[1] = vzero();
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    const Vec kv0 = vload(k0 + d), kv1 = vload(k1 + d);
    for (int g = 0; g < HT; ++g) {
      const Vec qv = vload(q + g * dp + d);
      a[g][0] = vfma(qv, kv0, a[g][0]);
      a[g][1] = vfma(qv, kv1, a[g][1]);
    }
  }
  if (d < D) {
    const Vec kv0 = vload_partial(k0 + d, D - d), kv1 = vload_partial(k1 + d, D - d);
    for (int g = 0; g < HT; ++g) {
      const Vec qv = vload(q + g * dp + d);  // q rows are zero-padded to dp
      a[g][0] = vfma(qv, kv0, a[g][0]);
      a[g][1] = vfma(qv, kv1, a[g][1]);
    }
  }
  for (int g = 0; g < HT; ++g) {
    s0[g * kChunk] = vsum(a[g][0]);
    s1[g * kChunk] = vsum(a[g][1]);
  }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// Lane j of the result is the sum of v[j]'s lanes, for 8 vectors at once: a
// transpose-add tree of 21 operations instead of 8 horizontal sums of 6.
inline __m256 reduce8(const __m256* v) {
  __m256 t[4], u[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // v[2i], v[2i+1]: lanes (0+2, 1+3) of each, interleaved
    t[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // sums of each 128-bit half of v[4i..4i+3]
    u[i] = _mm256_add_ps(_mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm256_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

// The scores of chains a[2g] (head g, first key) and a[2g + 1] (second key).
inline void store_four_head_two_key_scores(const __m256* a, float* s0, float* s1) {
  alignas(32) float r[8];
  _mm256_store_ps(r, reduce8(a));
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    s0[g * kChunk] = r[2 * g];
    s1[g * kChunk] = r[2 * g + 1];
  }
}

// two_key_scores for 4 query heads on AVX2 with one joint reduction of the 8
// chains (21 operations where 8 horizontal sums take about 48, against 128
// FMAs at head_dim 128).
template <class T>
void four_head_two_key_scores(const float* q, int64_t dp, int64_t D, const T* k0, const T* k1, float* s0, float* s1) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  auto step = [&](int64_t d, int64_t width) {
    const __m256 kv0 = (width == kW ? vload(k0 + d) : vload_partial(k0 + d, width)).v;
    const __m256 kv1 = (width == kW ? vload(k1 + d) : vload_partial(k1 + d, width)).v;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + g * dp + d);  // q rows are zero-padded to dp
      a[2 * g] = _mm256_fmadd_ps(qv, kv0, a[2 * g]);
      a[2 * g + 1] = _mm256_fmadd_ps(qv, kv1, a[2 * g + 1]);
    }
  };
  int64_t d = 0;
  for (; d + kW <= D; d += kW) step(d, kW);
  if (d < D) step(d, D - d);
  store_four_head_two_key_scores(a, s0, s1);
}
#endif

TK_PREFETCH_HELPER void prefetch_l2(const char* at) {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_prefetch(at, _MM_HINT_T1);
#else
  (void)at;
#endif
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// bf16 K and V on AVX2, widened by unpacking against zero: one shuffle per 8
// values where vpmovzxwd + vpslld take two, and those two ports were the
// decode's bottleneck (bf16 16 x 2048: 6.3 GB/s a core). 16 values come out
// as columns [0-3, 8-11] and [4-7, 12-15]: q is staged in that order for
// the scores (a dot product does not mind), and P V's accumulators are put
// back in column order when they go to memory.
inline void widen_unpacked(const bf16_t* p, __m256& a, __m256& b) {
  const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), r));
  b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), r));
}

// Position of column c within its 16 in the unpacked order.
inline int64_t unpacked_position(int64_t c) {
  const int64_t i = c % 16;
  return c - i + (i < 4 ? i : i < 8 ? i + 4 : i < 12 ? i - 4 : i);
}

// four_head_two_key_scores for bf16 K with q in unpacked order, D % 16 == 0.
inline void four_head_two_key_scores_unpacked(const float* q, int64_t dp, int64_t D, const bf16_t* k0,
                                              const bf16_t* k1, float* s0, float* s1) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __m256 k0a, k0b, k1a, k1b;
    widen_unpacked(k0 + d, k0a, k0b);
    widen_unpacked(k1 + d, k1a, k1b);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256 qa = _mm256_loadu_ps(q + g * dp + d), qb = _mm256_loadu_ps(q + g * dp + d + 8);
      a[2 * g] = _mm256_fmadd_ps(qb, k0b, _mm256_fmadd_ps(qa, k0a, a[2 * g]));
      a[2 * g + 1] = _mm256_fmadd_ps(qb, k1b, _mm256_fmadd_ps(qa, k1a, a[2 * g + 1]));
    }
  }
  store_four_head_two_key_scores(a, s0, s1);
}

// P V for query heads [h0, h0 + 4) of one kv head over a chunk's n keys,
// head_dim columns [d0, d0 + 16) of V: 8 accumulators, each V vector loaded
// (and for bf16 widened) once for the 4 heads. One head at a time with 8
// vectors of columns loaded every V vector 4 times, 9 loads per 8 FMAs
// (fp32 16 x 2048 decode, one core: P V was half the time). bf16 V is
// widened in unpacked order and the accumulators put back in column order
// when they go to memory. With kPrefetch, also pulls into L2 the line of
// the row at vpos[c0] + pf_off that holds these columns, once per line.
template <bool kPrefetch, class T>
void pv_four_heads(const float* sc, const T* const* vpos, int64_t n, int64_t v_off, float* acc, int64_t dp,
                   int64_t h0, int64_t d0, int64_t pf_off) {
  constexpr bool kUnpacked = std::is_same_v<T, bf16_t>;
  static_assert(kUnpacked || std::is_same_v<T, float>, "fp16 V takes pv_registers");
  __m256 a[4][2];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m256 x = _mm256_loadu_ps(acc + (h0 + g) * dp + d0), y = _mm256_loadu_ps(acc + (h0 + g) * dp + d0 + 8);
    a[g][0] = kUnpacked ? _mm256_permute2f128_ps(x, y, 0x20) : x;  // unpacked: columns 0-3, 8-11
    a[g][1] = kUnpacked ? _mm256_permute2f128_ps(x, y, 0x31) : y;  // 4-7, 12-15
  }
  const bool pf = kPrefetch && d0 * static_cast<int64_t>(sizeof(T)) % 64 == 0;
  for (int64_t c0 = 0; c0 < n; ++c0) {
    if (pf) prefetch_l2(reinterpret_cast<const char*>(vpos[c0] + pf_off + d0));
    __m256 va, vb;
    if constexpr (kUnpacked) {
      widen_unpacked(vpos[c0] + v_off + d0, va, vb);
    } else {
      va = _mm256_loadu_ps(vpos[c0] + v_off + d0);
      vb = _mm256_loadu_ps(vpos[c0] + v_off + d0 + 8);
    }
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m256 pr = _mm256_broadcast_ss(sc + (h0 + g) * kChunk + c0);
      a[g][0] = _mm256_fmadd_ps(pr, va, a[g][0]);
      a[g][1] = _mm256_fmadd_ps(pr, vb, a[g][1]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    _mm256_storeu_ps(acc + (h0 + g) * dp + d0, kUnpacked ? _mm256_permute2f128_ps(a[g][0], a[g][1], 0x20) : a[g][0]);
    _mm256_storeu_ps(acc + (h0 + g) * dp + d0 + 8, kUnpacked ? _mm256_permute2f128_ps(a[g][0], a[g][1], 0x31) : a[g][1]);
  }
}
#endif

#if defined(__AVX512F__)
// Lane j of the result is the sum of v[j]'s lanes, for 16 vectors at once:
// four rounds of halving (30 shuffles, 15 adds) instead of 16 separate
// horizontal sums (about 8 operations each). The rounds leave the sums in
// the order kReduceSlot, which is its own inverse: feed the vector meant
// for lane j in v[kReduceSlot[j]].
constexpr int kReduceSlot[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

inline __m512 reduce16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44), _mm512_shuffle_ps(x[i], x[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// Scores of 4 query heads (rows of q, dp apart) against 4 key rows, into
// s[g * kChunk + key]: 16 FMA chains, each K vector widened once for all 4
// heads and each q vector loaded once for all 4 keys, one joint reduction.
// Also prefetches into L2 the npf lines at pf, spread over the columns.
template <class T>
void four_by_four_scores(const float* q, int64_t dp, int64_t D, const T* const* k, float* s, const char* const* pf,
                         int64_t npf) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  const int64_t pf_step = (npf * kW + D - 1) / D;  // prefetches per step, all issued by the last
  auto step = [&](int64_t d, int64_t width) {
    for (int64_t i = d / kW * pf_step; i < std::min(npf, (d / kW + 1) * pf_step); ++i) prefetch_l2(pf[i]);
    __m512 kv[4];
#pragma GCC unroll 4
    for (int key = 0; key < 4; ++key) kv[key] = (width == kW ? vload(k[key] + d) : vload_partial(k[key] + d, width)).v;
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512 qv = _mm512_loadu_ps(q + g * dp + d);  // q rows are zero-padded to dp
#pragma GCC unroll 4
      for (int key = 0; key < 4; ++key) a[kReduceSlot[g * 4 + key]] = _mm512_fmadd_ps(qv, kv[key], a[kReduceSlot[g * 4 + key]]);
    }
  };
  int64_t d = 0;
  for (; d + kW <= D; d += kW) step(d, kW);
  if (d < D) step(d, D - d);
  const __m512 r = reduce16(a);
  _mm_storeu_ps(s, _mm512_castps512_ps128(r));
  _mm_storeu_ps(s + kChunk, _mm512_extractf32x4_ps(r, 1));
  _mm_storeu_ps(s + 2 * kChunk, _mm512_extractf32x4_ps(r, 2));
  _mm_storeu_ps(s + 3 * kChunk, _mm512_extractf32x4_ps(r, 3));
}
#endif

#if defined(__AVX512BF16__)
// The same scores for bf16 K with q in bf16 (qb rows, dpb apart, zero-
// padded to a multiple of 32): vdpbf16ps takes 32 columns of K as stored,
// no widening, at twice the FMA rate; products are exact in fp32 as with
// widening. Worth it only when enough query vectors share each K row to
// make the decode compute bound (several query rows), times `scale` here.
// Prefetches the npf lines at pf as four_by_four_scores does.
void four_by_four_scores_bf16(const uint16_t* qb, int64_t dpb, int64_t D, const bf16_t* const* k, float scale,
                              float* s, const char* const* pf, int64_t npf) {
  __m512 a[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
  const int64_t pf_step = (npf * 32 + D - 1) / D;  // prefetches per step, all issued by the last
  for (int64_t d = 0; d < D; d += 32) {
    for (int64_t i = d / 32 * pf_step; i < std::min(npf, (d / 32 + 1) * pf_step); ++i) prefetch_l2(pf[i]);
    const __mmask32 mask = D - d >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (D - d)) - 1);
    __m512bh kv[4];
#pragma GCC unroll 4
    for (int key = 0; key < 4; ++key) kv[key] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, k[key] + d));
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qb + g * dpb + d));
#pragma GCC unroll 4
      for (int key = 0; key < 4; ++key)
        a[kReduceSlot[g * 4 + key]] = _mm512_dpbf16_ps(a[kReduceSlot[g * 4 + key]], qv, kv[key]);
    }
  }
  const __m512 r = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
  _mm_storeu_ps(s, _mm512_castps512_ps128(r));
  _mm_storeu_ps(s + kChunk, _mm512_extractf32x4_ps(r, 1));
  _mm_storeu_ps(s + 2 * kChunk, _mm512_extractf32x4_ps(r, 2));
  _mm_storeu_ps(s + 3 * kChunk, _mm512_extractf32x4_ps(r, 3));
}

// P V in bf16 dot products for 4 query vectors, head_dim columns [d0, d0 +
// 64): the probabilities of vector g for keys 2t and 2t + 1 are the bf16
// pair (32-bit word) at pw + g * pw_vec + t * pw_pair (uint16 offsets), its
// accumulator row is acc + g * dp; v2 holds the chunk's V rows of one kv
// head interleaved by key pairs (ld2 words per pair). Each step adds two
// keys into 16 accumulators with 16 vdpbf16ps.
// With pf, also prefetches into L2 the npf lines at pf, one per key pair.
void pv_pairs_registers(const uint16_t* pw, int64_t pw_vec, int64_t pw_pair, const uint16_t* v2, int64_t ld2,
                        int64_t pairs, float* acc, int64_t dp, int64_t d0, const char* const* pf = nullptr,
                        int64_t npf = 0) {
  __m512 a[4][4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) a[g][i] = _mm512_loadu_ps(acc + g * dp + d0 + 16 * i);
  for (int64_t t = 0; t < pairs; ++t) {
    if (t < npf) prefetch_l2(pf[t]);
    __m512bh pv[4], vv[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      uint32_t w;
      std::memcpy(&w, pw + g * pw_vec + t * pw_pair, 4);
      pv[g] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(w)));
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) vv[i] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(v2 + 2 * (t * ld2 + d0 + 16 * i)));
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) a[g][i] = _mm512_dpbf16_ps(a[g][i], pv[g], vv[i]);
  }
  for (int64_t t = pairs; t < npf; ++t) prefetch_l2(pf[t]);
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(acc + g * dp + d0 + 16 * i, a[g][i]);
}

// Query vectors in the lanes (several query rows, a multiple of 16 vectors
// per kv head): scores come out key by key as vectors of 16 query vectors,
// with no horizontal sums (the 4 x 4 blocks above spend about 45 shuffles
// and adds on every 16 scores) and no transpose of K (the GEMM route). K
// rows are staged at a fixed stride so that each broadcast is a constant
// offset from one register.

// n <= kLaneKeys K rows (head_dim D, even) into the staging rows; rows past
// n repeat row 0 (their scores are never read).
inline void stage_key_rows(const bf16_t* const* k, int64_t n, int64_t D, uint16_t* stage) {
  const __mmask32 tail = D % 32 ? static_cast<__mmask32>((1u << (D % 32)) - 1) : ~__mmask32{0};
  for (int64_t j = 0; j < kLaneKeys; ++j) {
    const auto* src = reinterpret_cast<const uint16_t*>(k[j < n ? j : 0]);
    uint16_t* dst = stage + j * kStageStride;
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) _mm512_storeu_si512(dst + d, _mm512_loadu_si512(src + d));
    if (d < D) _mm512_mask_storeu_epi16(dst + d, tail, _mm512_maskz_loadu_epi16(tail, src + d));
  }
}

// out[j * ldo + lane] = scale * (q of vector `lane`) . (staged K row j), for
// the 16 vectors whose column pairs are the words qt[t * ldq + lane].
// Not inlined: inside run_task GCC kept the 16 accumulators on the stack.
// Also prefetches into L2 the npf lines at pf, one per pair of columns:
// spread between the products, not in a burst ahead of them.
__attribute__((noinline)) void lane_scores(const uint16_t* qt, int64_t ldq, int64_t pairs, const uint16_t* stage, float scale,
                                                float* out, int64_t ldo, const char* const* pf, int64_t npf) {
  __m512 a[kLaneKeys];
#pragma GCC unroll 16
  for (int j = 0; j < kLaneKeys; ++j) a[j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < pairs; ++t) {
    if (t < npf) prefetch_l2(pf[t]);
    const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qt + 2 * t * ldq));
    // The K pair as an embedded broadcast of the product's memory operand
    // (GCC emits a separate vpbroadcastd for the intrinsic form, an extra
    // operation per product).
#pragma GCC unroll 16
    for (int j = 0; j < kLaneKeys; ++j)
      asm("vdpbf16ps %2%{1to16%}, %1, %0"
          : "+v"(a[j])
          : "v"(qv), "m"(*reinterpret_cast<const uint32_t*>(stage + j * kStageStride + 2 * t)));
  }
  for (int64_t t = pairs; t < npf; ++t) prefetch_l2(pf[t]);
  const __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int j = 0; j < kLaneKeys; ++j) _mm512_storeu_ps(out + j * ldo, _mm512_mul_ps(a[j], vs));
}

// Groups of 8 query vectors per kv head fill half the lanes; instead each
// lane pair holds one vector against two keys (lane 2v + e: vector v, key
// 2i + e of key pair i), so that a 16-lane product still does 16 useful
// dot-product steps. K is staged by key pairs: the 32-bit column pairs of
// keys 2i and 2i + 1 side by side, one 64-bit broadcast per product.

// n <= 2 * kLaneKeys K rows (head_dim D, a multiple of 32) into the
// staging rows of key pairs, kStageStride 32-bit words apart; rows past n
// repeat row 0 (their scores are masked).
inline void stage_key_pairs(const bf16_t* const* k, int64_t n, int64_t D, uint32_t* stage) {
  // Dwords of a (even key) and b (odd key) interleaved: column pairs 0-7, then 8-15.
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t i = 0; i < kLaneKeys; ++i) {
    const auto* even = reinterpret_cast<const uint16_t*>(k[2 * i < n ? 2 * i : 0]);
    const auto* odd = reinterpret_cast<const uint16_t*>(k[2 * i + 1 < n ? 2 * i + 1 : 0]);
    uint32_t* dst = stage + i * kStageStride;
    for (int64_t d = 0; d < D; d += 32) {
      const __m512i a = _mm512_loadu_si512(even + d), b = _mm512_loadu_si512(odd + d);
      _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi32(a, first, b));
      _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi32(a, second, b));
    }
  }
}

// out[i * ldo + 2v + e] = scale * (q of vector v) . (K row 2i + e), for the
// 8 vectors whose column pairs are the words qt[t * ldq + 2v + e] (each
// twice), against kLaneKeys staged key pairs. Prefetches the npf lines at
// pf spread over the column pairs, as lane_scores does.
__attribute__((noinline)) void pair_lane_scores(const uint16_t* qt, int64_t ldq, int64_t pairs, const uint32_t* stage,
                                                float scale, float* out, int64_t ldo, const char* const* pf, int64_t npf) {
  __m512 a[kLaneKeys];
#pragma GCC unroll 16
  for (int i = 0; i < kLaneKeys; ++i) a[i] = _mm512_setzero_ps();
  const int64_t pf_step = (npf + pairs - 1) / pairs;
  for (int64_t t = 0; t < pairs; ++t) {
    for (int64_t i = t * pf_step; i < std::min(npf, (t + 1) * pf_step); ++i) prefetch_l2(pf[i]);
    const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(qt + 2 * t * ldq));
#pragma GCC unroll 16
    for (int i = 0; i < kLaneKeys; ++i) {
      int64_t kk;
      std::memcpy(&kk, stage + i * kStageStride + 2 * t, 8);
      a[i] = _mm512_dpbf16_ps(a[i], qv, reinterpret_cast<__m512bh>(_mm512_set1_epi64(kk)));
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
#pragma GCC unroll 16
  for (int i = 0; i < kLaneKeys; ++i) _mm512_storeu_ps(out + i * ldo, _mm512_mul_ps(a[i], vs));
}

// One chunk's online-softmax step for 16 query vectors in the lanes: s16
// holds their scores, key j (position j0 + j) at s16 + j * ld, and gets
// their probabilities, 0 where masked. softcap and ALiBi (slope: the
// lanes' slopes, or null) as in the scalar loop of run_task; with
// row_masks, keys outside a lane's [lo, hi] are masked. m and l are the
// lanes' running max and sum; alpha gets the factor each lane's
// accumulator must be scaled by.
// With pairs (see pair_lane_scores), row j holds keys 2j and 2j + 1 of
// 8 vectors (lanes 2v, 2v + 1; their diag, slope, lo, hi, m, l, alpha
// given twice), the same computation with the two lanes' max and sum
// joined; a lone last key's partner lane gets probability 0.
void lane_softmax(float* s16, int64_t ld, int64_t n, int64_t j0, float softcap, const int32_t* diag, const float* slope,
                  const int32_t* lo, const int32_t* hi, bool row_masks, bool pairs, float* m, float* l, float* alpha) {
  const int64_t lw = pairs ? 2 : 1, n_rows = (n + lw - 1) / lw;
  // Key of each lane in row j: first + lw * j.
  const __m512i first = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j0)),
                                         pairs ? _mm512_set_epi32(1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0)
                                               : _mm512_setzero_si512());
  auto key_of_row = [&](int64_t j) { return _mm512_add_epi32(first, _mm512_set1_epi32(static_cast<int32_t>(lw * j))); };
  if (softcap > 0.0f)
    for (int64_t j = 0; j < n_rows; ++j)
      for (int64_t lane = 0; lane < 16; ++lane) s16[j * ld + lane] = softcap * std::tanh(s16[j * ld + lane] / softcap);
  if (slope) {
    const __m512i vdiag = _mm512_loadu_si512(diag);
    const __m512 vslope = _mm512_loadu_ps(slope);
    for (int64_t j = 0; j < n_rows; ++j) {
      const __m512i dist = _mm512_abs_epi32(_mm512_sub_epi32(vdiag, key_of_row(j)));
      _mm512_storeu_ps(s16 + j * ld, _mm512_fnmadd_ps(vslope, _mm512_cvtepi32_ps(dist), _mm512_loadu_ps(s16 + j * ld)));
    }
  }
  // Keys at or past j0 + n: an odd n's partner lane of the last pair.
  const __m512i vlo = _mm512_loadu_si512(lo);
  const __m512i vhi = _mm512_min_epi32(_mm512_loadu_si512(hi), _mm512_set1_epi32(static_cast<int32_t>(j0 + n - 1)));
  const bool masked = (row_masks && (_mm512_cmpgt_epi32_mask(vlo, _mm512_set1_epi32(static_cast<int32_t>(j0))) |
                                     _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(static_cast<int32_t>(j0 + n - 1)), vhi))) ||
                      n % lw != 0;
  const __m512 ninf = _mm512_set1_ps(-kInf);
  const __m512 m_old = _mm512_loadu_ps(m);
  __m512 mx = m_old;
  for (int64_t j = 0; j < n_rows; ++j) {
    __m512 x = _mm512_loadu_ps(s16 + j * ld);
    if (masked) {
      const __m512i key = key_of_row(j);
      const __mmask16 valid = _mm512_cmpge_epi32_mask(key, vlo) & _mm512_cmple_epi32_mask(key, vhi);
      x = _mm512_mask_blend_ps(valid, ninf, x);
      _mm512_storeu_ps(s16 + j * ld, x);
    }
    mx = _mm512_max_ps(mx, x);
  }
  if (pairs) mx = _mm512_max_ps(mx, _mm512_permute_ps(mx, 0xB1));  // each lane pair's max
  // A lane with no key so far keeps max -inf and adds nothing.
  const __mmask16 dead = _mm512_cmp_ps_mask(mx, ninf, _CMP_EQ_OQ);
  const Vec m_use{_mm512_mask_blend_ps(dead, mx, _mm512_setzero_ps())};
  Vec sum = vzero();
  for (int64_t j = 0; j < n_rows; ++j) {
    const Vec x = vload(s16 + j * ld);
    Vec e = vexp_nonpos(x - m_use);
    if (masked) e = Vec{_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, ninf, _CMP_NEQ_OQ), e.v)};
    vstore(s16 + j * ld, e);
    sum = sum + e;
  }
  if (pairs) sum = sum + Vec{_mm512_permute_ps(sum.v, 0xB1)};  // each lane pair's sum
  const Vec a = vexp_nonpos(Vec{m_old} - m_use);
  vstore(l, vfma(vload(l), a, sum));
  _mm512_storeu_ps(m, mx);
  vstore(alpha, a);
}
#endif

// Every line of one K or V row into L2 (not L1: what runs ahead, 16
// positions of K or a kv head's V rows, is about as much as L1 holds).
template <class T>
TK_PREFETCH_HELPER void prefetch_row(const T* row, int64_t row_bytes) {
  for (int64_t b = 0; b < row_bytes; b += 64) prefetch_l2(reinterpret_cast<const char*>(row) + b);
}

// P V for query heads [h0, h0 + HT) of one kv head over a chunk's n keys,
// head_dim columns [d0, d0 + S * kW): the accumulators stay in
// registers for the whole chunk instead of a load and store per key.
// With kPrefetch, also pulls into L2 the same columns of the row at
// vpos[c0] + pf_off for every key (the next kv head's V), and the npf
// lines at pf, spread over the keys.
template <int HT, int S, bool kPrefetch, class T>
void pv_registers(const float* sc, const T* const* vpos, int64_t n, int64_t v_off, float* acc, int64_t dp,
                  int64_t h0, int64_t d0, int64_t pf_off, const char* const* pf, int64_t npf) {
  constexpr int kLines = static_cast<int>(S * kW * sizeof(T) / 64);
  const int64_t pf_step = n > 0 ? (npf + n - 1) / n : 0;
  // Full unrolling of the loads and stores of a keeps it in registers: left
  // as loops, GCC -O3's loop vectoriser takes them and a moves to the stack,
  // stored back on every key.
  Vec a[HT][S];
#pragma GCC unroll 4
  for (int g = 0; g < HT; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < S; ++i) a[g][i] = vload(acc + (h0 + g) * dp + d0 + i * kW);
  for (int64_t c0 = 0; c0 < n; ++c0) {
    if constexpr (kPrefetch)
      for (int l = 0; l < kLines; ++l) prefetch_l2(reinterpret_cast<const char*>(vpos[c0] + pf_off + d0) + 64 * l);
    for (int64_t i = c0 * pf_step; i < std::min(npf, (c0 + 1) * pf_step); ++i) prefetch_l2(pf[i]);
    const T* vr = vpos[c0] + v_off + d0;
    Vec pr[HT];
    for (int g = 0; g < HT; ++g) pr[g] = vset1(sc[(h0 + g) * kChunk + c0]);
    for (int i = 0; i < S; ++i) {
      const Vec v = vload(vr + i * kW);
      for (int g = 0; g < HT; ++g) a[g][i] = vfma(pr[g], v, a[g][i]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < HT; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < S; ++i) vstore(acc + (h0 + g) * dp + d0 + i * kW, a[g][i]);
}

// Kv heads [hk0, hk0 + count) of `p` (and their query heads) as a problem of its own.
template <class T>
PagedAttnParams kv_head_slice(const PagedAttnParams& whole, int64_t hk0, int64_t count) {
  PagedAttnParams p = whole;
  const int64_t group = whole.heads / whole.cache.heads_k;
  p.cache.heads_k = count;
  p.heads = count * group;
  p.key_cache = static_cast<const T*>(whole.key_cache) + hk0 * whole.cache.head_stride;
  p.value_cache = static_cast<const T*>(whole.value_cache) + hk0 * whole.cache.head_stride;
  p.q = static_cast<const T*>(whole.q) + hk0 * group * whole.q_head_stride;
  if (whole.alibi_slopes) p.alibi_slopes = whole.alibi_slopes + hk0 * group;
  return p;
}

// Online-softmax state of one query vector within a task.
struct HeadState {
  float m, l;
};

// One (sequence, split of its context, group of kv heads), kv heads [hk0,
// hk0 + kv_heads) and their query heads. Keys are visited chunk by chunk,
// and within a chunk in memory order: position by position, every kv head
// of the group at a position (one contiguous run of the cache block) before
// the next. The cache is then read as sequential streams, once for the scores
// (K) and once for P V (V, a kv head at a time). Software prefetches into L2
// run ahead of both (bf16 16 x 2048 decode 12.9 -> 5.0-5.2 ms on the Zen 4,
// 26-27 GB/s of K/V from DRAM, against 29-34 with K/V in L3).
//
// Several query rows (flash_attn's few-query forward) are more query heads
// of each GQA group: every K/V row is still read once, for all of them, and
// the rows' different key ranges are masks on the scores.
template <int HT, class T>
void run_task(const PagedAttnParams& whole, int64_t s, int64_t split, int64_t keys_per_split, int64_t hk0,
              int64_t kv_heads, Partials& part) {
  const PagedAttnParams p = kv_head_slice<T>(whole, hk0, kv_heads);
  const CacheLayout& c = p.cache;
  const int64_t D = c.head_dim, dp = part.dp, group = p.heads / c.heads_k, rows = rows_of(p, s);
  // Query vectors per kv head; with register tiles of 4, slots for them
  // padded to a multiple of 4 with zero vectors whose results are dropped
  // (see paged_attention); slots in all.
  const int64_t per_kv = rows * group;
  const int64_t vgroup = HT == 4 ? round_up(per_kv, 4) : per_kv, vectors = c.heads_k * vgroup;
  if (rows == 0) return;
  // Row r's diagonal is diag0 + r; the last row's is len - 1, so no row
  // sees past the end, and the rows together see [first row's left end, len).
  const int64_t len = p.seq_lens[s], diag0 = len - rows;
  const int64_t lo_mask = p.window_left >= 0 ? std::max<int64_t>(0, diag0 - p.window_left) : 0;
  const int64_t k0 = std::max(lo_mask, split * keys_per_split), k1 = std::min(len, (split + 1) * keys_per_split);
  const int32_t* table = p.block_table + s * p.block_table_stride;
  const int64_t first_token = p.q_start ? p.q_start[s] : 0;
  std::vector<float> q(static_cast<size_t>(vectors * dp), 0.0f), acc(static_cast<size_t>(vectors * dp), 0.0f);
  std::vector<float> scores(static_cast<size_t>(vectors * kChunk));  // (vectors, kChunk)
  std::vector<HeadState> st(static_cast<size_t>(vectors), HeadState{-kInf, 0.0f});
  float* sc = scores.data();
  float spill[HT * kChunk];  // scores of the repeated row when a chunk has an odd key count
  const T* kpos[kChunk];
  const T* vpos[kChunk];
  const T* kpos_next[kChunk];  // the next chunk's, once P V has started prefetching its K
  const T* vpos_next[kChunk];
  // Lines to prefetch, handed to the products that issue them a few at a
  // time (see `ahead` below): 4 positions' K and V rows for a 4 x 4 score
  // block, the next chunk's first K rows of a kv head for its P V.
  [[maybe_unused]] const char* pf4[2 * 4 * (kMaxHeadDim * sizeof(float) / 64)];
  const char* pf_next[kChunk * (kMaxHeadDim * sizeof(float) / 64)];
  bool next_known = false;
  const Vec vs = vset1(p.scale);
  // Query vector (slot) v = (kv head, row, head of the group): its diagonal
  // and ALiBi slope, looked up per chunk below (no divisions there).
  auto head_of = [&](int64_t v) { return v / vgroup * group + v % vgroup % group; };
  auto row_of = [&](int64_t v) { return v % vgroup / group; };
  auto padding = [&](int64_t v) { return v % vgroup >= per_kv; };
#if defined(__AVX2__) && !defined(__AVX512F__)
  // P V four heads at a time for fp32 and bf16 (see pv_four_heads); bf16 K
  // and V widened by unpacking (see widen_unpacked).
  const bool four_head_pv = (std::is_same_v<T, bf16_t> || std::is_same_v<T, float>) && HT == 4 && D % 16 == 0;
  const bool unpack_widen = four_head_pv && std::is_same_v<T, bf16_t>;
#else
  constexpr bool four_head_pv = false;
  [[maybe_unused]] constexpr bool unpack_widen = false;
#endif
  std::vector<int64_t> diag(static_cast<size_t>(vectors));
  std::vector<float> slope(p.alibi_slopes ? static_cast<size_t>(vectors) : 0);
  for (int64_t v = 0; v < vectors; ++v) {
    if (padding(v)) {  // q stays 0
      diag[v] = len - 1;
      continue;
    }
    diag[v] = diag0 + row_of(v);
    if (p.alibi_slopes) slope[v] = p.alibi_slopes[s * p.alibi_seq_stride + head_of(v)];
    const T* qh = static_cast<const T*>(p.q) + s * p.q_seq_stride + (first_token + row_of(v)) * p.q_row_stride +
                  head_of(v) * p.q_head_stride;
    int64_t d = 0;
    for (; d + kW <= D; d += kW) vstore(q.data() + v * dp + d, vload(qh + d) * vs);
    if (d < D) vstore_partial(q.data() + v * dp + d, vload_partial(qh + d, D - d) * vs, D - d);
#if defined(__AVX2__) && !defined(__AVX512F__)
    if (unpack_widen) {
      float row[16];
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        std::copy_n(q.data() + v * dp + d0, 16, row);
        for (int64_t c = 0; c < 16; ++c) q[v * dp + unpacked_position(d0 + c)] = row[c];
      }
    }
#endif
  }

  // bf16 K scored in bf16 dot products when several query rows make the
  // task compute bound (see four_by_four_scores_bf16): q kept as given.
#if defined(__AVX512BF16__)
  const bool dot_scores = std::is_same_v<T, bf16_t> && HT == 4 && vgroup >= kDotScoresMinVectors;
#else
  constexpr bool dot_scores = false;
#endif
  const int64_t dpb = round_up(D, 32);
  std::vector<uint16_t> qb(dot_scores ? static_cast<size_t>(vectors * dpb) : 0, 0);
  // P V in bf16 dot products too (same condition, register path only): P
  // rounded to bf16 as torch's CPU flash attention does, V interleaved by
  // key pairs once per chunk and kv head for all its query vectors.
  std::vector<uint16_t> pb(dot_scores ? static_cast<size_t>(vectors * kChunk) : 0);
  std::vector<uint16_t> v2(dot_scores ? static_cast<size_t>(kChunk * dpb) : 0);
  // Many query vectors per kv head: the scores as one GEMM per kv head and
  // chunk (attn::gemm_nt_bf16), q rows against the chunk's K transposed into
  // column pairs (kt2), instead of 4 x 4 blocks of dot products, each ending
  // in a 16-way shuffle reduction. The transpose costs about what the
  // reductions did at 16 vectors and less beyond (kGemmScoresMinVectors).
#if defined(__AVX512BF16__)
  // A multiple of 16 query vectors per kv head: scores with the vectors in
  // the lanes (see lane_scores), then softmax and P as vectors of them.
  // 8 vectors (a group of 8, or of 5 to 7 padded, or 2 rows of a group of
  // 4): a vector in each lane pair, against two keys (see
  // pair_lane_scores). Against the 4 x 4 blocks, bf16 decode 16 x 2048 on
  // the Zen 4, medians of 15 alternated calls: 64 / 8 heads 1.11x, 32 / 4
  // d128 1.10x, d64 (x 4096) 1.16x, 28 / 4 1.09x, 16 / 2 (x 8192) 1.11x,
  // 10 / 2 and 12 / 2 (x 4096) 1.10x and 1.11x; 8 / 1 d256 0.99x.
  // What remains besides the products: staging K by pairs and
  // interleaving V, each about 15% of the time with K / V in cache.
  const bool pair_lanes = dot_scores && vgroup == 8 && D % 64 == 0 && D <= kStageStride;
  const bool lanes = pair_lanes || (dot_scores && vgroup % 16 == 0 && D % 64 == 0 && D <= kStageStride);
  const bool gemm_scores = dot_scores && !lanes && vgroup >= kGemmScoresMinVectors;
#else
  constexpr bool lanes = false, pair_lanes = false;
  constexpr bool gemm_scores = false;
#endif
  // Lanes per query vector, vectors per 16 lanes, keys per score tile.
  const int64_t lw = pair_lanes ? 2 : 1, tile_keys = kLaneKeys * lw;
  [[maybe_unused]] const int64_t lane_vectors = 16 / lw;
  std::vector<uint16_t> kt2(gemm_scores ? static_cast<size_t>(dpb * kChunk) : 0);  // (dpb / 2 pairs, kChunk) words
  if (dot_scores)
    for (int64_t v = 0; v < vectors; ++v) {
      if (padding(v)) continue;
      const auto* qh = static_cast<const uint16_t*>(p.q) + s * p.q_seq_stride +
                       (first_token + row_of(v)) * p.q_row_stride + head_of(v) * p.q_head_stride;
      std::copy_n(qh, D, qb.data() + v * dpb);
    }

  // lanes: q as column-pair words (kv head, pair, vector of the head's
  // group, lw copies), the staged K rows, per-lane softmax state as
  // arrays, and the lanes' diagonals as int32. sc then holds scores
  // key-major (kv head, key / lw, vector, key % lw) and pb the P pair
  // words (kv head, key pair, vector).
  const int64_t qpairs = D / 2, lanes_all = vectors * lw;
  std::vector<uint16_t> qt(lanes ? static_cast<size_t>(lanes_all * D) : 0);
  std::vector<uint16_t> stage(lanes ? static_cast<size_t>(lw * kLaneKeys * kStageStride) : 0);  // pairs: 32-bit words
  std::vector<const char*> pf_lines(lanes ? static_cast<size_t>(kChunk * ((D * static_cast<int64_t>(sizeof(T)) + 63) / 64)) : 0);
  std::vector<float> lane_m(lanes ? static_cast<size_t>(lanes_all) : 0, -kInf), lane_l(lanes ? static_cast<size_t>(lanes_all) : 0);
  std::vector<int32_t> diag32(lanes ? static_cast<size_t>(lanes_all) : 0), lo32(diag32.size()), hi32(diag32.size());
  std::vector<float> lane_slope(lanes && p.alibi_slopes ? static_cast<size_t>(lanes_all) : 0);
  if (lanes)
    for (int64_t v = 0; v < vectors; ++v)
      for (int64_t e = 0; e < lw; ++e) {
        // The key range of the vector's row, clamped into int32 (lengths are far below its limit).
        constexpr int64_t kBig = int64_t{1} << 30;
        const int64_t lane = v * lw + e;
        diag32[lane] = static_cast<int32_t>(diag[v]);
        lo32[lane] = static_cast<int32_t>(p.window_left >= 0 ? std::max(diag[v] - p.window_left, -kBig) : -kBig);
        hi32[lane] = static_cast<int32_t>(p.window_right >= 0 ? std::min(diag[v] + p.window_right, kBig) : kBig);
        if (p.alibi_slopes) lane_slope[lane] = slope[v];
        const int64_t hk = v / vgroup, lv = v % vgroup;
        for (int64_t t = 0; t < qpairs; ++t) {
          uint16_t* w = qt.data() + 2 * (((hk * qpairs + t) * vgroup + lv) * lw + e);
          w[0] = qb[v * dpb + 2 * t];
          w[1] = qb[v * dpb + 2 * t + 1];
        }
      }

  // Position addresses once per chunk: no division per key below.
  auto positions = [&](int64_t j0, int64_t n, const T** kp, const T** vp) {
    for (int64_t c0 = 0, blk = j0 / c.block_size, off = j0 % c.block_size; c0 < n; ++c0) {
      const int64_t where = table[blk] * c.block_stride + off * c.pos_stride;
      kp[c0] = static_cast<const T*>(p.key_cache) + where;
      vp[c0] = static_cast<const T*>(p.value_cache) + where;
      if (++off == c.block_size) {
        off = 0;
        ++blk;
      }
    }
  };
  // P V keeps 16 (AVX-512: of 32 registers) or 8 (AVX2: of 16) accumulators
  // in registers: kPvHeads query heads x kSlices vectors of head_dim. Groups
  // of 4 take all 4 heads in one pass, so each V vector is widened once for
  // every head of its group; other head dims / groups take the L1 loop.
  // Odd groups (MHA: one query head per kv head) go a head at a time, 8
  // vectors (128 columns) a pass.
  constexpr int kPvHeads = kW < 16 ? 1 : (HT == 4 ? 4 : HT == 2 ? 2 : 1);
  constexpr int kSlices = kW < 16 || kPvHeads == 1 ? 8 : 16 / kPvHeads;
  const int64_t d_reg = D / (kSlices * kW) * (kSlices * kW);
  // What whole passes of kSlices vectors leave of head_dim goes to passes
  // of half, a quarter ... of them, one vector at least, rather than the L1
  // loop: d_vec is where the register passes end (the last partial vector,
  // if any, takes the L1 loop). Decode 16 x 2048 on the Zen 4, medians of 4
  // alternated runs: MHA 16 heads d64 bf16 7.7 -> 5.8 ms, fp32 13.9 ->
  // 12.1; 16 / 8 heads d64 bf16 3.85 -> 3.28; MHA d192 bf16 (8 x 2048) 11.9
  // -> 9.3 (a pass of 4 vectors after those of 8); MHA d96 bf16 (Phi-3
  // mini's layout) 19.1 -> 15.7; 32 / 8 heads d96 bf16 8.8 -> 5.3.
  const int64_t d_vec = D / kW * kW;
  const bool pv_in_registers =
      four_head_pv || (vgroup % kPvHeads == 0 && (dot_scores ? d_reg > 0 : d_vec > 0));
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  // Software prefetches into L2, issued a few at a time between the
  // products rather than in bursts (a burst of more misses than the core
  // tracks stalls it): the scores pull K `ahead` positions ahead, one kv
  // head's rows at a time, and V of the first kv head for the positions
  // they score; P V, going a kv head at a time, pulls at each key the next
  // head's V row, and per head that head's K rows of the next chunk's first
  // `ahead` positions. Measured bf16 16 x 2048 decode on the Zen 4: bursts
  // (a position's every head at once, the first head's V at the start of
  // P V, the chunk's first K at its start) 7.0-7.6 ms, spread 5.0-5.2 ms;
  // `ahead` 4 / 8 / 12 / 16 positions (8 / 16 / 24 / 32 KiB) within noise
  // of each other, 24 and 32 slower.
  const int64_t position_bytes = c.heads_k * row_bytes;
  const int64_t ahead = std::min(kChunk, round_up((kAheadBytes + position_bytes - 1) / position_bytes, 4));
  // K positions of a chunk prefetched before its scores start (by the
  // previous chunk's P V): lanes stage a tile of kLaneKeys at once.
  const int64_t first_k = lanes ? std::max(ahead, tile_keys) : ahead;
  // K rows of kv head hk (and V rows, for the L1 loop) at positions [from, to) of kp / vp.
  auto prefetch_head = [&](const T* const* kp, const T* const* vp, int64_t from, int64_t to, int64_t hk) {
    for (int64_t at = from; at < to; ++at) {
      prefetch_row(kp[at] + hk * c.head_stride, row_bytes);
      if (!pv_in_registers) prefetch_row(vp[at] + hk * c.head_stride, row_bytes);
    }
  };
  for (int64_t j0 = k0; j0 < k1; j0 += kChunk) {
    const int64_t n = std::min(kChunk, k1 - j0);
    if (next_known) {  // P V of the previous chunk took the addresses and prefetched the first K rows
      std::copy_n(kpos_next, n, kpos);
      std::copy_n(vpos_next, n, vpos);
    } else {
      positions(j0, n, kpos, vpos);
      for (int64_t hk = 0; hk < c.heads_k; ++hk) prefetch_head(kpos, vpos, 0, std::min(first_k, n), hk);
    }
    next_known = false;
    // While the scores work on kv head hk of positions [c0, c1), they
    // prefetch that head's K rows `ahead` positions on and, for hk = 0, the
    // V rows of [c0, c1); with bf16 dot products (several query rows, so
    // the chunk's scores take long) every head's V rows of [c0, c1), so that
    // P V, which interleaves a head's rows before its products, finds them
    // all in L2 (it stalled on them when each head prefetched the next's
    // just before its own products: bf16 16 x 2048, 4 rows, 11.1-12.0 ->
    // 10.1-10.6 ms on the Zen 4). Written out in both loops below on purpose: the
    // same prefetches behind a lambda (which GCC left out of line) measured
    // no faster than the bursts, and behind an always_inline function
    // 7.5-7.9 ms against 4.8-4.9 written out (bf16 16 x 2048).
    int64_t c0 = 0;
#if defined(__AVX512BF16__)
    if (gemm_scores) {
      // Per kv head: its K rows transposed, then 4 query vectors at a time,
      // each GEMM call prefetching a share of this head's V rows (for P V)
      // and of the next head's K rows (for its transpose): spread out, not
      // in bursts (bursts: 8 rows 16.2-16.8 -> 18.8-19.0 ms).
      const uint16_t* krows[kChunk];
      for (int64_t hk = 0; hk < c.heads_k; ++hk) {
        const int64_t off = hk * c.head_stride;
        for (int64_t at = 0; at < n; ++at) krows[at] = reinterpret_cast<const uint16_t*>(kpos[at] + off);
        transpose_column_pairs(krows, n, D, kt2.data(), kChunk);
        for (int64_t r0 = 0; r0 < vgroup; r0 += 4) {
          for (int64_t at = r0 * n / vgroup; at < (r0 + 4) * n / vgroup; ++at) {
            prefetch_row(vpos[at] + off, row_bytes);
            if (hk + 1 < c.heads_k) prefetch_row(kpos[at] + off + c.head_stride, row_bytes);
          }
          attn::gemm_nt_bf16(qb.data() + (hk * vgroup + r0) * dpb, dpb, kt2.data(), kChunk,
                             sc + (hk * vgroup + r0) * kChunk, kChunk, 4, (D + 1) / 2, kChunk, p.scale);
        }
      }
      c0 = n;
    }
#endif
#if defined(__AVX512BF16__)
    if (lanes) {
      // kLaneKeys positions at a time, every kv head. The tile's V rows
      // (for P V) are prefetched a line per pair of columns of its scores;
      // K came in during the previous chunk's P V, except for a task's
      // first chunk (then a tile ahead).
      for (int64_t t0 = 0; t0 < n; t0 += tile_keys) {
        const int64_t nk = std::min(tile_keys, n - t0);
        for (int64_t hk = 0; hk < c.heads_k; ++hk) {
          const int64_t off = hk * c.head_stride;
          if (j0 == k0)  // later chunks' K came in during the previous P V
            for (int64_t at = t0 + tile_keys; at < std::min(t0 + 2 * tile_keys, n); ++at)
              prefetch_row(kpos[at] + off, row_bytes);
          // This tile's V rows (for P V), a line per pair of columns of the scores.
          int64_t npf = 0;
          for (int64_t at = t0; at < t0 + nk; ++at)
            for (int64_t b = 0; b < row_bytes; b += 64) pf_lines[npf++] = reinterpret_cast<const char*>(vpos[at] + off) + b;
          const bf16_t* kr[2 * kLaneKeys];
          for (int64_t j = 0; j < nk; ++j) kr[j] = reinterpret_cast<const bf16_t*>(kpos[t0 + j] + off);
          if (pair_lanes) {
            stage_key_pairs(kr, nk, D, reinterpret_cast<uint32_t*>(stage.data()));
            pair_lane_scores(qt.data() + 2 * hk * qpairs * vgroup * lw, vgroup * lw, qpairs,
                             reinterpret_cast<const uint32_t*>(stage.data()), p.scale, sc + (hk * kChunk + t0) * vgroup,
                             vgroup * lw, pf_lines.data(), npf);
            continue;
          }
          stage_key_rows(kr, nk, D, stage.data());
          for (int64_t vb = 0; vb < vgroup; vb += 16) {
            const int64_t first = std::min(npf, vb / 16 * qpairs);
            lane_scores(qt.data() + 2 * (hk * qpairs * vgroup + vb), vgroup, qpairs, stage.data(), p.scale,
                        sc + (hk * kChunk + t0) * vgroup + vb, vgroup, pf_lines.data() + first, npf - first);
          }
        }
      }
      c0 = n;
    }
#endif
#if defined(__AVX512F__)
    if constexpr (HT == 4) {
      for (; c0 + 4 <= n; c0 += 4) {
        for (int64_t hk = 0; hk < c.heads_k; ++hk) {
          const int64_t off = hk * c.head_stride;
          int64_t npf = 0;
          for (int64_t at = c0 + ahead; at < std::min(c0 + 4 + ahead, n); ++at) {
            for (int64_t b = 0; b < row_bytes; b += 64) pf4[npf++] = reinterpret_cast<const char*>(kpos[at] + off) + b;
            if (!pv_in_registers)
              for (int64_t b = 0; b < row_bytes; b += 64) pf4[npf++] = reinterpret_cast<const char*>(vpos[at] + off) + b;
          }
          if (pv_in_registers && (hk == 0 || dot_scores))
            for (int64_t at = c0; at < c0 + 4; ++at)
              for (int64_t b = 0; b < row_bytes; b += 64) pf4[npf++] = reinterpret_cast<const char*>(vpos[at] + off) + b;
          const T* kr[4] = {kpos[c0] + off, kpos[c0 + 1] + off, kpos[c0 + 2] + off, kpos[c0 + 3] + off};
          // The lines, shared out among the head's blocks, go out between
          // their products (a burst here stalled the core on full miss
          // queues: 4 / 1 heads d256, a third of the samples on the
          // prefetches; bf16 16 x 8192 decode 1.13x, 32 / 8 heads d64
          // 1.04x, d128 unchanged).
          const int64_t blocks = vgroup / 4;
#if defined(__AVX512BF16__)
          if constexpr (std::is_same_v<T, bf16_t>) {
            if (dot_scores) {
              for (int64_t b = 0; b < blocks; ++b) {
                const int64_t h0 = hk * vgroup + 4 * b, from = b * npf / blocks;
                four_by_four_scores_bf16(qb.data() + h0 * dpb, dpb, D, kr, p.scale, sc + h0 * kChunk + c0, pf4 + from,
                                         (b + 1) * npf / blocks - from);
              }
              continue;
            }
          }
#endif
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t h0 = hk * vgroup + 4 * b, from = b * npf / blocks;
            four_by_four_scores(q.data() + h0 * dp, dp, D, kr, sc + h0 * kChunk + c0, pf4 + from,
                                (b + 1) * npf / blocks - from);
          }
        }
      }
    }
#endif
    // Then two positions at a time (a lone last one is paired with itself).
    for (; c0 < n; c0 += 2) {
      const bool pair = c0 + 1 < n;
      const int64_t c1 = pair ? c0 + 1 : c0;
      for (int64_t hk = 0; hk < c.heads_k; ++hk) {
        const int64_t off = hk * c.head_stride;
        for (int64_t at = c0 + ahead; at < std::min(c1 + 1 + ahead, n); ++at) {
          prefetch_row(kpos[at] + off, row_bytes);
          if (!pv_in_registers) prefetch_row(vpos[at] + off, row_bytes);
        }
        if (pv_in_registers && (hk == 0 || dot_scores))
          for (int64_t at = c0; at <= c1; ++at) prefetch_row(vpos[at] + off, row_bytes);
        const T* kr0 = kpos[c0] + hk * c.head_stride;
        const T* kr1 = kpos[c1] + hk * c.head_stride;
        for (int64_t h0 = hk * vgroup; h0 < (hk + 1) * vgroup; h0 += HT) {
#if defined(__AVX2__) && !defined(__AVX512F__)
          if constexpr (HT == 4) {
            if constexpr (std::is_same_v<T, bf16_t>) {
              if (unpack_widen) {
                four_head_two_key_scores_unpacked(q.data() + h0 * dp, dp, D, kr0, kr1, sc + h0 * kChunk + c0,
                                                  pair ? sc + h0 * kChunk + c1 : spill);
                continue;
              }
            }
            four_head_two_key_scores(q.data() + h0 * dp, dp, D, kr0, kr1, sc + h0 * kChunk + c0,
                                     pair ? sc + h0 * kChunk + c1 : spill);
            continue;
          }
#endif
          two_key_scores<HT>(q.data() + h0 * dp, dp, D, kr0, kr1, sc + h0 * kChunk + c0,
                             pair ? sc + h0 * kChunk + c1 : spill);
        }
      }
    }
    // softcap, ALiBi, the rows' own key ranges, then one online-softmax
    // rescale per chunk and query vector.
#if defined(__AVX512BF16__)
    if (lanes) {
      alignas(64) float alpha[16];
      for (int64_t hk = 0; hk < c.heads_k; ++hk)
        for (int64_t vb = 0; vb < vgroup; vb += lane_vectors) {
          const int64_t v0 = hk * vgroup + vb, l0 = v0 * lw;
          lane_softmax(sc + hk * kChunk * vgroup + vb * lw, vgroup * lw, n, j0, p.softcap, diag32.data() + l0,
                       p.alibi_slopes ? lane_slope.data() + l0 : nullptr, lo32.data() + l0, hi32.data() + l0, rows > 1,
                       pair_lanes, lane_m.data() + l0, lane_l.data() + l0, alpha);
          for (int64_t lane = 0; lane < 16; lane += lw)
            if (alpha[lane] != 1.0f) {
              float* a = acc.data() + (v0 + lane / lw) * dp;
              const Vec va = vset1(alpha[lane]);
              for (int64_t d = 0; d < dp; d += kW) vstore(a + d, vload(a + d) * va);
            }
        }
    } else
#endif
    for (int64_t h = 0; h < vectors; ++h) {
      float* srow = sc + h * kChunk;
      HeadState& hs = st[h];
      if (p.softcap > 0.0f)
        for (int64_t c0 = 0; c0 < n; ++c0) srow[c0] = p.softcap * std::tanh(srow[c0] / p.softcap);
      if (p.alibi_slopes)
        for (int64_t c0 = 0; c0 < n; ++c0) srow[c0] -= slope[h] * static_cast<float>(std::abs(diag[h] - (j0 + c0)));
      if (rows > 1) {  // a single row's range is the task's: [lo_mask, len)
        const int64_t lo = p.window_left >= 0 ? diag[h] - p.window_left : j0;
        const int64_t hi = p.window_right >= 0 ? diag[h] + p.window_right : j0 + n;
        if (j0 < lo || j0 + n - 1 > hi)
          for (int64_t c0 = 0; c0 < n; ++c0)
            if (j0 + c0 < lo || j0 + c0 > hi) srow[c0] = -kInf;
      }
      float m_new = hs.m;
      {
        Vec vmx = vset1(-kInf);
        int64_t c0 = 0;
        for (; c0 + kW <= n; c0 += kW) vmx = vmax(vmx, vload(srow + c0));
        m_new = std::max(m_new, vhmax(vmx));
        for (; c0 < n; ++c0) m_new = std::max(m_new, srow[c0]);
      }
      if (m_new == -kInf) {  // no key of this row so far: P V must add nothing
        std::fill_n(srow, n, 0.0f);
        continue;
      }
      const float alpha = std::exp(hs.m - m_new);
      const Vec vm = vset1(m_new);
      Vec sum = vzero();
      int64_t c0 = 0;
      for (; c0 + kW <= n; c0 += kW) {
        const Vec e = vexp_nonpos(vload(srow + c0) - vm);
        vstore(srow + c0, e);
        sum = sum + e;
      }
      float tail = 0.0f;
      for (; c0 < n; ++c0) tail += (srow[c0] = std::exp(srow[c0] - m_new));
      hs.l = hs.l * alpha + vsum(sum) + tail;
      hs.m = m_new;
      if (alpha != 1.0f) {
        float* a = acc.data() + h * dp;
        const Vec va = vset1(alpha);
        for (int64_t d = 0; d < dp; d += kW) vstore(a + d, vload(a + d) * va);
      }
    }
    // P V. Register path: per kv head, the chunk's V rows stream through the
    // accumulators (re-read from L1 / L2 for the next query heads). Other
    // head dims: in memory order, accumulators in L1.
    if (pv_in_registers) {
      const int64_t n_next = std::min(kChunk, k1 - j0 - kChunk);
      if (n_next > 0) {
        positions(j0 + kChunk, n_next, kpos_next, vpos_next);
        next_known = true;
      }
#if defined(__AVX512BF16__)
      if (dot_scores) {
        // P as bf16 key pairs, zero past n (an odd last key pairs with 0).
        if (pair_lanes) {  // a row of scores is 8 vectors' key pairs: its bf16 words are P's
          for (int64_t hk = 0; hk < c.heads_k; ++hk)
            for (int64_t t = 0; t < (n + 1) / 2; ++t)
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb.data() + 2 * (hk * (kChunk / 2) + t) * vgroup),
                                  reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(sc + (hk * kChunk + 2 * t) * vgroup))));
        } else if (lanes) {  // words (kv head, key pair, vector): keys 2t and 2t + 1 of 16 lanes interleaved
          const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                      22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
          for (int64_t hk = 0; hk < c.heads_k; ++hk)
            for (int64_t t = 0; t < (n + 1) / 2; ++t)
              for (int64_t vb = 0; vb < vgroup; vb += 16) {
                const float* s0 = sc + (hk * kChunk + 2 * t) * vgroup + vb;
                const __m512 odd = 2 * t + 1 < n ? _mm512_loadu_ps(s0 + vgroup) : _mm512_setzero_ps();
                const __m512bh b = _mm512_cvtne2ps_pbh(odd, _mm512_loadu_ps(s0));
                _mm512_storeu_si512(pb.data() + 2 * ((hk * (kChunk / 2) + t) * vgroup + vb),
                                    _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(b)));
              }
        } else
        for (int64_t h = 0; h < vectors; ++h) {
          const float* srow = sc + h * kChunk;
          uint16_t* prow = pb.data() + h * kChunk;
          for (int64_t c0 = 0; c0 < kChunk; c0 += 32) {
            const __mmask16 m0 = n - c0 >= 16 ? 0xFFFF : n <= c0 ? 0 : static_cast<__mmask16>((1u << (n - c0)) - 1);
            const __mmask16 m1 = n - c0 >= 32 ? 0xFFFF : n <= c0 + 16 ? 0 : static_cast<__mmask16>((1u << (n - c0 - 16)) - 1);
            const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, srow + c0 + 16), _mm512_maskz_loadu_ps(m0, srow + c0));
            _mm512_storeu_si512(prow + c0, reinterpret_cast<__m512i>(b));
          }
        }
        const int64_t pairs = (n + 1) / 2;
        const uint16_t* vrows[kChunk];
        // lanes: the next chunk's K rows, in the order its scores read them,
        // a share after every P V call: K streams in during P V as V did
        // during the scores.
        struct {
          int64_t per_call = 0, pos = 0, head = 0;
        } k_next;
        if (lanes && next_known) {
          const int64_t calls = c.heads_k * (d_reg / 64) * (vgroup / 4);
          k_next.per_call = (n_next * c.heads_k + calls - 1) / calls;
        }
        for (int64_t hk = 0; hk < c.heads_k; ++hk) {
          // The next chunk's first K rows; for gemm_scores all of the first
          // kv head's, a share per head (its transpose reads them at once;
          // 4 rows scored as a GEMM in a trial: 10.7-10.8 -> 10.4-10.6 ms
          // against only the first `ahead` rows).
          if (lanes) {
            // K comes in a share at a time inside the P V calls below
          } else if (next_known && gemm_scores)
            for (int64_t at = hk * n_next / c.heads_k; at < (hk + 1) * n_next / c.heads_k; ++at)
              prefetch_row(kpos_next[at], row_bytes);
          // Otherwise its first K rows of the next chunk, a share per P V
          // call below (a burst here before: bf16 16 x 8192 decode, 16 / 2
          // heads 1.05x, 24 / 2 1.06x, 8 / 1 d256 1.12x).
          int64_t npf_next = 0, issued = 0;
          if (!lanes && !gemm_scores && next_known)
            for (int64_t at = 0; at < std::min(first_k, n_next); ++at)
              for (int64_t b = 0; b < row_bytes; b += 64)
                pf_next[npf_next++] = reinterpret_cast<const char*>(kpos_next[at] + hk * c.head_stride) + b;
          const int64_t calls = (d_reg / 64) * (vgroup / 4), per_call = (npf_next + calls - 1) / calls;
          // This kv head's V rows (in L2 since the scores), interleaved by key pairs.
          const int64_t off = hk * c.head_stride;
          for (int64_t c0 = 0; c0 < n; ++c0) vrows[c0] = reinterpret_cast<const uint16_t*>(vpos[c0] + off);
          interleave_row_pairs(vrows, n, d_reg, v2.data(), dpb);
          for (int64_t d0 = 0; d0 < d_reg; d0 += 64)
            for (int64_t h0 = hk * vgroup; h0 < (hk + 1) * vgroup; h0 += 4)
              if (lanes) {
                int64_t npf = 0;
                for (int64_t r = 0; r < k_next.per_call && k_next.pos < n_next; ++r) {
                  const char* row = reinterpret_cast<const char*>(kpos_next[k_next.pos] + k_next.head * c.head_stride);
                  for (int64_t b = 0; b < row_bytes; b += 64) pf_lines[npf++] = row + b;
                  if (++k_next.head == c.heads_k) k_next.head = 0, ++k_next.pos;
                }
                pv_pairs_registers(pb.data() + 2 * (hk * (kChunk / 2) * vgroup + h0 - hk * vgroup), 2, 2 * vgroup,
                                   v2.data(), dpb, pairs, acc.data() + h0 * dp, dp, d0, pf_lines.data(), npf);
              } else {
                const int64_t share = std::min(per_call, npf_next - issued);
                pv_pairs_registers(pb.data() + h0 * kChunk, kChunk, 2, v2.data(), dpb, pairs, acc.data() + h0 * dp, dp, d0,
                                   pf_next + issued, share);
                issued += share;
              }
        }
      } else
#endif
#if defined(__AVX2__) && !defined(__AVX512F__)
      if (four_head_pv) {
        if constexpr (std::is_same_v<T, bf16_t> || std::is_same_v<T, float>) {
          for (int64_t hk = 0; hk < c.heads_k; ++hk) {
            if (next_known) prefetch_head(kpos_next, vpos_next, 0, std::min(ahead, n_next), hk);
            const int64_t hs = c.head_stride, next = hk + 1 < c.heads_k ? hk + 1 : hk;
            for (int64_t d0 = 0; d0 < D; d0 += 16)
              for (int64_t h0 = hk * vgroup; h0 < (hk + 1) * vgroup; h0 += 4)
                if (h0 == hk * vgroup)
                  pv_four_heads<true>(sc, vpos, n, hk * hs, acc.data(), dp, h0, d0, next * hs);
                else
                  pv_four_heads<false>(sc, vpos, n, hk * hs, acc.data(), dp, h0, d0, next * hs);
          }
        }
      } else
#endif
      {
      // Each kv head's first K rows of the next chunk go out a share per
      // pv_registers call, spread over its keys: in one burst before the
      // head's P V (`ahead` rows: 128 lines with one kv head), they stalled
      // it. bf16 16 x 8192 decode, 4 / 1 heads d128 1.23-1.29x, fp32
      // 1.11x, 8 / 2 heads 1.06x, MHA 16 heads 1.05x; 32 / 8 heads unchanged.
      int64_t passes = d_reg / (kSlices * kW);  // the passes below: kSlices wide, then the narrower ones
      for (int64_t S = kSlices / 2, rest = d_vec - d_reg; S >= 1; S /= 2)
        if (rest >= S * kW) ++passes, rest -= S * kW;
      const int64_t calls = std::max<int64_t>(1, passes * (vgroup / kPvHeads));
      for (int64_t hk = 0; hk < c.heads_k; ++hk) {
        int64_t npf = 0, issued = 0;
        if (next_known)
          for (int64_t at = 0; at < std::min(ahead, n_next); ++at)
            for (int64_t b = 0; b < row_bytes; b += 64)
              pf_next[npf++] = reinterpret_cast<const char*>(kpos_next[at] + hk * c.head_stride) + b;
        const int64_t per_call = (npf + calls - 1) / calls;
        // The row each key prefetches: the next head's at that key (for the
        // last head, the row just read: a no-op).
        const int64_t hs = c.head_stride, next = hk + 1 < c.heads_k ? hk + 1 : hk;
        // Passes of S vectors of head_dim from d0: kSlices up to d_reg, then
        // kSlices / 2, kSlices / 4, ... for the rest of d_vec.
        int64_t d0 = 0;
        auto pass = [&]<int S>() {
          for (int64_t h0 = hk * vgroup; h0 < (hk + 1) * vgroup; h0 += kPvHeads) {
            const int64_t share = std::min(per_call, npf - issued);
            if (h0 == hk * vgroup)
              pv_registers<kPvHeads, S, true, T>(sc, vpos, n, hk * hs, acc.data(), dp, h0, d0, next * hs,
                                                 pf_next + issued, share);
            else
              pv_registers<kPvHeads, S, false, T>(sc, vpos, n, hk * hs, acc.data(), dp, h0, d0, next * hs,
                                                  pf_next + issued, share);
            issued += share;
          }
          d0 += S * kW;
        };
        while (d0 < d_reg) pass.template operator()<kSlices>();
        if constexpr (kSlices >= 8)
          if (d_vec - d0 >= 4 * kW) pass.template operator()<4>();
        if constexpr (kSlices >= 4)
          if (d_vec - d0 >= 2 * kW) pass.template operator()<2>();
        if constexpr (kSlices >= 2)
          if (d_vec - d0 >= kW) pass.template operator()<1>();
        for (; issued < npf; ++issued) prefetch_l2(pf_next[issued]);  // none left unless a pass was skipped
      }
      }
    }
    const int64_t d_rest = four_head_pv ? D : !pv_in_registers ? 0 : dot_scores ? d_reg : d_vec;
    if (d_rest < D)
    for (int64_t c0 = 0; c0 < n; ++c0) {
      for (int64_t hk = 0; hk < c.heads_k; ++hk) {
        const T* vr = vpos[c0] + hk * c.head_stride;
        for (int64_t d = d_rest; d < D; d += kW) {
          const Vec v = d + kW <= D ? vload(vr + d) : vload_partial(vr + d, D - d);
          for (int64_t h = hk * vgroup; h < (hk + 1) * vgroup; ++h) {
            float* a = acc.data() + h * dp + d;
            vstore(a, vfma(vset1(sc[h * kChunk + c0]), v, vload(a)));
          }
        }
      }
    }
  }
  if (lanes)
    for (int64_t h = 0; h < vectors; ++h) st[h] = HeadState{lane_m[h * lw], lane_l[h * lw]};
  for (int64_t h = 0; h < vectors; ++h) {
    if (padding(h)) continue;
    if (part.direct) {  // as the combine step writes a single split
      const int64_t token = first_token + row_of(h), head = hk0 * group + head_of(h);
      T* out = static_cast<T*>(p.out) + s * p.out_seq_stride + token * p.out_row_stride + head * p.out_head_stride;
      const float l = st[h].l;
      const Vec inv = vset1(l > 0.0f ? 1.0f / l : 0.0f);
      const float* o = acc.data() + h * dp;
      int64_t d = 0;
      for (; d + kW <= D; d += kW) vstore(out + d, vload(o + d) * inv);
      if (d < D) vstore_partial(out + d, vload_partial(o + d, D - d) * inv, D - d);
      p.lse[s * p.lse_seq_stride + token * p.lse_row_stride + head * p.lse_head_stride] =
          l > 0.0f ? st[h].m + std::log(l) : kInf;
      continue;
    }
    const int64_t at = (s * part.vectors + (hk0 + h / vgroup) * per_kv + h % vgroup) * part.splits + split;
    part.m[at] = st[h].m;
    part.l[at] = st[h].l;
    std::copy_n(acc.data() + h * dp, dp, part.o.data() + at * dp);
  }
}

}  // namespace

void paged_attention(const PagedAttnParams& p) {
  const CacheLayout& c = p.cache;
  const int64_t D = c.head_dim, group = p.heads / c.heads_k;
  // Query vectors per kv head that every sequence's count is a multiple of.
  int64_t unit = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) unit = std::gcd(unit, group * rows_of(p, s));
  const int64_t want = 4 * static_cast<int64_t>(num_threads());
  int64_t total_keys = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) total_keys += std::max<int64_t>(p.seq_lens[s], 0);
  // Kv heads per task: all of them unless that is more than kMaxTaskVectors
  // query vectors. Then the contexts are split into pieces of about a
  // want-th of all keys (per kv-head group), in whole blocks and at least
  // kChunk keys: enough tasks to feed every thread, and in a batch of mixed
  // lengths no single long sequence left to one thread. Too few keys to
  // split that far (a short prompt's forward), and the tasks take fewer kv
  // heads until there are enough of them.
  auto fewer_kv_heads = [&](int64_t hg) {
    while (--hg > 1 && c.heads_k % hg != 0) {
    }
    return std::max<int64_t>(hg, 1);
  };
  int64_t task_kv_heads = c.heads_k;
  while (task_kv_heads > 1 && task_kv_heads * group * p.max_rows > kMaxTaskVectors)
    task_kv_heads = fewer_kv_heads(task_kv_heads);
  // Several query rows (flash_attn's few-query forward) with several query
  // vectors per kv head make a task compute bound: then fewer kv heads per
  // task before any key split, which would repeat the task's query setup
  // and add partials to combine. (bf16, 1 sequence x 8 rows x 32 / 8 heads,
  // 1024 keys: 0.70 -> 0.46 ms; 4 rows: 0.44 -> 0.29.) Decode keeps every kv
  // head in a task, reading each cache position in one run, unless its keys
  // are too few to split (below).
  if (p.max_rows > 1 && group * p.max_rows >= kDotScoresMinVectors)
    while (task_kv_heads > 1 && p.num_seqs * (c.heads_k / task_kv_heads) < want)
      task_kv_heads = fewer_kv_heads(task_kv_heads);
  int64_t keys_per_split = 0, splits = 0, head_groups = 0;
  for (;;) {
    head_groups = c.heads_k / task_kv_heads;
    keys_per_split = round_up(
        std::max<int64_t>(std::min<int64_t>((total_keys * head_groups + want - 1) / want, p.max_seq_len), kChunk),
        c.block_size);
    splits = std::max<int64_t>(1, (p.max_seq_len + keys_per_split - 1) / keys_per_split);
    if (task_kv_heads == 1 || p.num_seqs * splits * head_groups >= want) break;
    task_kv_heads = fewer_kv_heads(task_kv_heads);
  }

  Partials part;
  part.splits = splits;
  part.dp = round_up(D, kW);
  part.vectors = p.heads * p.max_rows;
  part.direct = splits == 1;
  const int64_t partial_rows = part.direct ? 0 : p.num_seqs * part.vectors * splits;
  part.o.assign(static_cast<size_t>(partial_rows * part.dp), 0.0f);
  part.m.assign(static_cast<size_t>(partial_rows), -kInf);
  part.l.assign(static_cast<size_t>(partial_rows), 0.0f);

  // Largest tasks first (keys read times query rows), dealt one at a time:
  // in a batch of mixed lengths the short sequences' tasks are small or
  // empty, and fixed contiguous ranges of tasks would leave one thread most
  // of the long ones.
  // Task t = ((s * splits) + split) * head_groups + kv-head group.
  std::vector<int64_t> work(static_cast<size_t>(p.num_seqs * splits * head_groups));
  for (int64_t t = 0; t < static_cast<int64_t>(work.size()); ++t) {
    const int64_t s = t / head_groups / splits, split = t / head_groups % splits;
    const int64_t keys = std::min<int64_t>(p.seq_lens[s], (split + 1) * keys_per_split) - split * keys_per_split;
    work[t] = std::max<int64_t>(keys, 0) * rows_of(p, s);
  }
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    parallel_tasks_largest_first(work, [] { return 0; }, [&](int, int64_t t) {
      const int64_t s = t / head_groups / splits, split = t / head_groups % splits;
      const int64_t hk0 = t % head_groups * task_kv_heads;
      // Query vectors per register tile: the largest of 4, 2, 1 dividing
      // every sequence's count per kv head, or 4 with the counts padded
      // to a multiple of 4 when they all have 3 or more (groups of 3, 5, 6,
      // 7: tiles of 1 or 2 read every K and V vector once per tile, and
      // decode ran at 8-16 GB/s where groups of 4 reach 22).
      if (unit % 4 == 0 || unit >= 3)
        run_task<4, T>(p, s, split, keys_per_split, hk0, task_kv_heads, part);
      else if (unit % 2 == 0)
        run_task<2, T>(p, s, split, keys_per_split, hk0, task_kv_heads, part);
      else
        run_task<1, T>(p, s, split, keys_per_split, hk0, task_kv_heads, part);
    });
    if (part.direct) return;
    // Combine the splits of each (sequence, query vector).
    parallel_for(0, p.num_seqs * part.vectors, 16, [&](int64_t lo, int64_t hi) {
      std::vector<float> o(static_cast<size_t>(part.dp));
      for (int64_t sh = lo; sh < hi; ++sh) {
        const int64_t s = sh / part.vectors, v = sh % part.vectors, vgroup = group * rows_of(p, s);
        if (v >= c.heads_k * vgroup) continue;
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
        const int64_t h = v / vgroup * group + v % group;
        const int64_t token = (p.q_start ? p.q_start[s] : 0) + v % vgroup / group;
        T* out = static_cast<T*>(p.out) + s * p.out_seq_stride + token * p.out_row_stride + h * p.out_head_stride;
        const Vec inv = vset1(l > 0.0f ? 1.0f / l : 0.0f);
        int64_t d = 0;
        for (; d + kW <= D; d += kW) vstore(out + d, vload(o.data() + d) * inv);
        if (d < D) vstore_partial(out + d, vload_partial(o.data() + d, D - d) * inv, D - d);
        p.lse[s * p.lse_seq_stride + token * p.lse_row_stride + h * p.lse_head_stride] =
            l > 0.0f ? mx + std::log(l) : kInf;
      }
    });
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
