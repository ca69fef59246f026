// Entry points of the CUDA attention kernels: validate what the kernels
// assume (the glue guarantees it; these are our own invariants), send
// few-query batches to the paged decode kernel, and pick the head_dim
// instantiation.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/cuda/flash_launch.h"
#include "attention/decode_params.h"

namespace torchkiln {
namespace {

void check_kernel_params(const FlashAttnParams& p) {
  if (p.dtype == DType::kFloat32)
    throw std::invalid_argument("torchkiln: the CUDA attention kernels take bf16 or fp16");
  if (flash_attn_cuda_head_dim(p.head_dim) != p.head_dim)
    throw std::invalid_argument("torchkiln: no CUDA attention kernel for head_dim " + std::to_string(p.head_dim));
  if (p.batch > 65535 || p.heads > 65535)
    throw std::invalid_argument("torchkiln: CUDA attention supports at most 65535 sequences and 65535 heads");
  if (p.block_table != nullptr && (p.block_size <= 0 || p.block_size > INT32_MAX))
    throw std::invalid_argument("torchkiln: CUDA attention takes block sizes of 1 to 2^31 - 1 positions");
}

// A few queries per sequence (decode, speculative decoding): the decode
// kernel reads each K/V row once for all of them and all query heads of a
// GQA group, where the flash kernels read it once per query head and fill
// 128-row tiles with a handful of rows. Up to 16 query vectors (rows x heads
// of a group) per kv head keep it memory-bound: 16 FMAs per key element
// read, under an H200's ~13 fp32 FLOP per byte of bandwidth. (Not yet timed
// on a GPU.) The kernel reads K and V through one layout.
constexpr int64_t kDecodeVectorsPerKvHead = 16;
bool runs_as_decode(const FlashAttnParams& p) {
  const int64_t group = p.heads / p.heads_k;
  const bool few_vectors = p.seqlen_q * group <= std::max(group, kDecodeVectorsPerKvHead);  // one row always
  return p.seqlen_q >= 1 && p.seqlen_q <= kMaxDecodeRowsCuda && few_vectors && p.seqlen_k >= 1 &&
         p.k.batch_stride == p.v.batch_stride && p.k.row_stride == p.v.row_stride &&
         p.k.head_stride == p.v.head_stride;
}

// The decode kernel's view of the batch, planned for this GPU: packed keys
// (varlen) lie at cu_seqlens_k offsets, fixed batches at the batch stride.
PagedAttnParams decode_params(const FlashAttnParams& p) {
  PagedAttnParams d = decode_params_of(p);
  d.max_rows = p.seqlen_q;
  if (p.block_table == nullptr) d.kv_seq_stride = p.cu_seqlens_k != nullptr ? 0 : p.k.batch_stride;
  d.k_start = p.cu_seqlens_k;  // key counts (and, in place, offsets) of packed batches
  d.k_tokens = p.total_k;
  paged_attention_cuda_plan(d);
  return d;
}

int64_t partial_lse_floats(const PagedAttnParams& d) { return d.num_seqs * d.max_rows * d.heads * d.num_splits; }
int64_t partial_out_floats(const PagedAttnParams& d) { return partial_lse_floats(d) * d.cache.head_dim; }

}  // namespace

int64_t flash_attn_fwd_cuda_workspace(const FlashAttnParams& p) {
  if (!runs_as_decode(p)) return 0;
  const PagedAttnParams d = decode_params(p);
  return d.num_splits > 1 ? partial_out_floats(d) + partial_lse_floats(d) : 0;
}

void flash_attn_fwd_cuda(const FlashAttnParams& p, CUstream_st* stream) {
  check_kernel_params(p);
  if (runs_as_decode(p)) {
    PagedAttnParams d = decode_params(p);
    if (d.num_splits > 1) {
      if (p.workspace == nullptr)
        throw std::invalid_argument("torchkiln: a few-query CUDA attention forward needs its workspace");
      d.partial_out = p.workspace;
      d.partial_lse = p.workspace + partial_out_floats(d);
    }
    paged_attention_cuda(d, stream);
    return;
  }
  switch (p.head_dim) {
    case 64: flash::run_fwd_hdim64(p, stream); break;
    case 96: flash::run_fwd_hdim96(p, stream); break;
    case 128: flash::run_fwd_hdim128(p, stream); break;
    default: flash::run_fwd_hdim256(p, stream); break;
  }
}

void flash_attn_bwd_cuda(const FlashAttnBwdParams& p, CUstream_st* stream) {
  check_kernel_params(p.fwd);
  if (p.dsum == nullptr) throw std::invalid_argument("torchkiln: CUDA attention backward needs dsum scratch");
  switch (p.fwd.head_dim) {
    case 64: flash::run_bwd_hdim64(p, stream); break;
    case 96: flash::run_bwd_hdim96(p, stream); break;
    case 128: flash::run_bwd_hdim128(p, stream); break;
    default: flash::run_bwd_hdim256(p, stream); break;
  }
}

}  // namespace torchkiln
