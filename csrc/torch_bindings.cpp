// THE list of torchkiln op schemas. Implementations register per device in
// each family's *_ops.cpp; fake (meta) kernels and autograd formulas live in
// python/torchkiln/ops/<family>.py.
//
// Conventions: ops that update an argument in place end in `_`, mark it
// `Tensor(a!)` and return what they newly allocate (or `()`); functional
// twins exist where autograd needs them.
#include <torch/library.h>

TORCH_LIBRARY(torchkiln, m) {
  // ---- norm: RMSNorm (+ fused residual add) -------------------------------
  // out = x * rsqrt(mean(x^2, -1) + eps) * weight
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // s = x + residual; returns (rms_norm(s), s)
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // residual <- x + residual in place; returns rms_norm(residual)
  m.def("fused_add_rms_norm_(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  // (grad_x [+ grad_residual], grad_weight) for rms_norm evaluated at x
  m.def(
      "rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps, Tensor? grad_residual) "
      "-> (Tensor, Tensor)");

  // ---- rope: rotary position embedding ------------------------------------
  // x: (tokens, heads, head_dim) or (batch, seq, heads, head_dim); inverse rotates by -theta
  m.def(
      "rotary_embedding(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, "
      "bool inverse) -> Tensor");
  // q and (optionally) k rotated in place
  m.def(
      "rotary_embedding_(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, Tensor positions, "
      "bool interleaved) -> ()");

  // ---- activation: SwiGLU gate --------------------------------------------
  // silu(x[..., :d]) * x[..., d:]
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("silu_and_mul_backward(Tensor grad_out, Tensor x) -> Tensor");
}
