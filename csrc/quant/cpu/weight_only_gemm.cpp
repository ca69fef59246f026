// Weight-only quantised matmul for many rows of x (prefill), and its input
// gradient, on AVX-512: GEMMs whose weight operand is dequantised a few rows
// (or columns) at a time, never as a whole. bf16 x multiplies in bf16 dot
// products (Bf16Pairs, described first; AVX512_BF16 only); fp16 and fp32 x
// in fp32 FMAs (Fp32Values, any AVX-512 CPU: also Skylake and Ice Lake)
// through the same loops, with 32-bit words holding one fp32 value where the
// bf16 kind holds a pair.
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
// tile (8 rows x k: 176 KiB at k = 11008 in bf16, 352 in fp32) and runs it
// against every block of the chunk. x streams from L3 (3 loads per 24
// products, 8 bytes a cycle); each further chunk decodes the weight again.
//
// The input gradient grad @ W (weight_only_gemm_grad; QLoRA's backward)
// sums over W's rows, so its broadcast pairs are (W[2j][c], W[2j+1][c]):
// two weight rows interleaved by one `vpermt2w` per 16 columns. grad is the
// packed operand. A thread's unit is a slab of 128 columns of W over all its
// rows (one 64-byte line of each 4-bit row; narrower slabs fetched every
// line again per 32 columns), built once and run 8 columns at a time
// against every block of grad. Zen 4, M=256: 1.4-1.7x the dequantised
// weight + ATen GEMM it replaces, 0.96-1.03x a dense bf16 `grad @ W`.
//
// The fp32 kind: 24 FMAs per k, one a cycle on Zen 4 (its 512-bit FMA takes
// both 256-bit pipes), so half the bf16 kind's peak. Zen 4, M=256, fp16 or
// fp32 x: 205-220 GFLOP/s forward (1.2-1.4x the dense tiles + MKL SGEMM it
// replaces, 1.3-1.5x F.linear on the dense fp32 weight), 180-210 for the
// input gradient (1.6-1.9x the dense route). Weights are dequantised to fp32
// exactly as dequantize(qw, fp32) computes them.
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

#if defined(__AVX512F__)
namespace {

constexpr int kTileCols = 8;      // broadcast operands (output columns) per register tile
constexpr int kBlockRows = 48;    // rows of the vector operand per packed block (3 vectors of 16)
constexpr int64_t kStripe = 32;   // columns of out per unit of thread work (one 64-byte line of bf16)
constexpr int64_t kSlabCols = 128;  // input-gradient columns dequantised at once (build_slab)
constexpr int64_t kSumWords = 256;  // words summed in registers before adding to the tile's total
constexpr int64_t kChunkBytes = int64_t{8} << 20;  // packed rows per pass over the weight
// Dequantised rows are this many words longer than x's, so the 8 rows of a
// tile do not all start on the same L1 set at k a multiple of 2048.
constexpr int64_t kRowPadWords = 16;

struct AlignedFree {
  void operator()(uint32_t* ptr) const { ::operator delete[](ptr, std::align_val_t{64}); }
};
using AlignedWords = std::unique_ptr<uint32_t[], AlignedFree>;
AlignedWords aligned_words(int64_t count) {
  return AlignedWords(static_cast<uint32_t*>(::operator new[](count * sizeof(uint32_t), std::align_val_t{64})));
}

// The vector operand (x; grad for the input gradient): m rows of `words`
// 32-bit words each, rearranged into blocks of kBlockRows rows, each
// [word][kBlockRows], rows past m zero. A word is a (bf16, bf16) pair of
// bf16 rows (Bf16Pairs) or one fp32 value (Fp32Values; fp16 rows are
// widened, exactly). One chunk of blocks at a time (kChunkBytes), so the
// copy never grows with m.
class PackedRows {
 public:
  int64_t m = 0, words = 0, blocks = 0, chunk_blocks = 0;

