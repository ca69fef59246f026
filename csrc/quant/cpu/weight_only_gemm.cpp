// Weight-only quantised matmul for many rows of bf16 x (prefill) on
// AVX512_BF16: a GEMM whose weight operand is dequantised a few rows at a
// time into L2, never as a whole.
//
// The operands trade the usual roles. `vdpbf16ps` multiplies a vector of 16
// (bf16 pair) lanes by a broadcast pair; here the vectors hold 16 rows of x
// and the broadcast pair is two consecutive k of one weight row. The weight
// rows, dequantised exactly as dequantize(qw, bf16) rounds them, can then be
// read where the row decoder writes them, with no transpose into a blocked
// layout; x is the operand that is rearranged, once per call, into blocks of
// 48 rows stored pair by pair (16 KiB per 1024 columns of each block).
//
// Register tile: 8 weight rows (output columns) x 48 rows of x = 24 fp32
// accumulators over the whole k. Each k pair costs 3 vector loads of x, 8
// broadcasts and 24 `vdpbf16ps`. In cache this ran at 3.5-3.6 G `vdpbf16ps`
// a second per Zen 4 core, 98% of the instruction's peak (the fixed-layout
// alternative, packing the weight into 32-column panels and broadcasting x,
// reached the same but needs the transpose). ATen's bf16 GEMM (oneDNN) on
// the dequantised weight reaches 76-90% of that peak on these shapes, and
// dequantising to a buffer first cost 8-10% more.
//
// Loops: each thread owns whole 32-column stripes of out (so no cache line of
// out is written by two threads); for each 8-row tile of its weight rows it
// dequantises the tile (8 rows x k, at most 176 KiB at k = 11008), then runs
// it against every block of x. x streams from L3 (3 loads per 24 products,
// 8 bytes a cycle); past kChunkBytes of packed x the rows go in chunks, each
// chunk decoding the weight again, so the stream stays in L3.
#include <algorithm>
#include <cstdint>
#include <new>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace TK_CPU_NS {

#if defined(__AVX512BF16__)
namespace {

constexpr int kTileCols = 8;      // weight rows per register tile (broadcast operands)
constexpr int kBlockRows = 48;    // rows of x per packed block (3 vectors of 16)
constexpr int64_t kStripe = 32;   // columns of out per unit of thread work (one 64-byte line of bf16)
constexpr int64_t kChunkBytes = int64_t{8} << 20;  // packed x per pass over the weight
// Dequantised rows are this many pairs longer than k / 2, so the 8 rows of a
// tile do not all start on the same L1 set at k a multiple of 2048.
constexpr int64_t kRowPadPairs = 16;

// Rows [m0, m0 + kBlockRows) of x as [pair][kBlockRows] 32-bit (bf16, bf16)
// pairs; rows past m are zero.
void pack_x_block(const WeightOnlyParams& p, int64_t m0, uint32_t* dst) {
  const int64_t pairs = p.k / 2;
  const bf16_t* x = static_cast<const bf16_t*>(p.x);
  for (int r = 0; r < kBlockRows; ++r) {
    if (m0 + r >= p.m) {
      for (int64_t i = 0; i < pairs; ++i) dst[i * kBlockRows + r] = 0;
      continue;
    }
    const bf16_t* row = x + (m0 + r) * p.x_row_stride;
    for (int64_t i = 0; i < pairs; ++i) std::memcpy(dst + i * kBlockRows + r, row + 2 * i, 4);
  }
}

// acc[c][v] lane i = sum_k x[row 16v + i of the block, k] * w[c, k], over the
// first 16 * XV rows of a packed block.
template <int XV>
void tile_products(const uint32_t* xb, const uint32_t* w, int64_t w_ld, int64_t pairs,
                   __m512 (&acc)[kTileCols][XV]) {
#pragma GCC unroll 8
  for (int c = 0; c < kTileCols; ++c)
#pragma GCC unroll 3
    for (int v = 0; v < XV; ++v) acc[c][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh xv[XV];
#pragma GCC unroll 3
    for (int v = 0; v < XV; ++v)
      xv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xb + i * kBlockRows + 16 * v));
#pragma GCC unroll 8
    for (int c = 0; c < kTileCols; ++c) {
      const __m512bh wc = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(w[c * w_ld + i])));
