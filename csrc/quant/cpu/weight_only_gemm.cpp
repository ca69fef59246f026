// Weight-only quantised matmul for many rows of bf16 x (prefill), and its
// input gradient, on AVX512_BF16: GEMMs whose weight operand is dequantised
// a few rows (or columns) at a time, never as a whole.
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
// reached the same but needs the transpose). End to end at M=256 this GEMM
// runs at 92-94% of the peak (430 GFLOP/s on 2 cores), ATen's bf16 GEMM
// (oneDNN) on a dense bf16 weight at 65-93% (varying between runs, about
// the same as ours in the same run); dequantising tiles into a buffer for
// it cost another 8-10%.
//
// Loops: x is packed a chunk of blocks at a time (kChunkBytes, so the
// stream stays in L3 and the copy is bounded); each thread owns whole
// 32-column stripes of out (so no cache line of out is written by two
// threads), and for each 8-row tile of its weight rows it dequantises the
// tile (8 rows x k, at most 176 KiB at k = 11008) and runs it against every
// block of the chunk. x streams from L3 (3 loads per 24 products, 8 bytes a
// cycle); each further chunk decodes the weight again.
//
// The input gradient grad @ W (weight_only_gemm_grad; QLoRA's backward)
// sums over W's rows, so its broadcast pairs are (W[2j][c], W[2j+1][c]):
// two weight rows interleaved by one `vpermt2w` per 16 columns. grad is the
// packed operand. A thread's unit is a slab of 128 columns of W over all its
// rows (one 64-byte line of each 4-bit row; narrower slabs fetched every
// line again per 32 columns), built once and run 8 columns at a time
// against every block of grad. Zen 4, M=256: 1.4-1.7x the dequantised
// weight + ATen GEMM it replaces, 0.96-1.03x a dense bf16 `grad @ W`.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <type_traits>

#include "common/cpu/vec.h"
#include "common/parallel.h"
#include "quant/cpu/code_tables.h"
#include "quant/quant_matmul.h"

namespace torchkiln {
namespace TK_CPU_NS {

#if defined(__AVX512BF16__)
namespace {

constexpr int kTileCols = 8;      // broadcast operands (output columns) per register tile
constexpr int kBlockRows = 48;    // rows of the vector operand per packed block (3 vectors of 16)
constexpr int64_t kStripe = 32;   // columns of out per unit of thread work (one 64-byte line of bf16)
constexpr int64_t kSlabCols = 128;  // input-gradient columns dequantised at once (build_slab)
constexpr int64_t kChunkBytes = int64_t{8} << 20;  // packed rows per pass over the weight
// Dequantised rows are this many pairs longer than k / 2, so the 8 rows of a
// tile do not all start on the same L1 set at k a multiple of 2048.
constexpr int64_t kRowPadPairs = 16;

struct AlignedFree {
  void operator()(uint32_t* ptr) const { ::operator delete[](ptr, std::align_val_t{64}); }
};
using AlignedWords = std::unique_ptr<uint32_t[], AlignedFree>;
AlignedWords aligned_words(int64_t count) {
  return AlignedWords(static_cast<uint32_t*>(::operator new[](count * sizeof(uint32_t), std::align_val_t{64})));
}

// The vector operand (x; grad for the input gradient): m rows of 2 * pairs
// bf16 rearranged into blocks of kBlockRows rows, each [pair][kBlockRows]
// 32-bit (bf16, bf16) pairs, rows past m zero. One chunk of blocks at a time
// (kChunkBytes), so the copy never grows with m.
class PackedRows {
 public:
  int64_t m = 0, pairs = 0, blocks = 0, chunk_blocks = 0;

  PackedRows(const bf16_t* src, int64_t ld, int64_t m_, int64_t pairs_)
      : m(m_), pairs(pairs_), src_(src), ld_(ld), block_words_(kBlockRows * pairs_) {
    blocks = (m + kBlockRows - 1) / kBlockRows;
    chunk_blocks = std::min(blocks, std::max<int64_t>(1, kChunkBytes / (block_words_ * 4)));
    words_ = aligned_words(chunk_blocks * block_words_);
  }
  // Packs blocks [b0, b1) (at most chunk_blocks), replacing the last chunk.
  void pack(int64_t b0, int64_t b1) {
    first_ = b0;
    parallel_for(b0, b1, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) pack_block(b);
    });
  }
  const uint32_t* block(int64_t b) const { return words_.get() + (b - first_) * block_words_; }

