// Torch glue for the paged KV cache: cache writes, block copies and swaps,
// paged decode attention, on CPU and CUDA. Index tensors (block tables,
// sequence lengths, mappings) are validated on the host before any kernel
// reads through them.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common/op_checks.h"
#include "common/op_registration.h"
#include "paged/paged_attention.h"

namespace torchkiln {
namespace {

// (num_blocks, block_size, heads_k, head_dim) with a contiguous head_dim.
CacheLayout check_cache(const char* op, const at::Tensor& cache, const char* name) {
  TORCH_CHECK_VALUE(cache.dim() == 4, op, ": ", name,
                    " must be (num_blocks, block_size, num_kv_heads, head_dim), got shape ", cache.sizes());
  check_not_empty(cache, op, name);
  TORCH_CHECK_VALUE(cache.stride(-1) == 1, op, ": ", name, " must be contiguous in head_dim");
  CacheLayout c;
  c.num_blocks = cache.size(0);
  c.block_size = cache.size(1);
  c.heads_k = cache.size(2);
  c.head_dim = cache.size(3);
  c.block_stride = cache.stride(0);
  c.pos_stride = cache.stride(1);
  c.head_stride = cache.stride(2);
  return c;
}

void check_pair(const char* op, const at::Tensor& key_cache, const at::Tensor& value_cache) {
  TORCH_CHECK_VALUE(key_cache.sizes() == value_cache.sizes() && key_cache.strides() == value_cache.strides(), op,
                    ": key_cache and value_cache must have the same shape and strides, got ", key_cache.sizes(),
                    " and ", value_cache.sizes());
  check_same_dtype(value_cache, key_cache, op, "value_cache", "key_cache");
  check_same_device(value_cache, key_cache, op, "value_cache", "key_cache");
}

void reshape_and_cache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                       const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  const char* op = "reshape_and_cache";
  const CacheLayout c = check_cache(op, key_cache, "key_cache");
  check_pair(op, key_cache, value_cache);
  check_writable(key_cache, op, "key_cache");
  check_writable(value_cache, op, "value_cache");
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(1) == c.heads_k && t->size(2) == c.head_dim, op, ": ", name,
                      " must be (num_tokens, ", c.heads_k, ", ", c.head_dim, ") to match the cache, got ",
                      t->sizes());
    check_same_dtype(*t, key_cache, op, name, "key_cache");
    check_same_device(*t, key_cache, op, name, "key_cache");
    TORCH_CHECK_VALUE(t->stride(-1) == 1, op, ": ", name, " must be contiguous in head_dim");
  }
  TORCH_CHECK_VALUE(value.size(0) == key.size(0), op, ": key and value must have the same number of tokens");
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, got ",
                   slot_mapping.scalar_type());
  check_same_device(slot_mapping, key_cache, op, "slot_mapping", "key_cache");
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
                    op, ": slot_mapping must be a contiguous (num_tokens,) = (", key.size(0), ",) tensor, got ",
                    slot_mapping.sizes());
  const int64_t num_slots = c.num_blocks * c.block_size;
  // Not readable under CUDA graph capture: the kernel then skips such slots.
  if (slot_mapping.numel() > 0 && !capturing_cuda_graph(key_cache)) {
    const int64_t hi = slot_mapping.max().item<int64_t>();
    TORCH_CHECK_INDEX(hi < num_slots, op, ": slot ", hi, " is out of range for a cache of ", num_slots,
                      " slots (negative slots mean padding)");
  }
  ReshapeAndCacheParams p;
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_token_stride = key.stride(0);
  p.key_head_stride = key.stride(1);
  p.value_token_stride = value.stride(0);
  p.value_head_stride = value.stride(1);
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.cache = c;
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.num_tokens = key.size(0);
  p.element_size = key.element_size();
  TK_LAUNCH(key_cache, reshape_and_cache, p);
}

