// flash_attn forward for a few queries per sequence, CPU (compiled once per
// ISA): the paged decode kernel over the keys in place. With few query rows,
// widening and transposing every key (the general kernel's first step)
// costs far more than the attention; the decode kernel reads each K/V row
// once, where it lies, for every query row and head of its group.
#include <algorithm>
#include <climits>
#include <vector>

#include "attention/cpu/attn_common.h"
#include "attention/decode_params.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace attn {

// The paged decode kernel takes a sequence's query rows as more query heads
// of each GQA group: it reads every K/V row once, where it lies, and then
// costs about the rows' FLOPs, at a lower rate than the general path's
// GEMM-like tiles. The general path first widens and transposes the keys of
// each (sequence, kv head), a fixed cost that pays from some number of query
// vectors (rows x query heads of a group) per kv head on. Measured, 2048
// keys, head_dim 128, causal, ms of decode kernel / general path, with
// 16 x 32/8 heads (GQA) and 4 x 32/32 (MHA):
//   bf16 (scores and P V in bf16 dot products from 8 vectors on, the
//         scores as a GEMM from 24): 64 vectors GQA 30.1-32.3 / 35.1-35.6,
//         MHA 29.7-32.0 / 34.6-35.5; 80 GQA 35.5-38.5 / 40.0-43.4; 96 GQA
//         41.6-42.0 / 45.5-50.2, MHA 47.4-47.5 / 50.1; 128 GQA 53.0-56.1 /
//         61.0-63.6. (Before the GEMM scores the two met at 64 vectors:
//         GQA 34.6-34.7 / 35.2-35.5.)
//   fp32, 32 vectors: GQA 29.2 / 44.7, MHA 28.8 / 47.4; 64: GQA 53.3 /
//         66.6, MHA 61.2 / 67.8.
//   fp16, 32 vectors: GQA 26.9 / 43.5, MHA 27.5 / 43.7; 64: GQA 52.3 /
//         63.7, MHA 56.2 / 61.4.
// Without AVX512_BF16 (AVX2, plain AVX-512) the decode kernel scores bf16
// in fp32, and its bound stays where it was measured before the GEMM scores:
// forced AVX2 on the Zen 4 with a bound of 128, 16 rows GQA 57.6-58.8 ->
// 60.9-62.4 ms, 32 rows 103.5-104.8 -> 135.3-136.3, MHA 64 rows 54.1-56.8 ->
// 87.6-94.1.
//
// Shorter contexts move the bound down: the widening is then cheap against
// the decode kernel's fixed costs (its task setup, partials) and, under a
// causal mask, its scoring of every key for every row; and from 24 vectors
// on (with AVX512_BF16) the decode kernel transposes each chunk of keys for
// its GEMM scores much as the general path widens them. Measured with the
// kernel's tasks split over kv heads, causal, ms of decode kernel / general
// path, 32/8 heads, 1 or 8 or 32 sequences:
//   bf16, 12 and 20 vectors, 5 to 128 keys: 0.49-0.92 everywhere (e.g. 20
//         vectors, 8 x 16 keys 0.164 / 0.267, 1 x 128 keys 0.064 / 0.079);
//         32 vectors: 1 x 16 keys 0.047 / 0.043, 8 x 64 keys 0.494 /
//         0.405, 1 x 256 keys 0.141 / 0.138, 1 x 1024 keys 0.461 / 0.512;
//         64 vectors: 8 x 128 keys 1.206 / 1.065, 1 x 256 keys 0.251 /
//         0.234, 1 x 1024 keys 0.831 / 0.885; 128 vectors, 1 x 1024 keys
//         1.596 / 1.618, 4096 keys 6.50 / 7.55.
//   fp32, 12 and 20 vectors, 5 to 512 keys: 0.48-0.84; 32 vectors: 8 x 32
//         keys 0.621 / 0.518, 8 x 128 keys 1.136 / 1.245; 64 vectors: 8 x
//         128 keys 2.447 / 2.103, 8 x 512 keys 7.822 / 7.834.
// Hence the decode kernel below 24 vectors, and from there on only with at
// least 8 keys per vector, or at most 16 keys in all: since the decode
// kernel's single-split tasks write their output directly, a prompt that
// short runs faster there (Zen 4, causal, in-process A/B of the two
// routes, 100 alternated calls: bf16 32/8 heads, 1 x 12 keys 1.21x, 4 x 16
// 1.20x, 8 x 12 1.30x, 64/8 heads 1 x 4 1.22x; fp32 0.95-1.06x; at 32
// keys bf16 0.84x).
namespace {
constexpr int64_t kFewVectors = 24;
constexpr int64_t kMinKeysPerVector = 8;
constexpr int64_t kShortPromptKeys = 16;
#if defined(__AVX512BF16__)
constexpr int64_t kMaxBf16Vectors = 128;
#else
constexpr int64_t kMaxBf16Vectors = 48;
#endif
int64_t max_vectors_per_kv_head(DType dtype) { return dtype == DType::kBFloat16 ? kMaxBf16Vectors : 64; }
}  // namespace