#pragma GCC unroll 3
      for (int v = 0; v < XV; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], xv[v], wc);
    }
  }
}

// out[m0 + r, n0 + c] = bf16(acc + bias) for the rows and columns that exist.
template <int XV>
void store_tile(const WeightOnlyParams& p, const __m512 (&acc)[kTileCols][XV], int64_t m0, int64_t n0) {
  alignas(64) float t[kTileCols][16 * XV];
#pragma GCC unroll 8
  for (int c = 0; c < kTileCols; ++c)
#pragma GCC unroll 3
    for (int v = 0; v < XV; ++v) _mm512_store_ps(&t[c][16 * v], acc[c][v]);
  const int cols = static_cast<int>(std::min<int64_t>(kTileCols, p.n - n0));
  const int rows = static_cast<int>(std::min<int64_t>(16 * XV, p.m - m0));
  float b[kTileCols] = {};
  if (p.bias)
    for (int c = 0; c < cols; ++c) b[c] = to_float(static_cast<const bf16_t*>(p.bias)[n0 + c]);
  bf16_t* out = static_cast<bf16_t*>(p.out) + m0 * p.out_row_stride + n0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) out[r * p.out_row_stride + c] = from_float<bf16_t>(t[c][r] + b[c]);
}

template <int XV>
void tile_block(const WeightOnlyParams& p, const uint32_t* xb, const uint32_t* w, int64_t w_ld, int64_t m0,
                int64_t n0) {
  __m512 acc[kTileCols][XV];
  tile_products<XV>(xb, w, w_ld, p.k / 2, acc);
  store_tile<XV>(p, acc, m0, n0);
}

struct AlignedFree {
  void operator()(uint32_t* ptr) const { ::operator delete[](ptr, std::align_val_t{64}); }
};
using AlignedWords = std::unique_ptr<uint32_t[], AlignedFree>;
AlignedWords aligned_words(int64_t count) {
  return AlignedWords(static_cast<uint32_t*>(::operator new[](count * sizeof(uint32_t), std::align_val_t{64})));
}

}  // namespace

void weight_only_gemm(const WeightOnlyParams& p) {
  if (p.dtype != DType::kBFloat16 || p.k % 2 != 0) throw std::invalid_argument("weight_only_gemm: needs bf16 x and an even k");
  const int64_t pairs = p.k / 2, blocks = (p.m + kBlockRows - 1) / kBlockRows;
  const int64_t block_words = kBlockRows * pairs;
  AlignedWords xp = aligned_words(blocks * block_words);
  parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) pack_x_block(p, b * kBlockRows, xp.get() + b * block_words);
  });
  const int64_t chunk_blocks = std::max<int64_t>(1, kChunkBytes / (block_words * 4));
  const int64_t w_ld = pairs + kRowPadPairs;
  parallel_for(0, (p.n + kStripe - 1) / kStripe, 1, [&](int64_t lo, int64_t hi) {
    AlignedWords w = aligned_words(kTileCols * w_ld);
    const int64_t n_end = std::min(p.n, hi * kStripe);
    for (int64_t b0 = 0; b0 < blocks; b0 += chunk_blocks) {
      const int64_t b1 = std::min(blocks, b0 + chunk_blocks);
      for (int64_t n0 = lo * kStripe; n0 < n_end; n0 += kTileCols) {
        const int64_t rows = std::min<int64_t>(kTileCols, p.n - n0);
        weight_only_dequantize_rows(p, n0, rows, w.get(), w_ld * 2);
        if (rows < kTileCols) std::memset(w.get() + rows * w_ld, 0, (kTileCols - rows) * w_ld * 4);
        for (int64_t b = b0; b < b1; ++b) {
          const uint32_t* xb = xp.get() + b * block_words;
          const int64_t m0 = b * kBlockRows, left = p.m - m0;
          if (left > 32)
            tile_block<3>(p, xb, w.get(), w_ld, m0, n0);
          else if (left > 16)
            tile_block<2>(p, xb, w.get(), w_ld, m0, n0);
          else
            tile_block<1>(p, xb, w.get(), w_ld, m0, n0);
        }
      }
    }
  });
}

#else

void weight_only_gemm(const WeightOnlyParams&) {
  throw std::logic_error("weight_only_gemm: this build of the kernel has no AVX512_BF16");
}

#endif

}  // namespace TK_CPU_NS
}  // namespace torchkiln
