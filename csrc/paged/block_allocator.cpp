#include "paged/block_allocator.h"

#include <algorithm>
#include <string>

namespace torchkiln {
namespace {

// splitmix64 finaliser: full avalanche for the chain hash.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr uint64_t kRootHash = 0x7f4a7c159e3779b9ull;  // parent of a sequence's first block

}  // namespace

BlockAllocator::BlockAllocator(int64_t num_blocks, int64_t block_size, bool enable_prefix_caching)
    : block_size_(block_size), prefix_caching_(enable_prefix_caching) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) throw std::invalid_argument("num_blocks must be in [1, 2^31)");
  if (block_size <= 0 || block_size > INT32_MAX) throw std::invalid_argument("block_size must be in [1, 2^31)");
  blocks_.resize(static_cast<size_t>(num_blocks));
  drops_.assign(static_cast<size_t>(num_blocks), 0);
  for (int32_t id = 0; id < num_blocks; ++id) push_back(uncached_, Where::kUncached, id);
}

void BlockAllocator::push_back(List& list, Where where, int32_t id) {
  Block& b = blocks_[id];
  b.where = where;
  b.prev = list.tail;
  b.next = -1;
  if (list.tail >= 0) blocks_[list.tail].next = id;
  list.tail = id;
  if (list.head < 0) list.head = id;
  ++list.size;
}

void BlockAllocator::unlink(int32_t id) {
  Block& b = blocks_[id];
  List& list = b.where == Where::kCached ? cached_ : uncached_;
  (b.prev >= 0 ? blocks_[b.prev].next : list.head) = b.next;
  (b.next >= 0 ? blocks_[b.next].prev : list.tail) = b.prev;
  b.prev = b.next = -1;
  b.where = Where::kInUse;
  --list.size;
}

int32_t BlockAllocator::pop_front(List& list) {
  const int32_t id = list.head;
  unlink(id);
  return id;
}

void BlockAllocator::unregister(int32_t id) {
  Block& b = blocks_[id];
  if (!b.registered) return;
  cache_.erase(b.hash);
  b.registered = false;
}

void BlockAllocator::check_id(int32_t id, const char* what) const {
  if (id < 0 || id >= num_blocks())
    throw std::invalid_argument(std::string(what) + ": block id " + std::to_string(id) + " is out of range [0, " +
                                std::to_string(num_blocks()) + ")");
}

int32_t BlockAllocator::ref_count(int32_t block) const {
  check_id(block, "ref_count");
  return blocks_[block].ref;
}

bool BlockAllocator::is_cached(int32_t block) const {
  check_id(block, "is_cached");
  return blocks_[block].registered;
}

bool BlockAllocator::allocate(int64_t n, std::vector<int32_t>* out) {
  if (n < 0) throw std::invalid_argument("allocate: n must be >= 0");
  if (n > num_free()) return false;
  out->clear();
  out->reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    int32_t id;
    if (uncached_.size > 0) {
      id = pop_front(uncached_);
    } else {
      id = pop_front(cached_);
      unregister(id);
      ++stats_.evictions;
    }
    blocks_[id].ref = 1;
    out->push_back(id);
  }
  return true;
}

void BlockAllocator::free(const std::vector<int32_t>& blocks) {
  // Validate everything first: a rejected call changes nothing. drops_ counts
  // this call's frees per block (reset before returning or throwing).
  size_t checked = 0;
  auto reset = [&] {
    for (size_t i = 0; i < checked; ++i) drops_[blocks[i]] = 0;
  };
  for (int32_t id : blocks) {
    if (id < 0 || id >= num_blocks()) {
      reset();
      check_id(id, "free");
    }
    ++checked;
    if (++drops_[id] > blocks_[id].ref) {
      reset();
      throw std::invalid_argument("free: block " + std::to_string(id) + " is freed more times than it is referenced (" +
                                  std::to_string(blocks_[id].ref) + ")");
    }
  }
  reset();
  // Last to first: a chain's tail reaches its free list before its head.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    Block& b = blocks_[*it];
    if (--b.ref == 0) {
      if (b.registered)
        push_back(cached_, Where::kCached, *it);
      else
        push_back(uncached_, Where::kUncached, *it);
    }
  }
}

void BlockAllocator::fork(const std::vector<int32_t>& blocks) {
  for (int32_t id : blocks) {
    check_id(id, "fork");
    if (blocks_[id].ref == 0) throw std::invalid_argument("fork: block " + std::to_string(id) + " is not allocated");
  }
  for (int32_t id : blocks) ++blocks_[id].ref;
}

bool BlockAllocator::copy_on_write(int32_t block, std::pair<int32_t, int32_t>* out) {
  check_id(block, "copy_on_write");
  Block& b = blocks_[block];
  if (b.ref == 0) throw std::invalid_argument("copy_on_write: block " + std::to_string(block) + " is not allocated");
  if (b.ref == 1 && !b.registered) {  // sole owner of private contents: write in place
    *out = {block, block};
    return true;
  }
  std::vector<int32_t> fresh;
  if (!allocate(1, &fresh)) return false;
  free({block});  // the reference moves to the copy
  *out = {block, fresh[0]};
  return true;
}

