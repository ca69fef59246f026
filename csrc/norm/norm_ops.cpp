// Torch glue for RMSNorm: argument checks, allocation, kernel launch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "common/op_checks.h"
#include "common/op_registration.h"
#include "norm/rms_norm.h"

namespace torchkiln {
namespace {

struct NormShape {
  int64_t rows, hidden;
  DType dtype;
};

NormShape check_norm_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  check_not_empty(x, op, "x");
  const DType dtype = kernel_dtype(x, op, "x");
  check_same_dtype(weight, x, op, "weight", "x");
  check_same_device(weight, x, op, "weight", "x");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape (",
                    x.size(-1), ",) to match the last dimension of x, got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  return {x.numel() / x.size(-1), x.size(-1), dtype};
}

bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
}

void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_dtype(t, x, op, name, "x");
  check_same_device(t, x, op, name, "x");
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have the same shape as x (", x.sizes(),
                    "), got ", t.sizes());
}

RmsNormParams forward_params(const char* op, const at::Tensor& x, const at::Tensor& weight, double eps,
                             const at::Tensor& out) {
  const NormShape s = check_norm_inputs(op, x, weight, eps);
  RmsNormParams p;
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x, op, "x");
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.out_row_stride = row_stride(out, op, "out");
  p.rows = s.rows;
  p.hidden = s.hidden;
  p.eps = static_cast<float>(eps);
  p.dtype = s.dtype;
  return p;
}

// The functional variants read x (and residual, grad_out) in any layout, as
// F.rms_norm does: rows that do not flatten into one stride are copied first.
at::Tensor rms_norm(const at::Tensor& x_arg, const at::Tensor& weight, double eps) {
  const at::Tensor x = with_flat_rows(x_arg);
  at::Tensor out = at::empty(x.sizes(), x.options());
  RmsNormParams p = forward_params("rms_norm", x, weight, eps, out);
  TK_LAUNCH(x, rms_norm_fwd, p);
  return out;
}

// Writes into a caller-provided buffer (no allocation on the hot path).
// out may be x itself: a row is fully read before any of it is written.
// Otherwise x, only read, may come in any layout (copied when it must be).
void rms_norm_out(const at::Tensor& out, const at::Tensor& x_arg, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm_out";
  check_like(op, out, "out", x_arg);
  check_writable(out, op, "out");
  const bool in_place = same_view(out, x_arg);
  if (!in_place) check_no_overlap(out, x_arg, op, "out", "x");
  const at::Tensor x = in_place ? x_arg : with_flat_rows(x_arg);
  RmsNormParams p = forward_params(op, x, weight, eps, out);
  TK_LAUNCH(x, rms_norm_fwd, p);
}

// Functional variant (autograd path): the new residual is a fresh tensor.
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x_arg, const at::Tensor& residual_arg,
                                                      const at::Tensor& weight, double eps) {
  const char* op = "fused_add_rms_norm";
  const at::Tensor x = with_flat_rows(x_arg), residual = with_flat_rows(residual_arg);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor residual_out = at::empty(x.sizes(), x.options());
  RmsNormParams p = forward_params(op, x, weight, eps, out);
  check_like(op, residual, "residual", x);
  p.residual = residual.data_ptr();
  p.residual_row_stride = row_stride(residual, op, "residual");
  p.residual_out = residual_out.data_ptr();
  p.residual_out_row_stride = p.hidden;
  TK_LAUNCH(x, rms_norm_fwd, p);
  return {out, residual_out};
}

// Inference path: residual <- x + residual in place, the norm into `out`
// (x, unless out is x itself, in any layout).
void fused_add_rms_norm_out(const at::Tensor& out, const at::Tensor& x_arg, const at::Tensor& residual,
                            const at::Tensor& weight, double eps) {
  const char* op = "fused_add_rms_norm_out";
  check_like(op, out, "out", x_arg);
  check_like(op, residual, "residual", x_arg);
  check_writable(residual, op, "residual");
  check_writable(out, op, "out");
  check_no_overlap(residual, x_arg, op, "residual", "x");
  check_no_overlap(out, residual, op, "out", "residual");
  const bool in_place = same_view(out, x_arg);
  if (!in_place) check_no_overlap(out, x_arg, op, "out", "x");
  const at::Tensor x = in_place ? x_arg : with_flat_rows(x_arg);
  RmsNormParams p = forward_params(op, x, weight, eps, out);
  p.residual = residual.data_ptr();
  p.residual_row_stride = row_stride(residual, op, "residual");
  p.residual_out = residual.data_ptr();  // each element is read before it is overwritten, by the same thread
  p.residual_out_row_stride = p.residual_row_stride;
  TK_LAUNCH(x, rms_norm_fwd, p);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out_arg, const at::Tensor& x_arg,
                                                     const at::Tensor& weight, double eps,
                                                     const std::optional<at::Tensor>& grad_residual_arg) {
  const char* op = "rms_norm_backward";
  const at::Tensor grad_out = with_flat_rows(grad_out_arg), x = with_flat_rows(x_arg);
  std::optional<at::Tensor> grad_residual;
  if (grad_residual_arg.has_value()) grad_residual = with_flat_rows(*grad_residual_arg);
  const NormShape s = check_norm_inputs(op, x, weight, eps);
  check_like(op, grad_out, "grad_out", x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());

  RmsNormBwdParams p;
  p.grad_out = grad_out.data_ptr();
  p.grad_out_row_stride = row_stride(grad_out, op, "grad_out");
  p.x = x.data_ptr();
  p.x_row_stride = row_stride(x, op, "x");
  p.weight = weight.data_ptr();
  if (grad_residual.has_value()) {
    check_like(op, *grad_residual, "grad_residual", x);
    p.grad_residual = grad_residual->data_ptr();
    p.grad_residual_row_stride = row_stride(*grad_residual, op, "grad_residual");
  }
  p.grad_x = grad_x.data_ptr();
  p.grad_weight = grad_weight.data_ptr();
  p.rows = s.rows;
  p.hidden = s.hidden;
  p.eps = static_cast<float>(eps);
  p.dtype = s.dtype;
#ifdef TORCHKILN_WITH_CUDA
  p.num_partials = x.is_cuda() ? rms_norm_bwd_cuda_num_partials(s.rows, s.hidden)
                               : std::min<int64_t>(at::get_num_threads(), s.rows);
#else
  p.num_partials = std::min<int64_t>(at::get_num_threads(), s.rows);
#endif
  at::Tensor dw_partial = at::empty({p.num_partials, s.hidden}, x.options().dtype(at::kFloat));
  p.dw_partial = dw_partial.data_ptr<float>();
  TK_LAUNCH(x, rms_norm_bwd, p);
  return {grad_x, grad_weight};
}

void register_impls(torch::Library& m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_out", &rms_norm_out);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("fused_add_rms_norm_out", &fused_add_rms_norm_out);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace

TK_REGISTER_IMPLS(register_impls)

}  // namespace torchkiln