// (n, 2) int64 pairs (src, dst): src ids in [0, src_blocks), dst ids in
// [0, dst_blocks); with `in_place` (one cache), no block may be written twice
// or be both read and written, so the pairs can run in any order.
void check_mapping(const char* op, const at::Tensor& mapping, int64_t src_blocks, int64_t dst_blocks, bool in_place) {
  TORCH_CHECK_TYPE(mapping.scalar_type() == at::kLong, op, ": block_mapping must be int64, got ",
                   mapping.scalar_type());
  TORCH_CHECK_VALUE(mapping.dim() == 2 && mapping.size(1) == 2, op,
                    ": block_mapping must be (num_pairs, 2) pairs of (src, dst), got ", mapping.sizes());
  TORCH_CHECK_VALUE(mapping.device().is_cpu(), op, ": block_mapping must be a CPU tensor");
  const at::Tensor m = mapping.contiguous();
  const int64_t* v = m.data_ptr<int64_t>();
  std::vector<char> written(static_cast<size_t>(dst_blocks), 0), read(static_cast<size_t>(src_blocks), 0);
  for (int64_t i = 0; i < m.size(0); ++i) {
    const int64_t src = v[2 * i], dst = v[2 * i + 1];
    TORCH_CHECK_INDEX(src >= 0 && src < src_blocks && dst >= 0 && dst < dst_blocks, op, ": block_mapping[", i,
                      "] = (", src, ", ", dst, ") is outside the caches' blocks (", src_blocks, " and ", dst_blocks,
                      ")");
    if (in_place) {
      TORCH_CHECK_VALUE(!written[dst]++, op, ": block ", dst, " is a destination twice");
      read[src] = 1;
    }
  }
  if (in_place)
    for (int64_t i = 0; i < m.size(0); ++i)
      TORCH_CHECK_VALUE(!read[v[2 * i + 1]], op, ": block ", v[2 * i + 1], " is both a source and a destination");
}

void copy_blocks(at::TensorList key_caches, at::TensorList value_caches, const at::Tensor& block_mapping) {
  const char* op = "copy_blocks";
  TORCH_CHECK_VALUE(!key_caches.empty() && key_caches.size() == value_caches.size(), op,
                    ": key_caches and value_caches must be non-empty lists of the same length");
  const CacheLayout c = check_cache(op, key_caches[0], "key_caches[0]");
  std::vector<void*> bases;
  for (size_t i = 0; i < key_caches.size(); ++i) {
    for (const at::Tensor* t : {&key_caches[i], &value_caches[i]}) {
      check_pair(op, key_caches[0], *t);
      TORCH_CHECK_VALUE(t->is_contiguous(), op, ": caches must be contiguous");
      check_same_device(*t, key_caches[0], op, "every cache", "key_caches[0]");
      bases.push_back(t->data_ptr());
    }
  }
  check_mapping(op, block_mapping, c.num_blocks, c.num_blocks, /*in_place=*/true);
  const at::Tensor m = block_mapping.contiguous();
  CopyBlocksParams p;
  p.caches = bases.data();
  p.num_caches = static_cast<int64_t>(bases.size());
  p.mapping = m.data_ptr<int64_t>();
  p.num_pairs = m.size(0);
  p.block_bytes = c.block_stride * key_caches[0].element_size();
  at::Tensor device_bases, device_mapping;  // what a CUDA kernel reads
  if (key_caches[0].is_cuda()) {
    std::vector<int64_t> words;
    for (void* b : bases) words.push_back(static_cast<int64_t>(reinterpret_cast<intptr_t>(b)));
    device_bases = at::tensor(words, at::kLong).to(key_caches[0].device());
    device_mapping = m.to(key_caches[0].device());
    p.caches = reinterpret_cast<void* const*>(device_bases.data_ptr<int64_t>());
    p.mapping = device_mapping.data_ptr<int64_t>();
  }
  TK_LAUNCH(key_caches[0], copy_blocks, p);
}

