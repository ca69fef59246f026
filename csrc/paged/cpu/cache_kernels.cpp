// Cache writes and block copies: plain memory movement, one row (head_dim
// contiguous elements) or one block at a time.
#include <cstring>

#include "common/parallel.h"
#include "paged/paged_attention.h"

namespace torchkiln {
namespace TK_CPU_NS {

void reshape_and_cache(const ReshapeAndCacheParams& p) {
  const CacheLayout& c = p.cache;
  const int64_t es = p.element_size, row_bytes = c.head_dim * es;
  auto* kc = static_cast<char*>(p.key_cache);
  auto* vc = static_cast<char*>(p.value_cache);
  const auto* key = static_cast<const char*>(p.key);
  const auto* value = static_cast<const char*>(p.value);
  parallel_for(0, p.num_tokens, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t slot = p.slot_mapping[t];
      if (slot < 0) continue;  // padding
      const int64_t at = (slot / c.block_size) * c.block_stride + (slot % c.block_size) * c.pos_stride;
      for (int64_t h = 0; h < c.heads_k; ++h) {
        std::memcpy(kc + (at + h * c.head_stride) * es, key + (t * p.key_token_stride + h * p.key_head_stride) * es,
                    static_cast<size_t>(row_bytes));
        std::memcpy(vc + (at + h * c.head_stride) * es,
                    value + (t * p.value_token_stride + h * p.value_head_stride) * es, static_cast<size_t>(row_bytes));
      }
    }
  });
}

void copy_blocks(const CopyBlocksParams& p) {
  parallel_for(0, p.num_caches * p.num_pairs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      char* base = static_cast<char*>(p.caches[t / p.num_pairs]);
      const int64_t* pair = p.mapping + 2 * (t % p.num_pairs);
      std::memcpy(base + pair[1] * p.block_bytes, base + pair[0] * p.block_bytes, static_cast<size_t>(p.block_bytes));
    }
  });
}

}  // namespace TK_CPU_NS
}  // namespace torchkiln
