// Torch glue for fused attention: argument checks, layouts -> params, launch
// (CPU kernels per ISA, or the CUDA kernels for bf16 / fp16).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "attention/flash_attn.h"
#include "common/op_checks.h"
#include "common/op_registration.h"

namespace torchkiln {
namespace {

constexpr int64_t kMaxHeadDim = 256;

// The CUDA kernels read 16-byte rows with cp.async: the head_dim must be one
// they were instantiated for, the base 16-byte aligned, the strides multiples
// of 8 elements. Anything else is copied (zero-padded in head_dim) first.
bool cuda_kernel_ready(const at::Tensor& t, int64_t head_dim) {
  if (t.size(-1) != head_dim || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  return true;
}

at::Tensor cuda_kernel_operand(const at::Tensor& t, int64_t head_dim) {
  if (cuda_kernel_ready(t, head_dim)) return t;
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = head_dim;
  at::Tensor padded = at::zeros(shape, t.options());
  padded.narrow(-1, 0, t.size(-1)).copy_(t);
  return padded;
}

// The tensors the kernels read: the caller's q, k, v on CPU; on CUDA possibly
// padded / aligned copies, with the head_dim the kernel runs at.
struct KernelOperands {
  at::Tensor q, k, v;
  int64_t head_dim = 0;
  at::Tensor prepare(const at::Tensor& t) const { return q.is_cuda() ? cuda_kernel_operand(t, head_dim) : t; }
  // Output of the kernel at head_dim columns -> the caller's head_dim.
  at::Tensor restore(const at::Tensor& t, int64_t caller_head_dim) const {
    return t.size(-1) == caller_head_dim ? t : t.narrow(-1, 0, caller_head_dim).contiguous();
  }
};

KernelOperands kernel_operands(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (!q.is_cuda()) return {q, k, v, q.size(-1)};
  TORCH_CHECK_TYPE(q.scalar_type() != at::kFloat, op,
                   ": the CUDA kernels take bfloat16 or float16 q, k and v, got float32 (cast them, or run on CPU)");
  TORCH_CHECK_VALUE(q.size(-1) % 8 == 0, op, ": head_dim must be a multiple of 8 on CUDA, got ", q.size(-1));
  const int64_t d = flash_attn_cuda_head_dim(q.size(-1));
  return {cuda_kernel_operand(q, d), cuda_kernel_operand(k, d), cuda_kernel_operand(v, d), d};
}

FlashAttnTensor view_of(const at::Tensor& t, bool varlen) {
  FlashAttnTensor v;
  v.ptr = t.data_ptr();
  v.batch_stride = varlen ? 0 : t.stride(0);
  v.row_stride = t.stride(-3);
  v.head_stride = t.stride(-2);
  return v;
}

// Checks shared by both layouts; returns the params without sequence info.
FlashAttnParams common_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
                              const std::optional<at::Tensor>& alibi_slopes, int64_t batch, bool varlen,
                              bool paged = false) {
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "(total_tokens, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  if (paged) {
    TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be (total_tokens, heads, head_dim), got shape ", q.sizes());
    TORCH_CHECK_VALUE(k.dim() == 4 && v.dim() == 4, op,
                      ": with a block_table, k and v must be caches (num_blocks, block_size, num_kv_heads, "
                      "head_dim), got shapes ",
                      k.sizes(), " and ", v.sizes());
  } else {
    TORCH_CHECK_VALUE(q.dim() == rank && k.dim() == rank && v.dim() == rank, op, ": q, k and v must be ", layout,
                      ", got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  }
  const DType dtype = kernel_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  check_same_device(k, q, op, "k", "q");
  check_same_device(v, q, op, "v", "q");
  check_not_empty(q, op, "q");
  check_not_empty(k, op, "k");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  const int64_t D = q.size(-1), H = q.size(-2), Hk = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == D, op, ": k and v must have q's head_dim ", D, ", got ", k.size(-1));
  TORCH_CHECK_VALUE(D <= kMaxHeadDim, op, ": head_dim must be at most ", kMaxHeadDim, ", got ", D);
  TORCH_CHECK_VALUE(H % Hk == 0, op, ": the heads of q (", H, ") must be a multiple of the heads of k and v (",
                    Hk, ")");
  if (!varlen)
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": k and v must have q's batch size ", q.size(0), ", got ",
                      k.size(0));
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}})
    TORCH_CHECK_VALUE(t->stride(-1) == 1, op, ": ", name, " must be contiguous in head_dim, got strides ",
                      t->strides());
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ", softmax_scale);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be >= 0, got ", softcap);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op,
                    ": window sizes must be >= 0, or -1 for unbounded, got (", window_left, ", ", window_right, ")");

  FlashAttnParams p;
  p.q = view_of(q, varlen);
  p.k = view_of(k, varlen);
  p.v = view_of(v, varlen);
  p.batch = batch;
  p.heads = H;
  p.heads_k = Hk;
  p.head_dim = D;
  p.scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = window_left;
  p.window_right = window_right;
  p.dtype = dtype;
  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32, got ", a.scalar_type());
    check_same_device(a, q, op, "alibi_slopes", "q");
    const bool per_batch = a.dim() == 2;
    TORCH_CHECK_VALUE((a.dim() == 1 && a.size(0) == H) || (per_batch && a.size(0) == batch && a.size(1) == H), op,
                      ": alibi_slopes must be (heads,) = (", H, ",) or (batch, heads) = (", batch, ", ", H,
                      "), got ", a.sizes());
    TORCH_CHECK_VALUE(a.is_contiguous(), op, ": alibi_slopes must be contiguous");
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = per_batch ? H : 0;
  }
  return p;
}