// Blocks between two caches of one shape but any devices (offload / reload).
void swap_blocks(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& block_mapping) {
  const char* op = "swap_blocks";
  TORCH_CHECK_VALUE(src.dim() >= 1 && dst.dim() == src.dim() && src.sizes().slice(1) == dst.sizes().slice(1), op,
                    ": src and dst must be caches with the same block shape, got ", src.sizes(), " and ",
                    dst.sizes());
  check_same_dtype(dst, src, op, "dst", "src");
  check_writable(dst, op, "dst");
  check_mapping(op, block_mapping, src.size(0), dst.size(0), /*in_place=*/false);
  const at::Tensor m = block_mapping.contiguous();
  const at::Tensor src_ids = m.select(1, 0).to(src.device());
  const at::Tensor dst_ids = m.select(1, 1).to(dst.device());
  // Into host memory the copy must be blocking: a non-blocking device-to-host
  // copy returns before the data lands, and index_copy_ on the CPU would run
  // at once on what is not there yet. Into a GPU it is ordered on the stream.
  const bool to_host = dst.is_cpu();
  dst.index_copy_(0, dst_ids, src.index_select(0, src_ids).to(dst.device(), /*non_blocking=*/!to_host));
}

// Every sequence's length within its table row, and every block it uses a
// block of the cache; returns the longest length. Reads both on the host.
int64_t check_seq_lens_and_table(const char* op, const at::Tensor& seq_lens, const at::Tensor& block_table,
                                 const CacheLayout& c) {
  const at::Tensor lens_host = seq_lens.cpu(), table_host = block_table.cpu();  // no copy on CPU
  const int32_t* lens = lens_host.data_ptr<int32_t>();
  const int32_t* table = table_host.data_ptr<int32_t>();
  const int64_t capacity = block_table.size(1) * c.block_size;
  int64_t longest = 0;
  for (int64_t s = 0; s < seq_lens.size(0); ++s) {
    TORCH_CHECK_VALUE(lens[s] >= 0 && lens[s] <= capacity, op, ": seq_lens[", s, "] = ", lens[s],
                      " must be in [0, ", capacity, "] (max_blocks x block_size)");
    for (int64_t b = 0; b < (lens[s] + c.block_size - 1) / c.block_size; ++b) {
      const int32_t id = table[s * table_host.stride(0) + b];  // the copy may be packed tighter
      TORCH_CHECK_INDEX(id >= 0 && id < c.num_blocks, op, ": block_table[", s, ", ", b, "] = ", id,
                        " is not a block of the cache [0, ", c.num_blocks, ")");
    }
    longest = std::max<int64_t>(longest, lens[s]);
  }
  return longest;
}