 private:
  void pack_block(int64_t b) {
    uint32_t* dst = words_.get() + (b - first_) * block_words_;
    for (int r = 0; r < kBlockRows; ++r) {
      const int64_t row = b * kBlockRows + r;
      if (row >= m) {
        for (int64_t i = 0; i < pairs; ++i) dst[i * kBlockRows + r] = 0;
        continue;
      }
      const bf16_t* s = src_ + row * ld_;
      for (int64_t i = 0; i < pairs; ++i) std::memcpy(dst + i * kBlockRows + r, s + 2 * i, 4);
    }
  }

  const bf16_t* src_;
  int64_t ld_, block_words_, first_ = 0;
  AlignedWords words_;
};

// Where a register tile's results go: out (rows x cols, row stride ld) plus
// bias[col] when there is one.
struct OutMatrix {
  bf16_t* out;
  int64_t ld, rows, cols;
  const bf16_t* bias;
};

// t[c][16v + l] = sum_i block[i][16v + l] * w[c * c_stride + i * i_stride]
// over the pairs i: the first 16 * XV rows of a packed block against
// kTileCols broadcast columns. (The accumulators stay local: passed in by
// reference, GCC kept the XV = 1 set on the stack, stored every pair.)
template <int XV>
void tile_products(const uint32_t* xb, const uint32_t* w, int64_t c_stride, int64_t i_stride, int64_t pairs,
                   float (&t)[kTileCols][16 * XV]) {
  __m512 acc[kTileCols][XV];
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
      const uint32_t pair = w[c * c_stride + i * i_stride];
      const __m512bh wc = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 3
      for (int v = 0; v < XV; ++v) acc[c][v] = _mm512_dpbf16_ps(acc[c][v], xv[v], wc);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < kTileCols; ++c)
#pragma GCC unroll 3
    for (int v = 0; v < XV; ++v) _mm512_store_ps(&t[c][16 * v], acc[c][v]);
}

// out[m0 + r, c0 + c] = bf16(t[c][r] + bias) for the rows and columns that exist.
template <int XV>
void store_tile(const float (&t)[kTileCols][16 * XV], const OutMatrix& o, int64_t m0, int64_t c0) {
  const int cols = static_cast<int>(std::min<int64_t>(kTileCols, o.cols - c0));
  const int rows = static_cast<int>(std::min<int64_t>(16 * XV, o.rows - m0));
  float b[kTileCols] = {};
  if (o.bias)
    for (int c = 0; c < cols; ++c) b[c] = to_float(o.bias[c0 + c]);
  bf16_t* out = o.out + m0 * o.ld + c0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) out[r * o.ld + c] = from_float<bf16_t>(t[c][r] + b[c]);
}

// One register tile's broadcast columns (w, strides as tile_products) against
// blocks [b0, b1) of x, into out columns [c0, c0 + kTileCols). The last block
// may be short: 16 or 32 rows take fewer vectors.
void tile_against_blocks(const PackedRows& x, int64_t b0, int64_t b1, const uint32_t* w, int64_t c_stride,
                         int64_t i_stride, const OutMatrix& o, int64_t c0) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t m0 = b * kBlockRows, left = x.m - m0;
    auto run = [&](auto xv) {
      constexpr int XV = decltype(xv)::value;
      alignas(64) float t[kTileCols][16 * XV];
      tile_products<XV>(x.block(b), w, c_stride, i_stride, x.pairs, t);
      store_tile<XV>(t, o, m0, c0);
    };
    if (left > 32)
      run(std::integral_constant<int, 3>{});
    else if (left > 16)
      run(std::integral_constant<int, 2>{});
    else
      run(std::integral_constant<int, 1>{});
  }
}