uint64_t BlockAllocator::block_hash(uint64_t parent, const int64_t* tokens, uint64_t extra) const {
  uint64_t h = mix(parent ^ mix(extra));
  for (int64_t i = 0; i < block_size_; ++i) h = mix(h ^ static_cast<uint64_t>(tokens[i]));
  return h;
}

bool BlockAllocator::same_contents(int32_t id, uint64_t parent, const int64_t* tokens, uint64_t extra) const {
  const Block& b = blocks_[id];
  return b.parent == parent && b.extra == extra &&
         std::equal(tokens, tokens + block_size_, tokens_.begin() + static_cast<int64_t>(id) * block_size_);
}

std::vector<int32_t> BlockAllocator::match_prefix(const int64_t* tokens, int64_t num_tokens, uint64_t extra_key) {
  std::vector<int32_t> hit;
  const int64_t full = num_tokens / block_size_;
  if (!prefix_caching_) return hit;
  uint64_t parent = kRootHash;
  for (int64_t i = 0; i < full; ++i) {
    const int64_t* t = tokens + i * block_size_;
    const uint64_t h = block_hash(parent, t, extra_key);
    auto it = cache_.find(h);
    if (it == cache_.end() || !same_contents(it->second, parent, t, extra_key)) break;
    hit.push_back(it->second);
    parent = h;
  }
  for (int32_t id : hit) {
    Block& b = blocks_[id];
    if (b.ref == 0) unlink(id);
    ++b.ref;
  }
  stats_.hits += static_cast<int64_t>(hit.size());
  stats_.misses += full - static_cast<int64_t>(hit.size());
  return hit;
}

void BlockAllocator::commit(const std::vector<int32_t>& blocks, const int64_t* tokens, int64_t num_tokens,
                            uint64_t extra_key) {
  if (!prefix_caching_) return;
  const int64_t full = num_tokens / block_size_;
  if (full > static_cast<int64_t>(blocks.size()))
    throw std::invalid_argument("commit: " + std::to_string(full) + " full blocks of tokens but only " +
                                std::to_string(blocks.size()) + " blocks");
  // Validate first, computing the chain; then register.
  std::vector<uint64_t> hashes(static_cast<size_t>(full)), parents(static_cast<size_t>(full));
  uint64_t parent = kRootHash;
  for (int64_t i = 0; i < full; ++i) {
    const int32_t id = blocks[i];
    check_id(id, "commit");
    const Block& b = blocks_[id];
    if (b.ref == 0) throw std::invalid_argument("commit: block " + std::to_string(id) + " is not allocated");
    const int64_t* t = tokens + i * block_size_;
    parents[i] = parent;
    hashes[i] = block_hash(parent, t, extra_key);
    if (b.registered && (b.hash != hashes[i] || !same_contents(id, parent, t, extra_key)))
      throw std::invalid_argument("commit: block " + std::to_string(id) +
                                  " is already registered with other contents");
    parent = hashes[i];
  }
  for (int64_t i = 0; i < full; ++i) {
    const int32_t id = blocks[i];
    Block& b = blocks_[id];
    if (b.registered || cache_.count(hashes[i])) continue;  // already cached (here or in another block)
    b.registered = true;
    b.hash = hashes[i];
    b.parent = parents[i];
    b.extra = extra_key;
    // The token store grows with the highest block id registered (ids are
    // handed out lowest first), so memory follows what is cached rather
    // than num_blocks x block_size up front.
    const size_t size = static_cast<size_t>(block_size_), end = (static_cast<size_t>(id) + 1) * size;
    if (tokens_.size() < end) tokens_.resize(std::max(end, std::min(2 * tokens_.size(), blocks_.size() * size)));
    std::copy(tokens + i * block_size_, tokens + (i + 1) * block_size_,
              tokens_.begin() + static_cast<int64_t>(id) * block_size_);
    cache_.emplace(hashes[i], id);
  }
}

void BlockAllocator::reset_prefix_cache() {
  while (cached_.size > 0) {
    const int32_t id = pop_front(cached_);
    push_back(uncached_, Where::kUncached, id);
  }
  for (Block& b : blocks_) b.registered = false;
  cache_.clear();
}

std::vector<int32_t> BlockAllocator::free_order() const {
  std::vector<int32_t> order;
  order.reserve(static_cast<size_t>(num_free()));
  for (int32_t id = uncached_.head; id >= 0; id = blocks_[id].next) order.push_back(id);
  for (int32_t id = cached_.head; id >= 0; id = blocks_[id].next) order.push_back(id);
  return order;
}

}  // namespace torchkiln