// Points the params at the kernel operands (same tensors on CPU).
void use_operands(FlashAttnParams& p, const KernelOperands& o, bool varlen) {
  p.q = view_of(o.q, varlen);
  p.k = view_of(o.k, varlen);
  p.v = view_of(o.v, varlen);
  p.head_dim = o.head_dim;
  if (p.block_table != nullptr) {  // paged caches: batch_stride is the block stride
    p.k.batch_stride = o.k.stride(0);
    p.v.batch_stride = o.v.stride(0);
  }
}

FlashAttnOutput output_of(const at::Tensor& t, bool varlen) {
  FlashAttnOutput o;
  o.ptr = t.data_ptr();
  o.batch_stride = varlen ? 0 : t.stride(0);
  o.row_stride = t.stride(-3);
  o.head_stride = t.stride(-2);
  return o;
}

// The scratch a CUDA forward asks for (split-KV partials of a one-query
// batch), pointed to by p.workspace; undefined when none.
at::Tensor forward_workspace(const at::Tensor& q, FlashAttnParams& p) {
#ifdef TORCHKILN_WITH_CUDA
  if (q.is_cuda()) {
    const c10::DeviceGuard guard(q.device());  // the plan reads this GPU's SM count
    const int64_t floats = flash_attn_fwd_cuda_workspace(p);
    if (floats > 0) {
      at::Tensor w = at::empty({floats}, q.options().dtype(at::kFloat));
      p.workspace = w.data_ptr<float>();
      return w;
    }
  }
#endif
  return {};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  double softmax_scale, int64_t window_left,
                                                  int64_t window_right, double softcap,
                                                  const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "flash_attn_fwd";
  FlashAttnParams p = common_params(op, q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                                    q.dim() == 4 ? q.size(0) : 0, /*varlen=*/false);
  p.seqlen_q = q.size(1);
  p.seqlen_k = k.size(1);
  const KernelOperands ops = kernel_operands(op, q, k, v);
  use_operands(p, ops, false);
  at::Tensor out = at::empty(ops.q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), p.heads, p.seqlen_q}, q.options().dtype(at::kFloat));
  p.out = output_of(out, false);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = p.heads * p.seqlen_q;
  p.lse_head_stride = p.seqlen_q;
  const at::Tensor workspace = forward_workspace(q, p);
  TK_LAUNCH(q, flash_attn_fwd, p);
  return {ops.restore(out, q.size(-1)), lse};
}

// cu_seqlens: dtype, device and shape (its values: below).
void check_cu_seqlens_tensor(const char* op, const at::Tensor& cu, const char* name, int64_t batch,
                             const at::Tensor& q) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  check_same_device(cu, q, op, name, "q");
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) == batch + 1 && cu.is_contiguous(), op, ": ", name,
                    " must be a contiguous (batch + 1,) = (", batch + 1, ",) tensor, got ", cu.sizes());
}

// cu_seqlens' values (a host copy); returns the longest sequence.
// total < 0: the last entry is not tied to a tensor's size (paged keys).
int64_t check_cu_seqlens_values(const char* op, const at::Tensor& host, const char* name, int64_t batch,
                                int64_t total) {
  const int32_t* c = host.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], op, ": ", name, " must be non-decreasing, but ", name, "[", b + 1,
                      "] = ", c[b + 1], " < ", c[b]);
    longest = std::max<int64_t>(longest, c[b + 1] - c[b]);
  }
  TORCH_CHECK_VALUE(total < 0 || c[batch] == total, op, ": ", name,
                    "[-1] must equal the number of packed tokens ", total, ", got ", c[batch]);
  return longest;
}