// Columns [c0, c0 + 32) of weight rows, as 32 bf16 each rounded as
// dequantize(qw, bf16) rounds it; columns past k (int8) are zero.
class WeightSegment {
 public:
  WeightSegment(const WeightOnlyParams& p, int64_t c0)
      : p_(p), c0_(c0), groups_(p.k / p.group_size), g_(c0 / p.group_size),
        values_(_mm512_loadu_ps(code_values(p.format))) {
    const int64_t left = p.k - c0;
    lanes_ = left >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << left) - 1);
    // 4-bit: a 32-column half of a 64-column chunk (groups are whole halves).
    byte_offset_ = p.format == WeightFormat::kInt8 ? c0 : c0 / kNibbleChunk * 32;
  }

  // What row r reads: its codes, scale and zero point (4-bit: the group's).
  const uint8_t* codes(int64_t r) const { return p_.qweight + r * p_.qweight_row_stride + byte_offset_; }
  const float* scale(int64_t r) const { return p_.scales + r * groups_ + g_; }
  const float* zero(int64_t r) const { return p_.zeros ? p_.zeros + r * groups_ + g_ : nullptr; }

  __m512i row(int64_t r) const {
    const uint8_t* w = codes(r);
    if (p_.format == WeightFormat::kInt8) {
      const __m256i q = _mm256_maskz_loadu_epi8(lanes_, w);
      const __m512 s = _mm512_set1_ps(p_.scales[r]);
      const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), s);
      const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), s);
      return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    const __m512i idx = c0_ % kNibbleChunk == 0 ? _mm512_and_si512(bytes, _mm512_set1_epi16(0x000F))
                                                : _mm512_srli_epi16(bytes, 4);
    return _mm512_permutexvar_epi16(idx, scaled_code_table<bf16_t>(values_, *scale(r), zero(r)));
  }

 private:
  const WeightOnlyParams& p_;
  int64_t c0_, groups_, g_, byte_offset_;
  __mmask32 lanes_;
  __m512 values_;
};

// The input gradient's broadcast operand for columns [c0, c0 + kSlabCols):
// weight rows 2j and 2j + 1 as (W[2j][c], W[2j+1][c]) pairs, in tiles of 8
// columns, tile t at slab[(t * n/2 + j) * 8]. All n rows of kSlabCols
// columns at once: a 4-bit row's 64-byte line holds 128 columns, and the
// rows are a stride apart, so narrower slabs fetched each line again for
// every 32 columns (about 30% of the run time at 32).
void build_slab(const WeightOnlyParams& p, int64_t c0, uint32_t* slab) {
  constexpr int kSegments = kSlabCols / 32;
  static_assert(kSegments == 4, "seg below lists one WeightSegment per 32 columns of a slab");
  int segments = 0;  // 32-column segments that hold columns < k
  while (segments < kSegments && c0 + 32 * segments < p.k) ++segments;
  const WeightSegment seg[kSegments] = {{p, c0}, {p, c0 + 32}, {p, c0 + 64}, {p, c0 + 96}};
  // Lane 2i takes column i of row 2j (a), lane 2i + 1 column i of row 2j + 1 (b).
  const __m512i pair_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                           6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i pair_hi = _mm512_add_epi16(pair_lo, _mm512_set1_epi16(16));
  const int64_t pairs = p.n / 2;
  // Rows are a stride apart, which the hardware prefetchers do not follow:
  // their lines go to L2 kAhead rows ahead (written out here, see
  // TK_PREFETCH_HELPER): segments 0 and 2 start the one (4-bit) or two
  // (int8) 64-byte lines of a row's 128 columns.
  constexpr int64_t kAhead = 32;
  for (int64_t j = 0; j < pairs; ++j) {
    for (int64_t r = 2 * j + kAhead; r < std::min(2 * j + kAhead + 2, p.n); ++r) {
      for (int q = 0; q < segments; q += 2)
        _mm_prefetch(reinterpret_cast<const char*>(seg[q].codes(r)), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(seg[0].scale(r)), _MM_HINT_T1);
      if (p.zeros) _mm_prefetch(reinterpret_cast<const char*>(seg[0].zero(r)), _MM_HINT_T1);
    }
    for (int q = 0; q < segments; ++q) {
      const __m512i a = seg[q].row(2 * j), b = seg[q].row(2 * j + 1);
      const __m512i lo = _mm512_permutex2var_epi16(a, pair_lo, b);  // columns 0-15 of the segment
      const __m512i hi = _mm512_permutex2var_epi16(a, pair_hi, b);  // columns 16-31
      uint32_t* t = slab + (4 * q * pairs + j) * 8;
      _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm512_castsi512_si256(lo));
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + pairs * 8), _mm512_extracti64x4_epi64(lo, 1));
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + 2 * pairs * 8), _mm512_castsi512_si256(hi));
      _mm256_store_si256(reinterpret_cast<__m256i*>(t + 3 * pairs * 8), _mm512_extracti64x4_epi64(hi, 1));
    }
  }
}

}  // namespace

