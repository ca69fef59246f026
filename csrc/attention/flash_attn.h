// FlashAttention-2 forward and backward (CPU and CUDA): tiled attention with an online softmax,
// never materialising the (seqlen_q x seqlen_k) score matrix.
//
// Semantics follow flash-attn 2.x. For query i and key j of one sequence
// (lengths sq, sk; d = sk - sq aligns the causal diagonal bottom-right):
//   s   = scale * <q_i, k_j>;  softcap > 0:  s = softcap * tanh(s / softcap)
//   s  -= alibi_slope * |i + d - j|                   (when slopes are given)
//   key j is kept iff  j >= i + d - window_left       (window_left  >= 0)
//                 and  j <= i + d + window_right      (window_right >= 0; causal = 0)
//   out_i = sum_j softmax(s)_j v_j;  lse_i = log(sum_j exp(s_j)), fp32
// A query with no key left outputs zeros and lse = +inf.
//
// Fixed-length batches address sequence b at b * batch_stride; varlen
// batches (cu_seqlens non-null) pack tokens, sequence b at cu_seqlens[b].
#pragma once
#include <cstdint>
#include <initializer_list>

#include "common/cpu_isa.h"
#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

// One (.., tokens, heads, head_dim) tensor: element (b, t, h, d) of a fixed
// batch is at b * batch_stride + t * row_stride + h * head_stride + d; varlen
// tensors ignore batch_stride (t counts packed tokens).
struct FlashAttnTensor {
  const void* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
};
struct FlashAttnOutput {
  void* ptr = nullptr;
  int64_t batch_stride = 0, row_stride = 0, head_stride = 0;
};

struct FlashAttnParams {
  FlashAttnTensor q, k, v;  // k/v have heads_k heads
  FlashAttnOutput out;      // like q
  float* lse = nullptr;     // fixed: (batch, heads, seqlen_q); varlen: (heads, total_q)
  int64_t lse_batch_stride = 0, lse_head_stride = 0;
  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1), varlen only
  const int32_t* cu_seqlens_k = nullptr;
  int64_t batch = 0, seqlen_q = 0, seqlen_k = 0;  // varlen: the maxima
  int64_t total_q = 0, total_k = 0;                // varlen: packed tokens of q, of k (0 when paged)
  int64_t heads = 0, heads_k = 0, head_dim = 0;
  float scale = 1.0f;
  float softcap = 0.0f;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded; causal sets right = 0
  const float* alibi_slopes = nullptr;           // (heads) or (batch, heads)
  int64_t alibi_batch_stride = 0;
  // Paged K/V (varlen forward only): k and v are caches (num_blocks,
  // block_size, heads_k, head_dim) and key j of sequence b sits in block
  // block_table[b * block_table_stride + j / block_size]; cu_seqlens_k still
  // gives the sequences' key counts. k.row_stride is the cache's position
  // stride and k.batch_stride its block stride.
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0, block_size = 0;
  int64_t block_table_cols = 0, num_blocks = 0;  // the table's width, the cache's blocks
  DType dtype = DType::kFloat32;
  // CUDA forward scratch, flash_attn_fwd_cuda_workspace(*this) floats (the
  // split-KV partials of a one-query batch); null when that is 0.
  float* workspace = nullptr;
};

// Backward: given dout, recomputes the probabilities from lse (the forward's
// `out` and `lse` are inputs here) and writes dq, dk, dv. dk/dv sum over the
// query heads of each GQA group. Deterministic: every sum runs in a fixed order.
struct FlashAttnBwdParams {
  FlashAttnParams fwd;  // q, k, v, lse and every option; fwd.out.ptr is the forward output (read only)
  FlashAttnTensor dout;
  FlashAttnOutput dq, dk, dv;
  float* dsum = nullptr;  // CUDA scratch in lse's layout: rowsum(dout * out)
};

TK_DECLARE_CPU_KERNEL(void, flash_attn_fwd, const FlashAttnParams&)
TK_DECLARE_CPU_KERNEL(void, flash_attn_bwd, const FlashAttnBwdParams&)

// CUDA kernels exist for bf16 / fp16 and these head dims (one instantiation
// each); the glue zero-pads any other head_dim (a multiple of 8) up to the
// next one, which leaves scores and the kept output columns unchanged.
// Every tensor must be 16-byte aligned with strides that are multiples of 8.
inline int64_t flash_attn_cuda_head_dim(int64_t head_dim) {
  for (int64_t d : {64, 96, 128, 256})
    if (head_dim <= d) return d;
  return 0;
}
// A batch with at most one query per sequence runs through the paged decode
// kernel (paged/paged_attention.h), split over the keys (Flash-Decoding): the
// flash kernels would give each (sequence, head) one block, too few to fill
// the GPU with a few long sequences. It needs a workspace of this many
// floats (0 for every other batch) in p.workspace.
int64_t flash_attn_fwd_cuda_workspace(const FlashAttnParams& p);
void flash_attn_fwd_cuda(const FlashAttnParams& p, CUstream_st* stream);
void flash_attn_bwd_cuda(const FlashAttnBwdParams& p, CUstream_st* stream);  // needs p.dsum

}  // namespace torchkiln