  PackedRows(const void* src, DType dtype, int64_t ld, int64_t m_, int64_t words_per_row)
      : m(m_), words(words_per_row), src_(static_cast<const char*>(src)), dtype_(dtype), ld_(ld),
        block_words_(kBlockRows * words_per_row) {
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
    const int64_t elem = dtype_ == DType::kFloat32 ? 4 : 2;
    for (int r = 0; r < kBlockRows; ++r) {
      const int64_t row = b * kBlockRows + r;
      if (row >= m) {
        for (int64_t i = 0; i < words; ++i) dst[i * kBlockRows + r] = 0;
        continue;
      }
      const char* s = src_ + row * ld_ * elem;
      if (dtype_ == DType::kFloat16) {  // one fp16 per word, widened
        const fp16_t* h = reinterpret_cast<const fp16_t*>(s);
        for (int64_t i = 0; i < words; ++i) {
          const float f = to_float(h[i]);
          std::memcpy(dst + i * kBlockRows + r, &f, 4);
        }
      } else {  // a bf16 pair or an fp32 value: the row's next 4 bytes
        for (int64_t i = 0; i < words; ++i) std::memcpy(dst + i * kBlockRows + r, s + 4 * i, 4);
      }
    }
  }

  const char* src_;
  DType dtype_;
  int64_t ld_, block_words_, first_ = 0;
  AlignedWords words_;
};

// How a word of the packed operand multiplies a broadcast word: bf16 pairs
// with `vdpbf16ps` (2 columns of k per word), fp32 values with FMAs (1).
// Zen 4 retires one 512-bit instruction of either kind a cycle, so the bf16
// GEMM has twice the fp32 one's peak.
#if defined(__AVX512BF16__)
struct Bf16Pairs {
  static constexpr int kPerWord = 2;
  static constexpr DType kWeightDType = DType::kBFloat16;
  static __m512 madd(__m512 acc, __m512i x, uint32_t w) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(x),
                            reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(w))));
  }
};
#endif
struct Fp32Values {
  static constexpr int kPerWord = 1;
  static constexpr DType kWeightDType = DType::kFloat32;
  static __m512 madd(__m512 acc, __m512i x, uint32_t w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(w))), acc);
  }
};

// Where a register tile's results go: out (rows x cols, row stride ld) plus
// bias[col] when there is one.
struct OutMatrix {
  void* out;
  int64_t ld, rows, cols;
  const void* bias;
  DType dtype;  // of out and bias
};

// t[c][16v + l] = sum_i block[i][16v + l] * w[c * c_stride + i * i_stride]
// over the words i (Kind::madd), summed kSumWords words at a time and the
// partial sums added: a long sequential fp32 sum (k = 11008) had 10x the
// error of ATen's blocked SGEMM. (The accumulators stay local: passed in by
// reference, GCC kept the XV = 1 set on the stack, stored every pair.)
template <class Kind, int XV>
void tile_products(const uint32_t* xb, const uint32_t* w, int64_t c_stride, int64_t i_stride, int64_t words,
                   float (&t)[kTileCols][16 * XV]) {
  for (int64_t i0 = 0; i0 < words; i0 += kSumWords) {
    __m512 acc[kTileCols][XV];
#pragma GCC unroll 8
    for (int c = 0; c < kTileCols; ++c)
#pragma GCC unroll 3
      for (int v = 0; v < XV; ++v) acc[c][v] = _mm512_setzero_ps();
    for (int64_t i = i0; i < std::min(words, i0 + kSumWords); ++i) {
      __m512i xv[XV];
#pragma GCC unroll 3
      for (int v = 0; v < XV; ++v) xv[v] = _mm512_loadu_si512(xb + i * kBlockRows + 16 * v);
#pragma GCC unroll 8
      for (int c = 0; c < kTileCols; ++c) {
        const uint32_t wc = w[c * c_stride + i * i_stride];
#pragma GCC unroll 3
        for (int v = 0; v < XV; ++v) acc[c][v] = Kind::madd(acc[c][v], xv[v], wc);
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < kTileCols; ++c)
#pragma GCC unroll 3
      for (int v = 0; v < XV; ++v) {
        float* dst = &t[c][16 * v];
        _mm512_store_ps(dst, i0 == 0 ? acc[c][v] : _mm512_add_ps(_mm512_load_ps(dst), acc[c][v]));
      }
  }
}

// out[m0 + r, c0 + c] = t[c][r] + bias[c0 + c], rounded once to out's
// dtype, for the rows and columns that exist.
template <int XV>
void store_tile(const float (&t)[kTileCols][16 * XV], const OutMatrix& o, int64_t m0, int64_t c0) {
  const int cols = static_cast<int>(std::min<int64_t>(kTileCols, o.cols - c0));
  const int rows = static_cast<int>(std::min<int64_t>(16 * XV, o.rows - m0));
  dispatch_dtype(o.dtype, [&](auto tag) {
    using T = decltype(tag);
    float b[kTileCols] = {};
    if (o.bias)
      for (int c = 0; c < cols; ++c) b[c] = to_float(static_cast<const T*>(o.bias)[c0 + c]);
    T* out = static_cast<T*>(o.out) + m0 * o.ld + c0;
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) out[r * o.ld + c] = from_float<T>(t[c][r] + b[c]);
  });
}

