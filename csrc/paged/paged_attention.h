// Paged KV cache kernels: writing new tokens into cache slots, copying
// blocks, and decode attention that reads K/V through per-sequence block
// tables (PagedAttention), split over the context (Flash-Decoding) so a few
// long sequences still keep every core busy.
//
// Cache layout, per layer: (num_blocks, block_size, heads_k, head_dim),
// token t of a sequence lives at slot block_table[t / block_size] *
// block_size + t % block_size.
#pragma once
#include <cstdint>

#include "common/cpu_isa.h"
#include "common/dtype.h"

struct CUstream_st;

namespace torchkiln {

struct CacheLayout {
  int64_t num_blocks = 0, block_size = 0, heads_k = 0, head_dim = 0;
  int64_t block_stride = 0, pos_stride = 0, head_stride = 0;  // elements; head_dim contiguous
};

struct ReshapeAndCacheParams {
  const void* key = nullptr;  // (tokens, heads_k, head_dim)
  const void* value = nullptr;
  int64_t key_token_stride = 0, key_head_stride = 0, value_token_stride = 0, value_head_stride = 0;
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  CacheLayout cache;
  const int64_t* slot_mapping = nullptr;  // (tokens); < 0 skips the token
  int64_t num_tokens = 0;
  int64_t element_size = 0;
};

// Copies blocks src -> dst in each of num_caches caches of one layout.
// On CUDA `caches` and `mapping` are device arrays.
struct CopyBlocksParams {
  void* const* caches = nullptr;  // num_caches base pointers
  int64_t num_caches = 0;
  const int64_t* mapping = nullptr;  // (num_pairs, 2): src, dst
  int64_t num_pairs = 0;
  int64_t block_bytes = 0;  // a block is contiguous: block_stride elements
};

// Decode: one new query token per sequence, at position seq_len - 1, attends
// to the sequence's seq_len cached keys with the masks and options of
// flash_attn_fwd (attention/flash_attn.h). flash_attn's forward also runs
// here for a few queries per sequence (CPU and CUDA).
//
// Query rows: a sequence may have several (CUDA: up to kMaxDecodeRowsCuda), aligned bottom-right
// as in flash_attn. Row r of R is the query at position diag = seq_len - R +
// r and sees keys [diag - window_left, diag + window_right] of [0,
// seq_len). Row r of sequence s is token t = r + (q_start ? q_start[s] : 0):
// q at s * q_seq_stride + t * q_row_stride + h * q_head_stride, out and lse
// at the same with their own strides (packed rows have seq strides 0). With
// q_start a sequence may have fewer rows than max_rows, or none.
//
// Keys: through block_table, or (CUDA only, block_table null) in place: key
// j of sequence s at s * kv_seq_stride + (k_start[s] + j) * pos_stride, with
// k_start[s] = 0 when k_start is null. The key count is seq_lens[s]; on CUDA, with seq_lens
// null, k_start[s + 1] - k_start[s], or max_seq_len without k_start. The CPU
// kernel always reads block_table and seq_lens.
//
// The glue checks seq_lens, q_start / k_start and the table's ids on the
// host, except while a CUDA graph is being captured (reading device memory
// would break the capture): so the CUDA kernel itself keeps packed rows and
// keys inside q_tokens / k_tokens, a sequence within its table's max_blocks,
// max_rows and max_seq_len, and reads an id outside [0, cache.num_blocks) as
// block 0. Bad values then give wrong numbers, never an access outside the
// tensors.
struct PagedAttnParams {
  const void* q = nullptr;  // (num_seqs, heads, head_dim)
  int64_t q_seq_stride = 0, q_head_stride = 0;
  int64_t max_rows = 1;              // query rows per sequence (all of them, without q_start)
  const int32_t* q_start = nullptr;  // (num_seqs + 1): rows of s are tokens [q_start[s], q_start[s + 1])
  int64_t q_row_stride = 0;
  int64_t out_seq_stride = 0, out_row_stride = 0, out_head_stride = 0;  // elements
  int64_t lse_seq_stride = 0, lse_row_stride = 0, lse_head_stride = 0;
  int64_t alibi_seq_stride = 0;  // slopes (num_seqs, heads) when not 0
  const void* key_cache = nullptr;
  const void* value_cache = nullptr;
  CacheLayout cache;  // shared by key and value caches
  const int32_t* block_table = nullptr;  // (num_seqs, max_blocks)
  int64_t block_table_stride = 0, max_blocks = 0;
  const int32_t* seq_lens = nullptr;  // (num_seqs)
  const int32_t* k_start = nullptr;   // CUDA: (num_seqs + 1), cu_seqlens of the keys
  int64_t q_tokens = 0, k_tokens = 0;  // with q_start / k_start (keys in place): packed tokens
  int64_t kv_seq_stride = 0;          // CUDA, keys in place: elements between sequences
  void* out = nullptr;                // like q, through the out strides
  float* lse = nullptr;               // through the lse strides
  int64_t num_seqs = 0, heads = 0, max_seq_len = 0;
  float scale = 1.0f, softcap = 0.0f;
  int64_t window_left = -1, window_right = -1;
  const float* alibi_slopes = nullptr;  // (heads), or (num_seqs, heads) with alibi_seq_stride
  DType dtype = DType::kFloat32;
  // CUDA split-KV: num_splits chunks of split_chunk keys per sequence, their
  // normalised fp32 partial outputs (num_seqs, max_rows, heads, num_splits,
  // head_dim) and lse (num_seqs, max_rows, heads, num_splits) combined by a
  // second kernel.
  int64_t num_splits = 1, split_chunk = 0;
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
};

TK_DECLARE_CPU_KERNEL(void, reshape_and_cache, const ReshapeAndCacheParams&)
TK_DECLARE_CPU_KERNEL(void, copy_blocks, const CopyBlocksParams&)
TK_DECLARE_CPU_KERNEL(void, paged_attention, const PagedAttnParams&)

// CUDA (head_dim a multiple of 8; every dtype; up to kMaxDecodeRowsCuda
// query rows per sequence, each K/V row read once for all of them and all
// query heads of its group). The decode plan fills
// num_splits / split_chunk; the caller provides the partial buffers when
// num_splits > 1.
constexpr int64_t kMaxDecodeRowsCuda = 8;
void reshape_and_cache_cuda(const ReshapeAndCacheParams& p, CUstream_st* stream);
void copy_blocks_cuda(const CopyBlocksParams& p, CUstream_st* stream);
void paged_attention_cuda_plan(PagedAttnParams& p);
void paged_attention_cuda(const PagedAttnParams& p, CUstream_st* stream);

}  // namespace torchkiln
