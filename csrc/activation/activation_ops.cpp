// Torch glue for the SwiGLU gate.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "activation/silu_and_mul.h"
#include "common/op_checks.h"
#include "common/op_registration.h"

namespace torchkiln {
namespace {

// Returns d (half the last dim of x) after checking x.
int64_t check_gate_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  check_not_empty(x, op, "x");
  kernel_dtype(x, op, "x");
  TORCH_CHECK_VALUE(x.size(-1) % 2 == 0, op, ": the last dim of x holds [gate, up] and must be even, got ",
                    x.size(-1));
  return x.size(-1) / 2;
}

std::vector<int64_t> half_last(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() /= 2;
  return shape;
}

void launch_forward(const char* op, const at::Tensor& out, const at::Tensor& x) {
  const int64_t d = check_gate_input(op, x);
  SiluAndMulParams p;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x, op, "x");
  p.out = out.data_ptr();
  p.out_row_stride = row_stride(out, op, "out");
  p.rows = x.numel() / x.size(-1);
  p.d = d;
  p.dtype = kernel_dtype(x, op, "x");
  TK_LAUNCH(x, silu_and_mul_fwd, p);
}

// x is only read, so every variant takes it in any layout, as F.silu does
// (rows that do not flatten into one stride are copied first); out, which
// is written, must have evenly strided rows.
at::Tensor silu_and_mul(const at::Tensor& x_arg) {
  check_gate_input("silu_and_mul", x_arg);
  const at::Tensor x = with_flat_rows(x_arg);
  at::Tensor out = at::empty(half_last(x), x.options());
  launch_forward("silu_and_mul", out, x);
  return out;
}

// Writes into a caller-provided buffer (no allocation on the hot path).
void silu_and_mul_out(const at::Tensor& out, const at::Tensor& x_arg) {
  const char* op = "silu_and_mul_out";
  check_gate_input(op, x_arg);
  check_same_dtype(out, x_arg, op, "out", "x");
  check_same_device(out, x_arg, op, "out", "x");
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(half_last(x_arg)), op, ": out must have shape ",
                    at::IntArrayRef(half_last(x_arg)), ", got ", out.sizes());
  check_writable(out, op, "out");
  check_no_overlap(out, x_arg, op, "out", "x");
  launch_forward(op, out, with_flat_rows(x_arg));
}

at::Tensor silu_and_mul_backward(const at::Tensor& grad_out_arg, const at::Tensor& x_arg) {
  const char* op = "silu_and_mul_backward";
  const at::Tensor grad_out = with_flat_rows(grad_out_arg), x = with_flat_rows(x_arg);
  const int64_t d = check_gate_input(op, x);
  check_same_dtype(grad_out, x, op, "grad_out", "x");
  check_same_device(grad_out, x, op, "grad_out", "x");
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(half_last(x)), op, ": grad_out must have shape ",
                    at::IntArrayRef(half_last(x)), ", got ", grad_out.sizes());
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  SiluAndMulBwdParams p;
  p.grad_out = grad_out.data_ptr();
  p.grad_out_row_stride = row_stride(grad_out, op, "grad_out");
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x, op, "x");
  p.grad_x = grad_x.data_ptr();
  p.grad_x_row_stride = 2 * d;
  p.rows = x.numel() / x.size(-1);
  p.d = d;
  p.dtype = kernel_dtype(x, op, "x");
  TK_LAUNCH(x, silu_and_mul_bwd, p);
  return grad_x;
}

void register_impls(torch::Library& m) {
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("silu_and_mul_out", &silu_and_mul_out);
  m.impl("silu_and_mul_backward", &silu_and_mul_backward);
}

}  // namespace

TK_REGISTER_IMPLS(register_impls)

}  // namespace torchkiln
