// Cache writes and block copies on CUDA: plain copies, one block per token
// (reshape_and_cache) or per (block pair, cache) (copy_blocks).
#include <cstdint>

#include "common/cuda/cuda_helpers.cuh"
#include "paged/paged_attention.h"

namespace torchkiln {
namespace {

// Elements are moved as opaque words of their size (2 or 4 bytes).
template <class Word>
__global__ void reshape_and_cache_kernel(const ReshapeAndCacheParams p) {
  const int64_t t = blockIdx.x;
  const int64_t slot = p.slot_mapping[t];
  // Negative: a padding token. Past the cache: only possible unchecked, under
  // CUDA graph capture (see the glue); never written.
  if (slot < 0 || slot >= p.cache.num_blocks * p.cache.block_size) return;
  const int64_t block = slot / p.cache.block_size, offset = slot % p.cache.block_size;
  const int64_t dst0 = block * p.cache.block_stride + offset * p.cache.pos_stride;
  const Word* key = static_cast<const Word*>(p.key);
  const Word* value = static_cast<const Word*>(p.value);
  Word* key_cache = static_cast<Word*>(p.key_cache);
  Word* value_cache = static_cast<Word*>(p.value_cache);
  const int64_t D = p.cache.head_dim;
  for (int64_t i = threadIdx.x; i < p.cache.heads_k * D; i += blockDim.x) {
    const int64_t h = i / D, d = i % D;
    const int64_t dst = dst0 + h * p.cache.head_stride + d;
    key_cache[dst] = key[t * p.key_token_stride + h * p.key_head_stride + d];
    value_cache[dst] = value[t * p.value_token_stride + h * p.value_head_stride + d];
  }
}

template <class Word>
__global__ void copy_blocks_kernel(const CopyBlocksParams p) {
  const int64_t pair = blockIdx.x;
  char* base = static_cast<char*>(p.caches[blockIdx.y]);
  const int64_t src = p.mapping[2 * pair], dst = p.mapping[2 * pair + 1];
  const Word* from = reinterpret_cast<const Word*>(base + src * p.block_bytes);
  Word* to = reinterpret_cast<Word*>(base + dst * p.block_bytes);
  for (int64_t i = threadIdx.x; i < p.block_bytes / static_cast<int64_t>(sizeof(Word)); i += blockDim.x)
    to[i] = from[i];
}

}  // namespace

void reshape_and_cache_cuda(const ReshapeAndCacheParams& p, CUstream_st* stream) {
  if (p.num_tokens == 0) return;
  const dim3 grid(static_cast<unsigned>(p.num_tokens));
  if (p.element_size == 2)
    TK_KERNEL_LAUNCH(grid, 128, 0, stream, reshape_and_cache_kernel<uint16_t>)(p);
  else
    TK_KERNEL_LAUNCH(grid, 128, 0, stream, reshape_and_cache_kernel<uint32_t>)(p);
  cuda::check_launch("reshape_and_cache_kernel");
}

void copy_blocks_cuda(const CopyBlocksParams& p, CUstream_st* stream) {
  if (p.num_pairs == 0) return;
  const dim3 grid(static_cast<unsigned>(p.num_pairs), static_cast<unsigned>(p.num_caches));
  // Blocks start at multiples of block_bytes from 256-byte aligned bases.
  if (p.block_bytes % 16 == 0)
    TK_KERNEL_LAUNCH(grid, 256, 0, stream, copy_blocks_kernel<uint4>)(p);
  else
    TK_KERNEL_LAUNCH(grid, 256, 0, stream, copy_blocks_kernel<uint16_t>)(p);
  cuda::check_launch("copy_blocks_kernel");
}

}  // namespace torchkiln
