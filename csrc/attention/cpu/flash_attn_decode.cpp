// flash_attn forward for a few queries per sequence, CPU (compiled once per
// ISA): decode passes of the paged decode kernel over the keys in place.
// With one query row, widening and transposing every key (the general
// kernel's first step) costs far more than the attention; the decode kernel
// reads each K/V row once, where it lies, for every query head of its group.
#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "attention/cpu/attn_common.h"
#include "paged/paged_attention.h"

namespace torchkiln {
namespace TK_CPU_NS {
namespace attn {

// Up to this many queries per sequence, the forward runs as that many
// decode passes (fixed layout), each reading K/V once more; the general path
// instead widens the keys once per (sequence, kv head) and then costs little
// per row. Measured with bf16, 2048 keys, head_dim 128 and the same K/V
// bytes: a decode pass 5.4-6 ms; the general path 18-28 ms for 1-8 rows with
// 32/8 heads (crossing near 5 rows), 18-20 ms with 32/32 (near 3).
namespace {
int64_t max_decode_rows(const FlashAttnParams& p) { return p.heads > p.heads_k ? 4 : 2; }
}  // namespace

// Runs the forward through the paged decode kernel when every sequence has
// at most max_decode_rows queries (varlen: exactly one) and the operands fit
// its layout (K and V strided alike, ALiBi slopes per head); returns false
// otherwise. Query row i of a sequence is a decode at its own last visible
// key: it sees keys [i + sk - sq - left, i + sk - sq + right] (causal is
// right = 0), so the pass runs with seq_len = the upper end + 1 and the left
// window measured from there. ALiBi's distances are measured from the
// query's diagonal, which is that last key only when right = 0 (or for the
// last row without a right window).
bool forward_as_decode_passes(const FlashAttnParams& p) {
  const int64_t B = p.batch, H = p.heads, D = p.head_dim, sq = p.seqlen_q, sk = p.seqlen_k;
  const bool varlen = p.cu_seqlens_q != nullptr;
  if (varlen) {
    for (int64_t b = 0; b < B; ++b)
      if (p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] != 1) return false;
  } else if (sq < 1 || sq > max_decode_rows(p)) {
    return false;
  }
  const int64_t rows = varlen ? 1 : sq;
  if (p.alibi_slopes != nullptr && (p.alibi_batch_stride != 0 || (rows > 1 && p.window_right != 0))) return false;
  if (p.k.batch_stride != p.v.batch_stride || p.k.row_stride != p.v.row_stride || p.k.head_stride != p.v.head_stride)
    return false;

  PagedAttnParams d;
  d.q_seq_stride = varlen ? p.q.row_stride : p.q.batch_stride;
  d.q_head_stride = p.q.head_stride;
  d.key_cache = p.k.ptr;
  d.value_cache = p.v.ptr;
  d.cache.heads_k = p.heads_k;
  d.cache.head_dim = D;
  d.cache.pos_stride = p.k.row_stride;
  d.cache.head_stride = p.k.head_stride;
  std::vector<int32_t> lens(static_cast<size_t>(B)), table;
  for (int64_t b = 0; b < B; ++b) lens[b] = static_cast<int32_t>(varlen ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : sk);
  if (p.block_table != nullptr) {  // already paged
    d.block_table = p.block_table;
    d.block_table_stride = p.block_table_stride;
    d.cache.block_size = p.block_size;
    d.cache.block_stride = p.k.batch_stride;
  } else {
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
  d.num_seqs = B;
  d.heads = H;
  d.scale = p.scale;
  d.softcap = p.softcap;
  d.alibi_slopes = p.alibi_slopes;
  d.dtype = p.dtype;

  // The decode kernel writes out as (sequence, head, D) and lse as
  // (sequence, head): straight into one-row outputs laid out so, else into
  // scratch copied to row i of out and lse.
  const int64_t elem = p.dtype == DType::kFloat32 ? 4 : 2;
  const bool direct_out = rows == 1 && p.out.head_stride == D && (varlen ? p.out.row_stride : p.out.batch_stride) == H * D;
  const bool direct_lse = rows == 1 && !varlen && p.lse_batch_stride == H && p.lse_head_stride == 1;
  std::vector<unsigned char> out_rows(direct_out ? 0 : static_cast<size_t>(B * H * D * elem));
  std::vector<float> lse_rows(direct_lse ? 0 : static_cast<size_t>(B * H));
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t diag = i + sk - sq;  // fixed layout; varlen rows are one query at each sequence's end
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len_b = varlen ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : sk;
      const int64_t last = varlen ? len_b - 1 : (p.window_right >= 0 ? std::min(sk - 1, diag + p.window_right) : sk - 1);
      lens[b] = static_cast<int32_t>(std::max<int64_t>(0, last + 1));
    }
    // Left window from the pass's last key: rows of one call share it (varlen
    // rows are at their own ends, so it is the caller's).
    d.window_left = p.window_left < 0 || varlen ? p.window_left : (lens[0] - 1) - (diag - p.window_left);
    d.max_seq_len = *std::max_element(lens.begin(), lens.end());
    d.q = static_cast<const unsigned char*>(p.q.ptr) + i * p.q.row_stride * elem;
    d.out = direct_out ? p.out.ptr : out_rows.data();
    d.lse = direct_lse ? p.lse : lse_rows.data();
    paged_attention(d);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t tok = varlen ? b : i;  // varlen: sequence b's one query is packed token b
        if (!direct_out) {
          const int64_t at = (varlen ? 0 : b * p.out.batch_stride) + tok * p.out.row_stride + h * p.out.head_stride;
          std::memcpy(static_cast<unsigned char*>(p.out.ptr) + at * elem, out_rows.data() + (b * H + h) * D * elem,
                      static_cast<size_t>(D * elem));
        }
        if (!direct_lse)
          p.lse[varlen ? h * p.lse_head_stride + b : b * p.lse_batch_stride + h * p.lse_head_stride + i] =
              lse_rows[b * H + h];
      }
  }
  return true;
}

}  // namespace attn
}  // namespace TK_CPU_NS
}  // namespace torchkiln
