// Torch glue for rotary embeddings: checks, layout -> strides, launch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/op_checks.h"
#include "common/op_registration.h"
#include "rope/rotary.h"

namespace torchkiln {
namespace {

// Fills the parts of RotaryParams that depend on cos/sin/positions and on the
// layout of x: (tokens, heads, head_dim) or (batch, seq, heads, head_dim).
RotaryParams rotary_params(const char* op, const at::Tensor& x, const char* xname, const at::Tensor& cos,
                           const at::Tensor& sin, const at::Tensor& positions, bool interleaved) {
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4, op, ": ", xname,
                    " must be (tokens, heads, head_dim) or (batch, seq, heads, head_dim), got shape ", x.sizes());
  check_not_empty(x, op, xname);
  const DType dtype = kernel_dtype(x, op, xname);
  const int64_t head_dim = x.size(-1);
  TORCH_CHECK_VALUE(head_dim % 2 == 0, op, ": head_dim (last dim of ", xname, ") must be even, got ", head_dim);
  TORCH_CHECK_VALUE(x.stride(-1) == 1, op, ": ", xname, " must be contiguous in head_dim, got strides ",
                    x.strides());

  TORCH_CHECK_VALUE(cos.dim() == 2 && cos.sizes() == sin.sizes(), op,
                    ": cos and sin must both be (max_position, rot_dim / 2), got ", cos.sizes(), " and ",
                    sin.sizes());
  check_not_empty(cos, op, "cos");
  check_same_dtype(sin, cos, op, "sin", "cos");
  TORCH_CHECK_TYPE(cos.scalar_type() == at::kFloat || cos.scalar_type() == x.scalar_type(), op,
                   ": cos/sin must be float32 or the dtype of ", xname, " (", x.scalar_type(), "), got ",
                   cos.scalar_type());
  check_same_device(cos, x, op, "cos", xname);
  check_same_device(sin, x, op, "sin", xname);
  TORCH_CHECK_VALUE(cos.is_contiguous() && sin.is_contiguous(), op, ": cos and sin must be contiguous");
  const int64_t rot_dim = 2 * cos.size(1);
  TORCH_CHECK_VALUE(rot_dim <= head_dim, op, ": rot_dim = 2 * cos.size(1) = ", rot_dim,
                    " exceeds head_dim = ", head_dim);

  const at::IntArrayRef token_shape = x.sizes().slice(0, x.dim() - 2);
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ",
                   positions.scalar_type());
  check_same_device(positions, x, op, "positions", xname);
  TORCH_CHECK_VALUE(positions.sizes() == token_shape, op, ": positions must have shape ", token_shape,
                    " (the token dims of ", xname, "), got ", positions.sizes());
  if (!positions.is_cuda()) {
    // A device-side check would cost a sync per call; CUDA kernels skip such
    // tokens instead of reading out of bounds.
    auto [lo, hi] = at::aminmax(positions);
    TORCH_CHECK_INDEX(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < cos.size(0), op,
                      ": positions must lie in [0, ", cos.size(0), "), got values in [", lo.item<int64_t>(),
                      ", ", hi.item<int64_t>(), "]");
  }

  RotaryParams p;
  const bool batched = x.dim() == 4;
  p.batch = batched ? x.size(0) : 1;
  p.seq_len = batched ? x.size(1) : x.size(0);
  p.heads = x.size(-2);
  p.head_dim = head_dim;
  p.rot_dim = rot_dim;
  p.in = x.data_ptr();
  p.in_batch_stride = batched ? x.stride(0) : 0;
  p.in_seq_stride = x.stride(batched ? 1 : 0);
  p.in_head_stride = x.stride(-2);
  p.positions = positions.data_ptr<int64_t>();
  p.pos_batch_stride = batched ? positions.stride(0) : 0;
  p.pos_seq_stride = positions.stride(batched ? 1 : 0);
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.cs_row_stride = cos.size(1);
  p.max_position = cos.size(0);
  p.interleaved = interleaved;
  p.dtype = dtype;
  p.cs_dtype = cos.scalar_type() == at::kFloat ? DType::kFloat32 : dtype;
  return p;
}

void set_out(RotaryParams& p, const at::Tensor& out) {
  const bool batched = out.dim() == 4;
  p.out = out.data_ptr();
  p.out_batch_stride = batched ? out.stride(0) : 0;
  p.out_seq_stride = out.stride(batched ? 1 : 0);
  p.out_head_stride = out.stride(-2);
}

at::Tensor rotary_embedding(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& positions, bool interleaved, bool inverse) {
  RotaryParams p = rotary_params("rotary_embedding", x, "x", cos, sin, positions, interleaved);
  p.inverse = inverse;
  at::Tensor out = at::empty(x.sizes(), x.options());
  set_out(p, out);
  TK_LAUNCH(x, rotary_fwd, p);
  return out;
}

void rotary_embedding_(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& positions, bool interleaved) {
  const char* op = "rotary_embedding_";
  RotaryParams pq = rotary_params(op, q, "q", cos, sin, positions, interleaved);
  check_writable(q, op, "q");
  std::optional<RotaryParams> pk;
  if (k.has_value()) {
    pk = rotary_params(op, *k, "k", cos, sin, positions, interleaved);
    check_writable(*k, op, "k");
    check_same_dtype(*k, q, op, "k", "q");
    TORCH_CHECK_VALUE(k->dim() == q.dim() && k->size(-1) == q.size(-1), op,
                      ": k must have the same rank and head_dim as q, got ", k->sizes(), " and ", q.sizes());
    check_no_overlap(*k, q, op, "k", "q");
  }
  set_out(pq, q);
  TK_LAUNCH(q, rotary_fwd, pq);
  if (pk) {
    set_out(*pk, *k);
    TK_LAUNCH(*k, rotary_fwd, *pk);
  }
}

void register_impls(torch::Library& m) {
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("rotary_embedding_", &rotary_embedding_);
}

}  // namespace

TK_REGISTER_IMPLS(register_impls)

}  // namespace torchkiln