// Runs the forward through the paged decode kernel when every sequence has
// few enough queries and K and V are strided alike (the kernel
// reads both through one layout); returns false otherwise. The kernel takes
// flash_attn's masks as they are: row i of a sequence with sq queries and
// sk keys is its query at diagonal i + sk - sq.
bool forward_in_decode_kernel(const FlashAttnParams& p) {
  const int64_t B = p.batch, H = p.heads, sk = p.seqlen_k;
  const bool varlen = p.cu_seqlens_q != nullptr;
  int64_t rows = 0;
  if (varlen) {
    for (int64_t b = 0; b < B; ++b) rows = std::max<int64_t>(rows, p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b]);
  } else {
    rows = p.seqlen_q;
  }
  const int64_t vectors = rows * (H / p.heads_k);  // query vectors per kv head
  if (B < 1 || rows < 1 || vectors > max_vectors_per_kv_head(p.dtype)) return false;
  if (vectors >= kFewVectors && sk < kMinKeysPerVector * vectors && sk > kShortPromptKeys) return false;
  if (p.k.batch_stride != p.v.batch_stride || p.k.row_stride != p.v.row_stride || p.k.head_stride != p.v.head_stride)
    return false;

  PagedAttnParams d = decode_params_of(p);
  d.max_rows = rows;
  std::vector<int32_t> lens(static_cast<size_t>(B)), table;
  for (int64_t b = 0; b < B; ++b) lens[b] = static_cast<int32_t>(varlen ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : sk);
  if (p.block_table == nullptr) {
    // Blocks of one token (so the kernel can still split a long context
    // over threads): sequence b's key j is token first(b) + j of k and v.
    if (!varlen && (p.k.row_stride == 0 || p.k.batch_stride % p.k.row_stride != 0 ||
                    (B - 1) * (p.k.batch_stride / p.k.row_stride) + sk > INT32_MAX))
      return false;
    const int64_t width = std::max<int64_t>(p.seqlen_k, 1);
    table.resize(static_cast<size_t>(B * width));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t first = varlen ? p.cu_seqlens_k[b] : b * (p.k.batch_stride / p.k.row_stride);
      for (int64_t j = 0; j < lens[b]; ++j) table[b * width + j] = static_cast<int32_t>(first + j);
    }
    d.block_table = table.data();
    d.block_table_stride = width;
    d.cache.block_size = 1;
    d.cache.block_stride = p.k.row_stride;
  }
  d.seq_lens = lens.data();
  d.max_seq_len = *std::max_element(lens.begin(), lens.end());
  paged_attention(d);
  return true;
}

}  // namespace attn
}  // namespace TK_CPU_NS
}  // namespace torchkiln
