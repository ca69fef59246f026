// Fixed-size KV-cache block allocator with reference counts, copy-on-write
// and prefix caching (PagedAttention-style). No torch dependency; bound to
// Python in csrc/python_bindings.cpp and wrapped by torchkiln.memory.
//
// Free blocks sit on one of two intrusive lists, so every operation is O(1)
// per block:
//   uncached   blocks holding nothing reusable; allocation takes these first
//   cached     freed blocks whose contents are still registered for prefix
//              reuse, least recently freed first; allocation evicts from the
//              front only when no uncached block is left
// One free() call queues its blocks last-to-first, so a freed chain's tail
// is evicted before its head and shared prefixes live longest.
//
// Prefix caching: a full block is identified by the chain hash of
// (parent block's hash, its block_size tokens, extra_key); the tokens and
// parent are kept and compared on every hit, so a hash collision can never
// return the wrong block.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torchkiln {

class BlockAllocator {
 public:
  struct Stats {
    int64_t hits = 0, misses = 0, evictions = 0;  // counted in blocks
  };

  BlockAllocator(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching);

  // All or nothing: n fresh blocks (ref count 1), or false with no change when
  // fewer than n blocks are free (cached ones included).
  bool allocate(int64_t n, std::vector<int32_t>* out);
  // Drops one reference per listed id. Throws std::invalid_argument, changing
  // nothing, for an unknown id or more frees of a block than its references.
  void free(const std::vector<int32_t>& blocks);
  // One more reference to each listed (allocated) block.
  void fork(const std::vector<int32_t>& blocks);
  // The block to write into: `block` itself when this is its only reference
  // and it holds no cached contents, otherwise a fresh copy target (the caller
  // copies src -> dst), the reference moving from src to dst. False when a
  // copy is needed and no block is free.
  bool copy_on_write(int32_t block, std::pair<int32_t, int32_t>* out);
  // The longest run of cached full blocks that starts the token sequence, each
  // with a new reference.
  std::vector<int32_t> match_prefix(const int64_t* tokens, int64_t num_tokens, uint64_t extra_key);
  // Registers the full blocks among `blocks` (allocated, in sequence order)
  // as holding `tokens`. A block already registered with other contents, or
  // fewer blocks than full token blocks, throws std::invalid_argument.
  void commit(const std::vector<int32_t>& blocks, const int64_t* tokens, int64_t num_tokens, uint64_t extra_key);
  // Forgets every registered prefix (free cached blocks become uncached).
  void reset_prefix_cache();

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  int64_t block_size() const { return block_size_; }
  int64_t num_free() const { return uncached_.size + cached_.size; }
  int64_t num_cached() const { return static_cast<int64_t>(cache_.size()); }
  int32_t ref_count(int32_t block) const;
  bool is_cached(int32_t block) const;
  const Stats& stats() const { return stats_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Free blocks in the order allocation would take them (tests and debugging).
  std::vector<int32_t> free_order() const;

 private:
  enum class Where : uint8_t { kInUse, kUncached, kCached };
  struct Block {
    int32_t ref = 0;
    int32_t prev = -1, next = -1;  // links in its free list
    Where where = Where::kUncached;
    bool registered = false;
    uint64_t hash = 0, parent = 0, extra = 0;
  };
  struct List {
    int32_t head = -1, tail = -1;
    int64_t size = 0;
  };

  void push_back(List& list, Where where, int32_t id);
  void unlink(int32_t id);
  int32_t pop_front(List& list);
  void unregister(int32_t id);
  void check_id(int32_t id, const char* what) const;
  uint64_t block_hash(uint64_t parent, const int64_t* tokens, uint64_t extra) const;
  bool same_contents(int32_t id, uint64_t parent, const int64_t* tokens, uint64_t extra) const;

  int64_t block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  std::vector<int64_t> tokens_;  // block_size_ per block id, for registered blocks (grown by commit)
  List uncached_, cached_;
  std::unordered_map<uint64_t, int32_t> cache_;
  std::vector<int32_t> drops_;  // scratch for free(): all zero between calls
  Stats stats_;
};

}  // namespace torchkiln