void weight_only_gemm(const WeightOnlyParams& p) {
  if (p.dtype != DType::kBFloat16 || p.k % 2 != 0)
    throw std::invalid_argument("weight_only_gemm: needs bf16 x and an even k");
  PackedRows x(static_cast<const bf16_t*>(p.x), p.x_row_stride, p.m, p.k / 2);
  const OutMatrix o{static_cast<bf16_t*>(p.out), p.out_row_stride, p.m, p.n, static_cast<const bf16_t*>(p.bias)};
  const int64_t w_ld = x.pairs + kRowPadPairs;
  for (int64_t b0 = 0; b0 < x.blocks; b0 += x.chunk_blocks) {
    const int64_t b1 = std::min(x.blocks, b0 + x.chunk_blocks);
    x.pack(b0, b1);
    parallel_for(0, (p.n + kStripe - 1) / kStripe, 1, [&](int64_t lo, int64_t hi) {
      AlignedWords w = aligned_words(kTileCols * w_ld);
      for (int64_t n0 = lo * kStripe; n0 < std::min(p.n, hi * kStripe); n0 += kTileCols) {
        const int64_t rows = std::min<int64_t>(kTileCols, p.n - n0);
        weight_only_dequantize_rows(p, n0, rows, w.get(), w_ld * 2);
        if (rows < kTileCols) std::memset(w.get() + rows * w_ld, 0, (kTileCols - rows) * w_ld * 4);
        tile_against_blocks(x, b0, b1, w.get(), w_ld, 1, o, n0);
      }
    });
  }
}

void weight_only_gemm_grad(const WeightOnlyParams& p) {
  if (p.dtype != DType::kBFloat16 || p.n % 2 != 0)
    throw std::invalid_argument("weight_only_gemm_grad: needs bf16 grad and an even out_features");
  PackedRows g(static_cast<const bf16_t*>(p.x), p.x_row_stride, p.m, p.n / 2);
  const OutMatrix o{static_cast<bf16_t*>(p.out), p.out_row_stride, p.m, p.k, nullptr};
  for (int64_t b0 = 0; b0 < g.blocks; b0 += g.chunk_blocks) {
    const int64_t b1 = std::min(g.blocks, b0 + g.chunk_blocks);
    g.pack(b0, b1);
    parallel_for(0, (p.k + kSlabCols - 1) / kSlabCols, 1, [&](int64_t lo, int64_t hi) {
      AlignedWords slab = aligned_words(kSlabCols * g.pairs);
      for (int64_t s = lo; s < hi; ++s) {
        const int64_t c0 = s * kSlabCols;
        build_slab(p, c0, slab.get());
        for (int64_t t = 0; t < kSlabCols / kTileCols && c0 + t * kTileCols < p.k; ++t)
          tile_against_blocks(g, b0, b1, slab.get() + t * g.pairs * kTileCols, 1, kTileCols, o, c0 + t * kTileCols);
      }
    });
  }
}

#else

void weight_only_gemm(const WeightOnlyParams&) {
  throw std::logic_error("weight_only_gemm: this build of the kernel has no AVX512_BF16");
}
void weight_only_gemm_grad(const WeightOnlyParams&) {
  throw std::logic_error("weight_only_gemm_grad: this build of the kernel has no AVX512_BF16");
}

#endif

}  // namespace TK_CPU_NS
}  // namespace torchkiln