// Paged keys: the table's dtype, device and shape; the kernel's view of it.
void check_block_table_tensor(const char* op, const at::Tensor& table, const at::Tensor& k, const at::Tensor& v,
                              FlashAttnParams& p) {
  TORCH_CHECK_TYPE(table.scalar_type() == at::kInt, op, ": block_table must be int32, got ", table.scalar_type());
  check_same_device(table, k, op, "block_table", "k");
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == p.batch && table.stride(1) == 1, op,
                    ": block_table must be (batch, max_blocks) = (", p.batch, ", ...) with contiguous rows, got ",
                    table.sizes());
  p.block_table = table.data_ptr<int32_t>();
  p.block_table_stride = table.stride(0);
  p.block_table_cols = table.size(1);
  p.num_blocks = k.size(0);
  p.block_size = k.size(1);
  p.k.batch_stride = k.stride(0);
  p.v.batch_stride = v.stride(0);
}

// Paged keys: every block a sequence needs must exist in the cache (host
// copies of cu_seqlens_k and the table).
void check_block_table_values(const char* op, const at::Tensor& table_host, const at::Tensor& cu_k_host,
                              const FlashAttnParams& p) {
  const int32_t* c = cu_k_host.data_ptr<int32_t>();
  const int32_t* t = table_host.data_ptr<int32_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t need = (c[b + 1] - c[b] + p.block_size - 1) / p.block_size;
    TORCH_CHECK_VALUE(need <= p.block_table_cols, op, ": sequence ", b, " has ", c[b + 1] - c[b],
                      " keys, more than ", p.block_table_cols, " blocks of ", p.block_size, " hold");
    for (int64_t i = 0; i < need; ++i) {
      const int32_t id = t[b * table_host.stride(0) + i];  // a host copy may be packed tighter
      TORCH_CHECK_INDEX(id >= 0 && id < p.num_blocks, op, ": block_table[", b, ", ", i, "] = ", id,
                        " is not a block of the cache [0, ", p.num_blocks, ")");
    }
  }
}

// Host copies of int32 tensors for the checks that read values: CPU tensors
// as they are; CUDA ones gathered into one buffer and copied in one
// transfer, so a call synchronises with the device once, not once per tensor.
std::vector<at::Tensor> on_host_together(const std::vector<at::Tensor>& ts) {
  if (!ts.front().is_cuda()) return ts;
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : ts) flat.push_back(t.reshape({-1}));  // a strided table is copied packed
  const at::Tensor host = at::cat(flat).cpu();
  std::vector<at::Tensor> out;
  int64_t at = 0;
  for (const at::Tensor& t : ts) {
    out.push_back(host.narrow(0, at, t.numel()).view(t.sizes()));
    at += t.numel();
  }
  return out;
}

// The varlen checks. Values (cu_seqlens, the table's ids) are read on the
// host, in one transfer; while a CUDA graph is being captured, reading
// device memory would break the capture: then only the tensors themselves
// are checked, the grids are planned for the caller's maxima, and the
// kernels clamp the offsets and ids they read (common/cuda/packed_span.cuh).
FlashAttnParams varlen_params(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                              int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
                              double softcap, const std::optional<at::Tensor>& alibi_slopes,
                              const std::optional<at::Tensor>& block_table = std::nullopt) {
  TORCH_CHECK_VALUE(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 2, op,
                    ": cu_seqlens_q must be (batch + 1,) with batch >= 1, got ", cu_seqlens_q.sizes());
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  const bool paged = block_table.has_value();
  FlashAttnParams p = common_params(op, q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                                    batch, /*varlen=*/true, paged);
  check_cu_seqlens_tensor(op, cu_seqlens_q, "cu_seqlens_q", batch, q);
  check_cu_seqlens_tensor(op, cu_seqlens_k, "cu_seqlens_k", batch, q);
  if (paged) check_block_table_tensor(op, *block_table, k, v, p);
  int64_t longest_q = max_seqlen_q, longest_k = max_seqlen_k;
  if (capturing_cuda_graph(q)) {
    // Captured: the kernels cut any sequence longer than the maxima at every replay.
    TORCH_CHECK_VALUE(max_seqlen_q >= 1 && max_seqlen_k >= 1, op,
                      ": max_seqlen_q and max_seqlen_k must be at least 1 while a CUDA graph is captured, got (",
                      max_seqlen_q, ", ", max_seqlen_k, ")");
  } else {
    std::vector<at::Tensor> values{cu_seqlens_q, cu_seqlens_k};
    if (paged) values.push_back(*block_table);
    values = on_host_together(values);
    longest_q = check_cu_seqlens_values(op, values[0], "cu_seqlens_q", batch, q.size(0));
    longest_k = check_cu_seqlens_values(op, values[1], "cu_seqlens_k", batch, paged ? -1 : k.size(0));
    if (paged) check_block_table_values(op, values[2], values[1], p);
  }
  TORCH_CHECK_VALUE(max_seqlen_q >= longest_q && max_seqlen_k >= longest_k, op,
                    ": max_seqlen_q / max_seqlen_k (", max_seqlen_q, ", ", max_seqlen_k,
                    ") must be at least the longest sequences (", longest_q, ", ", longest_k, ")");
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.seqlen_q = longest_q;
  p.seqlen_k = longest_k;
  p.total_q = q.size(0);
  p.total_k = paged ? 0 : k.size(0);
  return p;
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    const std::optional<at::Tensor>& block_table) {
  const char* op = "flash_attn_varlen_fwd";
  FlashAttnParams p = varlen_params(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    softmax_scale, window_left, window_right, softcap, alibi_slopes, block_table);
  const KernelOperands ops = kernel_operands(op, q, k, v);
  use_operands(p, ops, true);
  at::Tensor out = at::empty(ops.q.sizes(), q.options());
  at::Tensor lse = at::empty({p.heads, q.size(0)}, q.options().dtype(at::kFloat));
  p.out = output_of(out, true);
  p.lse = lse.data_ptr<float>();
  p.lse_head_stride = q.size(0);
  const at::Tensor workspace = forward_workspace(q, p);
  TK_LAUNCH(q, flash_attn_fwd, p);
  return {ops.restore(out, q.size(-1)), lse};
}