// One register tile's broadcast columns (w, strides as tile_products) against
// blocks [b0, b1) of x, into out columns [c0, c0 + kTileCols). The last block
// may be short: 16 or 32 rows take fewer vectors.
template <class Kind>
void tile_against_blocks(const PackedRows& x, int64_t b0, int64_t b1, const uint32_t* w, int64_t c_stride,
                         int64_t i_stride, const OutMatrix& o, int64_t c0) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t m0 = b * kBlockRows, left = x.m - m0;
    auto run = [&](auto xv) {
      constexpr int XV = decltype(xv)::value;
      alignas(64) float t[kTileCols][16 * XV];
      tile_products<Kind, XV>(x.block(b), w, c_stride, i_stride, x.words, t);
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

// Columns [c0, c0 + 32) of weight rows, as 32 bf16 or 32 fp32 each rounded
// as dequantize(qw, bf16 / fp32) rounds it; columns past k (int8) are zero.
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
  const uint8_t* zero(int64_t r) const { return p_.zeros ? p_.zeros + r * groups_ + g_ : nullptr; }

#if defined(__AVX512BF16__)
  // bf16: all 32 columns in one vector.
  __m512i row_bf16(int64_t r) const {
    if (p_.format == WeightFormat::kInt8) {
      __m512 lo, hi;
      row_fp32(r, lo, hi);
      return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes(r))));
    return _mm512_permutexvar_epi16(nibbles(bytes), scaled_code_table<bf16_t>(values_, *scale(r), zero(r)));
  }
#endif
  // fp32: columns 0-15 in lo, 16-31 in hi.
  void row_fp32(int64_t r, __m512& lo, __m512& hi) const {
    const uint8_t* w = codes(r);
    if (p_.format == WeightFormat::kInt8) {
      const __m256i q = _mm256_maskz_loadu_epi8(lanes_, w);
      const __m512 s = _mm512_set1_ps(p_.scales[r]);
      lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), s);
      hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), s);
      return;
    }
    // The group's 16 values as (value - zero) * scale: dequantize's fp32 formula.
    const uint8_t* z = zero(r);
    const __m512 v = z ? _mm512_sub_ps(values_, _mm512_set1_ps(static_cast<float>(*z))) : values_;
    const __m512 table = _mm512_mul_ps(v, _mm512_set1_ps(*scale(r)));
    const __m128i* b = reinterpret_cast<const __m128i*>(w);
    lo = _mm512_permutexvar_ps(nibbles(_mm512_cvtepu8_epi32(_mm_loadu_si128(b))), table);
    hi = _mm512_permutexvar_ps(nibbles(_mm512_cvtepu8_epi32(_mm_loadu_si128(b + 1))), table);
  }

 private:
  // The segment's codes from 16- or 32-bit lanes that hold one byte each: a
  // low half of a 64-column chunk is the low nibbles, a high half the high
  // ones. (A 32-bit shift moves no set bit across a 16-bit lane's low 4.)
  __m512i nibbles(__m512i bytes) const {
    const __m512i shifted = c0_ % kNibbleChunk == 0 ? bytes : _mm512_srli_epi32(bytes, 4);
    return _mm512_and_si512(shifted, _mm512_set1_epi16(0x000F));
  }

  const WeightOnlyParams& p_;
  int64_t c0_, groups_, g_, byte_offset_;
  __mmask32 lanes_;
  __m512 values_;
};

