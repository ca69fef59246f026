// measure_compute_peak (see compute_peak.h): 12 independent accumulator
// chains, enough to cover the FMA latency on every current core (two FMA
// units of latency 4 need 8), timed in rounds until `seconds` have passed.
//
// The products are one asm statement a step. Written as intrinsics, GCC
// merged the identical chains (two Zen 4 cores then "measured" 931 GFLOP/s
// with AVX-512 and 346 with AVX2, the figure this project's notes give; the
// real fp32 FMA peak is 233); one asm per product kept the accumulators on
// the stack, a store after each. (An asm takes at most 30 operands, an
// accumulator counts twice: hence 12.)
#include "common/cpu/compute_peak.h"

#include <atomic>
#include <chrono>
#include <cstdint>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace torchkiln {
namespace TK_CPU_NS {
namespace {

constexpr int64_t kStepsPerRound = 1 << 20;

// Rounds of f(steps) until `seconds` pass; returns flops_per_step * steps / time.
template <class F>
double timed_rate(double seconds, double flops_per_step, const F& f) {
  f(int64_t{1} << 12);  // warm up (and bring the core to its clock)
  const auto t0 = std::chrono::steady_clock::now();
  int64_t steps = 0;
  double elapsed = 0.0;
  do {
    f(kStepsPerRound);
    steps += kStepsPerRound;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (elapsed < seconds);
  return flops_per_step * static_cast<double>(steps) / elapsed;
}

// Keeps a result observable so the loops are not removed (every thread
// stores here: atomic, relaxed).
std::atomic<float> g_sink{0.0f};

// `ins` acc_k += x * y (AT&T operand order: y, x, acc) for accumulators
// 0 .. 11 in operands %0 .. %11, x and y in operands 12 and 13.
#define TK_P(ins, k, x, y) ins " %" #y ", %" #x ", %" #k "\n\t"
#define TK_TWELVE(ins)                                                                                     \
  TK_P(ins, 0, 12, 13) TK_P(ins, 1, 12, 13) TK_P(ins, 2, 12, 13) TK_P(ins, 3, 12, 13) TK_P(ins, 4, 12, 13) \
  TK_P(ins, 5, 12, 13) TK_P(ins, 6, 12, 13) TK_P(ins, 7, 12, 13) TK_P(ins, 8, 12, 13) TK_P(ins, 9, 12, 13) \
  TK_P(ins, 10, 12, 13) TK_P(ins, 11, 12, 13)
#if defined(__AVX512F__)
// 12 zmm products a step, flops_per_product each: FMA, or (bf16_dot) vdpbf16ps.
template <class V>
double zmm_rate(double seconds, double flops_per_product, V x, V y, bool bf16_dot) {
  return timed_rate(seconds, 12.0 * flops_per_product, [&](int64_t steps) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
           a9 = a0, a10 = a0, a11 = a0;
    for (int64_t i = 0; i < steps; ++i) {
#define TK_ZMM_OPERANDS                                                                                    \
  : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9),    \
    "+v"(a10), "+v"(a11)                                                                                    \
  : "v"(x), "v"(y)
      if (bf16_dot) {
#if defined(__AVX512BF16__)
        asm volatile(TK_TWELVE("vdpbf16ps") TK_ZMM_OPERANDS);
#endif
      } else {
        asm volatile(TK_TWELVE("vfmadd231ps") TK_ZMM_OPERANDS);
      }
#undef TK_ZMM_OPERANDS
    }
    const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                   _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    g_sink.store(_mm512_reduce_add_ps(_mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)))),
                 std::memory_order_relaxed);
  });
}
#elif defined(__AVX2__)
double ymm_fma_rate(double seconds) {
  const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-3f);
  return timed_rate(seconds, 12.0 * 16.0, [&](int64_t steps) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
           a9 = a0, a10 = a0, a11 = a0;
    for (int64_t i = 0; i < steps; ++i)
      asm volatile(TK_TWELVE("vfmadd231ps")
                   : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6), "+x"(a7), "+x"(a8),
                     "+x"(a9), "+x"(a10), "+x"(a11)
                   : "x"(x), "x"(y));
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                                   _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11))));
    g_sink.store(lanes[0], std::memory_order_relaxed);
  });
}
#endif

}  // namespace

void measure_compute_peak(double seconds, ComputePeak* out) {
  *out = ComputePeak{};
#if defined(__AVX512F__)
  out->fp32_fma = zmm_rate(seconds, 32.0, _mm512_set1_ps(0.999f), _mm512_set1_ps(1e-3f), false);
#if defined(__AVX512BF16__)
  // bf16 1.0 and about 1e-3 in every element: 16 lanes x 2 multiply-adds.
  out->bf16_dot = zmm_rate(seconds, 64.0, _mm512_set1_epi16(0x3f80), _mm512_set1_epi16(0x3a83), true);
#endif
#elif defined(__AVX2__)
  out->fp32_fma = ymm_fma_rate(seconds);
#endif
  (void)seconds;
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