std::tuple<at::Tensor, at::Tensor> paged_attention(const at::Tensor& q, const at::Tensor& key_cache,
                                                   const at::Tensor& value_cache, const at::Tensor& block_table,
                                                   const at::Tensor& seq_lens, double softmax_scale,
                                                   int64_t window_left, int64_t window_right, double softcap,
                                                   const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "paged_attention";
  const CacheLayout c = check_cache(op, key_cache, "key_cache");
  check_pair(op, key_cache, value_cache);
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be (num_seqs, heads, head_dim), got shape ", q.sizes());
  check_not_empty(q, op, "q");
  const DType dtype = kernel_dtype(q, op, "q");
  check_same_dtype(key_cache, q, op, "key_cache", "q");
  check_same_device(key_cache, q, op, "key_cache", "q");
  TORCH_CHECK_VALUE(q.size(2) == c.head_dim, op, ": q's head_dim ", q.size(2), " differs from the cache's ",
                    c.head_dim);
  TORCH_CHECK_VALUE(c.head_dim <= 256, op, ": head_dim must be at most 256, got ", c.head_dim);
  TORCH_CHECK_VALUE(q.size(1) % c.heads_k == 0, op, ": the heads of q (", q.size(1),
                    ") must be a multiple of the cache's kv heads (", c.heads_k, ")");
  TORCH_CHECK_VALUE(q.stride(-1) == 1, op, ": q must be contiguous in head_dim");
  const int64_t seqs = q.size(0);
  TORCH_CHECK_TYPE(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, op,
                   ": block_table and seq_lens must be int32, got ", block_table.scalar_type(), " and ",
                   seq_lens.scalar_type());
  check_same_device(block_table, q, op, "block_table", "q");
  check_same_device(seq_lens, q, op, "seq_lens", "q");
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == seqs && block_table.stride(1) == 1, op,
                    ": block_table must be (num_seqs, max_blocks) = (", seqs, ", ...) with contiguous rows, got ",
                    block_table.sizes());
  TORCH_CHECK_VALUE(seq_lens.dim() == 1 && seq_lens.size(0) == seqs && seq_lens.is_contiguous(), op,
                    ": seq_lens must be a contiguous (num_seqs,) tensor, got ", seq_lens.sizes());
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && std::isfinite(softcap) && softcap >= 0.0, op,
                    ": softmax_scale must be finite and softcap >= 0");
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op, ": window sizes must be >= 0 or -1");
  TORCH_CHECK_VALUE(block_table.size(1) >= 1, op, ": block_table must have at least one column");
  // Every block a sequence uses must exist: never read outside the cache.
  // Under CUDA graph capture the values can't be read here: the kernel keeps
  // its reads in bounds instead (paged_attention.h) and the split plan is
  // sized for full table rows.
  int64_t longest = block_table.size(1) * c.block_size;
  if (!capturing_cuda_graph(q)) longest = check_seq_lens_and_table(op, seq_lens, block_table, c);
  PagedAttnParams p;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32");
    TORCH_CHECK_VALUE(a.dim() == 1 && a.size(0) == q.size(1) && a.is_contiguous(), op,
                      ": alibi_slopes must be a contiguous (heads,) tensor, got ", a.sizes());
    check_same_device(a, q, op, "alibi_slopes", "q");
    p.alibi_slopes = a.data_ptr<float>();
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({seqs, q.size(1)}, q.options().dtype(at::kFloat));
  p.q = q.data_ptr();
  p.q_seq_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.cache = c;
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_stride = block_table.stride(0);
  p.max_blocks = block_table.size(1);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_seq_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.lse_seq_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  p.num_seqs = seqs;
  p.heads = q.size(1);
  p.max_seq_len = longest;
  p.scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = window_left;
  p.window_right = window_right;
  p.dtype = dtype;
  at::Tensor partial_out, partial_lse;  // CUDA split-KV workspace
#ifdef TORCHKILN_WITH_CUDA
  if (q.is_cuda()) {
    TORCH_CHECK_VALUE(c.head_dim % 8 == 0, op, ": head_dim must be a multiple of 8 on CUDA, got ", c.head_dim);
    for (const at::Tensor* t : {&key_cache, &value_cache})
      TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && c.block_stride % 8 == 0 &&
                            c.pos_stride % 8 == 0 && c.head_stride % 8 == 0,
                        op, ": CUDA caches must start 16-byte aligned with strides that are multiples of 8, got ",
                        t->strides());
    paged_attention_cuda_plan(p);
    if (p.num_splits > 1) {
      partial_out = at::empty({seqs, p.heads, p.num_splits, c.head_dim}, q.options().dtype(at::kFloat));
      partial_lse = at::empty({seqs, p.heads, p.num_splits}, q.options().dtype(at::kFloat));
      p.partial_out = partial_out.data_ptr<float>();
      p.partial_lse = partial_lse.data_ptr<float>();
    }
  }
#endif
  TK_LAUNCH(q, paged_attention, p);
  return {out, lse};
}

void register_impls(torch::Library& m) {
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("copy_blocks", &copy_blocks);
  m.impl("paged_attention", &paged_attention);
}

}  // namespace

TK_REGISTER_IMPLS(register_impls)
// swap_blocks moves data between devices with ATen copies, so one
// implementation serves every backend.
TORCH_LIBRARY_IMPL(torchkiln, CompositeExplicitAutograd, m) { m.impl("swap_blocks", &swap_blocks); }

}  // namespace torchkiln