// The input gradient's broadcast operand for columns [c0, c0 + kSlabCols), in
// tiles of 8 columns, each tile [word j][8 columns]: tile t at
// slab[(t * words + j) * 8] with words = n / Kind::kPerWord. Bf16Pairs: word
// j of a column is (W[2j][c], W[2j+1][c]); Fp32Values: W[j][c]. All n rows
// of kSlabCols columns at once: a 4-bit row's 64-byte line holds 128
// columns, and the rows are a stride apart, so narrower slabs fetched each
// line again for every 32 columns (about 30% of the run time at 32).
template <class Kind>
void build_slab(const WeightOnlyParams& p, int64_t c0, uint32_t* slab) {
  constexpr int kSegments = kSlabCols / 32;
  static_assert(kSegments == 4, "seg below lists one WeightSegment per 32 columns of a slab");
  int segments = 0;  // 32-column segments that hold columns < k
  while (segments < kSegments && c0 + 32 * segments < p.k) ++segments;
  const WeightSegment seg[kSegments] = {{p, c0}, {p, c0 + 32}, {p, c0 + 64}, {p, c0 + 96}};
  const int64_t words = p.n / Kind::kPerWord;
  // Stores columns 0-15 (lo) and 16-31 (hi) of segment q's word j, 32 bits a column.
  auto store = [&](int q, int64_t j, __m512i lo, __m512i hi) {
    uint32_t* t = slab + (4 * q * words + j) * 8;
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm512_castsi512_si256(lo));
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + words * 8), _mm512_extracti64x4_epi64(lo, 1));
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + 2 * words * 8), _mm512_castsi512_si256(hi));
    _mm256_store_si256(reinterpret_cast<__m256i*>(t + 3 * words * 8), _mm512_extracti64x4_epi64(hi, 1));
  };
  // Rows are a stride apart, which the hardware prefetchers do not follow:
  // their lines go to L2 kAhead rows ahead (written out here, see
  // TK_PREFETCH_HELPER): segments 0 and 2 start the one (4-bit) or two
  // (int8) 64-byte lines of a row's 128 columns.
  constexpr int64_t kAhead = 32;
  for (int64_t j = 0; j < words; ++j) {
    const int64_t row = j * Kind::kPerWord;
    for (int64_t r = row + kAhead; r < std::min(row + kAhead + Kind::kPerWord, p.n); ++r) {
      for (int q = 0; q < segments; q += 2)
        _mm_prefetch(reinterpret_cast<const char*>(seg[q].codes(r)), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(seg[0].scale(r)), _MM_HINT_T1);
      if (p.zeros) _mm_prefetch(reinterpret_cast<const char*>(seg[0].zero(r)), _MM_HINT_T1);
    }
    for (int q = 0; q < segments; ++q) {
#if defined(__AVX512BF16__)
      if constexpr (Kind::kPerWord == 2) {
        // Lane 2i takes column i of row 2j (a), lane 2i + 1 column i of row 2j + 1 (b).
        const __m512i pair_lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39,
                                                 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i pair_hi = _mm512_add_epi16(pair_lo, _mm512_set1_epi16(16));
        const __m512i a = seg[q].row_bf16(row), b = seg[q].row_bf16(row + 1);
        store(q, j, _mm512_permutex2var_epi16(a, pair_lo, b), _mm512_permutex2var_epi16(a, pair_hi, b));
        continue;
      }
#endif
      __m512 lo, hi;
      seg[q].row_fp32(row, lo, hi);
      store(q, j, _mm512_castps_si512(lo), _mm512_castps_si512(hi));
    }
  }
}