// Checks the forward's saved tensors and the incoming gradient, allocates the
// gradients and fills the backward params (forward params already set).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const char* op, FlashAttnParams& p, bool varlen,
                                                            const at::Tensor& dout, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse) {
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&out, "out"}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ",
                      t->sizes());
    check_same_dtype(*t, q, op, name, "q");
    check_same_device(*t, q, op, name, "q");
    TORCH_CHECK_VALUE(t->stride(-1) == 1, op, ": ", name, " must be contiguous in head_dim");
  }
  const std::vector<int64_t> lse_shape =
      varlen ? std::vector<int64_t>{p.heads, q.size(0)} : std::vector<int64_t>{q.size(0), p.heads, q.size(1)};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape) && lse.scalar_type() == at::kFloat &&
                        lse.is_contiguous(),
                    op, ": lse must be a contiguous float32 tensor of shape ", at::IntArrayRef(lse_shape),
                    ", got ", lse.scalar_type(), " ", lse.sizes());
  check_same_device(lse, q, op, "lse", "q");
  const KernelOperands ops = kernel_operands(op, q, k, v);
  use_operands(p, ops, varlen);
  const at::Tensor out_k = ops.prepare(out), dout_k = ops.prepare(dout);
  at::Tensor dq = at::empty(ops.q.sizes(), q.options());
  at::Tensor dk = at::empty(ops.k.sizes(), k.options());
  at::Tensor dv = at::empty(ops.v.sizes(), v.options());
  FlashAttnBwdParams bp;
  p.out = output_of(out_k, varlen);  // read only in the backward
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = varlen ? 0 : p.heads * q.size(1);
  p.lse_head_stride = varlen ? q.size(0) : q.size(1);
  bp.fwd = p;
  bp.dout = view_of(dout_k, varlen);
  bp.dq = output_of(dq, varlen);
  bp.dk = output_of(dk, varlen);
  bp.dv = output_of(dv, varlen);
  at::Tensor dsum;  // CUDA scratch: rowsum(dout * out) in lse's layout
  if (q.is_cuda()) {
    dsum = at::empty_like(lse);
    bp.dsum = dsum.data_ptr<float>();
  }
  TK_LAUNCH(q, flash_attn_bwd, bp);
  const int64_t d = q.size(-1);
  return {ops.restore(dq, d), ops.restore(dk, d), ops.restore(dv, d)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "flash_attn_bwd";
  FlashAttnParams p = common_params(op, q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes,
                                    q.dim() == 4 ? q.size(0) : 0, /*varlen=*/false);
  p.seqlen_q = q.size(1);
  p.seqlen_k = k.size(1);
  return run_backward(op, p, false, dout, q, k, v, out, lse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "flash_attn_varlen_bwd";
  FlashAttnParams p = varlen_params(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    softmax_scale, window_left, window_right, softcap, alibi_slopes);
  return run_backward(op, p, true, dout, q, k, v, out, lse);
}

void register_impls(torch::Library& m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd);
  m.impl("flash_attn_varlen_fwd", &flash_attn_varlen_fwd);
  m.impl("flash_attn_bwd", &flash_attn_bwd);
  m.impl("flash_attn_varlen_bwd", &flash_attn_varlen_bwd);
}

}  // namespace

TK_REGISTER_IMPLS(register_impls)

}  // namespace torchkiln
