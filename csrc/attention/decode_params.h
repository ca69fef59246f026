// flash_attn's forward as the paged decode kernel (paged/paged_attention.h)
// takes it when each sequence has few queries: the fields the CPU and CUDA
// routes fill alike. A sequence's query rows keep flash_attn's bottom-right
// diagonal; paged keys keep their block table. The caller says how keys in
// place are found (CPU: a table of one-token blocks; CUDA: kv_seq_stride and
// k_start), and sets max_rows, seq_lens and the CUDA plan.
#pragma once
#include "attention/flash_attn.h"
#include "paged/paged_attention.h"

namespace torchkiln {

inline PagedAttnParams decode_params_of(const FlashAttnParams& p) {
  const bool varlen = p.cu_seqlens_q != nullptr;  // packed: no per-sequence strides
  PagedAttnParams d;
  d.q = p.q.ptr;
  d.q_seq_stride = varlen ? 0 : p.q.batch_stride;
  d.q_row_stride = p.q.row_stride;
  d.q_head_stride = p.q.head_stride;
  d.q_start = p.cu_seqlens_q;
  d.q_tokens = p.total_q;
  d.out = p.out.ptr;
  d.out_seq_stride = varlen ? 0 : p.out.batch_stride;
  d.out_row_stride = p.out.row_stride;
  d.out_head_stride = p.out.head_stride;
  d.lse = p.lse;
  d.lse_seq_stride = varlen ? 0 : p.lse_batch_stride;
  d.lse_row_stride = 1;
  d.lse_head_stride = p.lse_head_stride;
  d.key_cache = p.k.ptr;
  d.value_cache = p.v.ptr;
  d.cache.heads_k = p.heads_k;
  d.cache.head_dim = p.head_dim;
  d.cache.pos_stride = p.k.row_stride;
  d.cache.head_stride = p.k.head_stride;
  if (p.block_table != nullptr) {
    d.block_table = p.block_table;
    d.block_table_stride = p.block_table_stride;
    d.max_blocks = p.block_table_cols;
    d.cache.num_blocks = p.num_blocks;
    d.cache.block_size = p.block_size;
    d.cache.block_stride = p.k.batch_stride;
  }
  d.num_seqs = p.batch;
  d.heads = p.heads;
  d.max_seq_len = p.seqlen_k;
  d.scale = p.scale;
  d.softcap = p.softcap;
  d.window_left = p.window_left;
  d.window_right = p.window_right;
  d.alibi_slopes = p.alibi_slopes;
  d.alibi_seq_stride = p.alibi_batch_stride;
  d.dtype = p.dtype;
  return d;
}

}  // namespace torchkiln