// out = x @ W^T + bias, W dequantised 8 rows at a time to Kind's weight dtype.
template <class Kind>
void gemm(const WeightOnlyParams& p) {
  PackedRows x(p.x, p.dtype, p.x_row_stride, p.m, p.k / Kind::kPerWord);
  const OutMatrix o{p.out, p.out_row_stride, p.m, p.n, p.bias, p.dtype};
  WeightOnlyParams dq = p;  // the row decoder writes Kind's weight dtype
  dq.dtype = Kind::kWeightDType;
  const int64_t w_ld = x.words + kRowPadWords;
  for (int64_t b0 = 0; b0 < x.blocks; b0 += x.chunk_blocks) {
    const int64_t b1 = std::min(x.blocks, b0 + x.chunk_blocks);
    x.pack(b0, b1);
    parallel_for(0, (p.n + kStripe - 1) / kStripe, 1, [&](int64_t lo, int64_t hi) {
      AlignedWords w = aligned_words(kTileCols * w_ld);
      for (int64_t n0 = lo * kStripe; n0 < std::min(p.n, hi * kStripe); n0 += kTileCols) {
        const int64_t rows = std::min<int64_t>(kTileCols, p.n - n0);
        weight_only_dequantize_rows(dq, n0, rows, w.get(), w_ld * Kind::kPerWord);
        if (rows < kTileCols) std::memset(w.get() + rows * w_ld, 0, (kTileCols - rows) * w_ld * 4);
        tile_against_blocks<Kind>(x, b0, b1, w.get(), w_ld, 1, o, n0);
      }
    });
  }
}

// out = grad @ W (x holds grad), W dequantised a slab of columns at a time.
template <class Kind>
void gemm_grad(const WeightOnlyParams& p) {
  PackedRows g(p.x, p.dtype, p.x_row_stride, p.m, p.n / Kind::kPerWord);
  const OutMatrix o{p.out, p.out_row_stride, p.m, p.k, nullptr, p.dtype};
  for (int64_t b0 = 0; b0 < g.blocks; b0 += g.chunk_blocks) {
    const int64_t b1 = std::min(g.blocks, b0 + g.chunk_blocks);
    g.pack(b0, b1);
    parallel_for(0, (p.k + kSlabCols - 1) / kSlabCols, 1, [&](int64_t lo, int64_t hi) {
      AlignedWords slab = aligned_words(kSlabCols * g.words);
      for (int64_t s = lo; s < hi; ++s) {
        const int64_t c0 = s * kSlabCols;
        build_slab<Kind>(p, c0, slab.get());
        for (int64_t t = 0; t < kSlabCols / kTileCols && c0 + t * kTileCols < p.k; ++t)
          tile_against_blocks<Kind>(g, b0, b1, slab.get() + t * g.words * kTileCols, 1, kTileCols, o,
                                    c0 + t * kTileCols);
      }
    });
  }
}

}  // namespace

void weight_only_gemm(const WeightOnlyParams& p) {
  if (p.dtype != DType::kBFloat16) return gemm<Fp32Values>(p);
#if defined(__AVX512BF16__)
  if (p.k % 2 != 0) throw std::invalid_argument("weight_only_gemm: bf16 x needs an even k");
  gemm<Bf16Pairs>(p);
#else
  throw std::invalid_argument("weight_only_gemm: bf16 x needs AVX512_BF16");
#endif
}

void weight_only_gemm_grad(const WeightOnlyParams& p) {
  if (p.dtype != DType::kBFloat16) return gemm_grad<Fp32Values>(p);
#if defined(__AVX512BF16__)
  if (p.n % 2 != 0) throw std::invalid_argument("weight_only_gemm_grad: bf16 grad needs an even out_features");
  gemm_grad<Bf16Pairs>(p);
#else
  throw std::invalid_argument("weight_only_gemm_grad: bf16 grad needs AVX512_BF16");
#endif
}

#else

void weight_only_gemm(const WeightOnlyParams&) {
  throw std::logic_error("weight_only_gemm: this build of the kernel has no AVX-512");
}
void weight_only_gemm_grad(const WeightOnlyParams&) {
  throw std::logic_error("weight_only_gemm_grad: this build of the kernel has no AVX-512");
}

#endif

}  // namespace TK_CPU_NS
}  // namespace torchkiln
