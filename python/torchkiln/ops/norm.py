"""RMSNorm and fused residual-add + RMSNorm.

Kernels: csrc/norm/. Layout: x is (..., hidden) in any layout (the kernels
stride through rows that flatten into one stride, a slice x[..., a:b]
included, and copy other layouts first); a written out= or in-place residual
must have a contiguous last dimension and evenly strided rows. weight is
(hidden,) in x's dtype, contiguous.
Accumulation is fp32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ext import _C  # noqa: F401  (registers the ops)
from ._util import call, compute_dtype, needs_grad, register_fake

_ops = torch.ops.torchkiln


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, out: Tensor | None = None) -> Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight``.

    x: (..., hidden); weight: (hidden,), same dtype and device. Returns a new
    contiguous tensor shaped like x, differentiable in x and weight; or, with
    ``out`` (shaped like x, evenly strided rows), writes there and returns it
    (no allocation, no autograd).
    """
    if out is None:
        return call(_ops.rms_norm, x, weight, eps)
    if needs_grad(x, weight):
        raise RuntimeError("torchkiln.rms_norm(out=...) does not support autograd; call it without out")
    _ops.rms_norm_out(out, x, weight, eps)
    return out


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Pre-norm block step: ``s = x + residual`` then ``rms_norm(s)``.

    Returns ``(rms_norm(s), s)``. Without autograd (inference) the sum is
    written into ``residual`` in place and the returned ``s`` *is* ``residual``
    (vLLM's contract); the norm goes to ``out`` when given (``out=x`` reuses
    x's memory, as vLLM does) or to a new tensor. When a gradient is needed,
    nothing is updated in place, ``s`` is a new tensor and ``out`` must be None.
    """
    if needs_grad(x, residual, weight):
        if out is not None:
            raise RuntimeError("torchkiln.fused_add_rms_norm(out=...) does not support autograd; call it without out")
        return _ops.fused_add_rms_norm(x, residual, weight, eps)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _ops.fused_add_rms_norm_out(out, x, residual, weight, eps)
    return out, residual


# ----------------------------------------------------------------------------- fake kernels
@register_fake("torchkiln::rms_norm")
def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


@register_fake("torchkiln::rms_norm_out")
def _rms_norm_out_fake(out: Tensor, x: Tensor, weight: Tensor, eps: float) -> None:
    return None


@register_fake("torchkiln::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


@register_fake("torchkiln::fused_add_rms_norm_out")
def _fused_add_rms_norm_out_fake(out: Tensor, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    return None


@register_fake("torchkiln::rms_norm_backward")
def _rms_norm_backward_fake(
    grad_out: Tensor, x: Tensor, weight: Tensor, eps: float, grad_residual: Tensor | None
) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


# ----------------------------------------------------------------------------- autograd
def _rms_norm_setup(ctx, inputs, output) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = _ops.rms_norm_backward(grad, x, weight, ctx.eps, None)
    return grad_x, grad_w, None


def _fused_add_setup(ctx, inputs, output) -> None:
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)  # the sum s is what was normalised
    ctx.eps = eps


def _fused_add_backward(ctx, grad_out: Tensor | None, grad_residual: Tensor | None):
    s, weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(s)
    grad_s, grad_w = _ops.rms_norm_backward(grad_out, s, weight, ctx.eps, grad_residual)
    return grad_s, grad_s, grad_w, None


torch.library.register_autograd("torchkiln::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)
torch.library.register_autograd(
    "torchkiln::fused_add_rms_norm", _fused_add_backward, setup_context=_fused_add_setup
)


# ----------------------------------------------------------------------------- eager baselines
def rms_norm_ref(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Plain PyTorch RMSNorm as Hugging Face's LlamaRMSNorm writes it."""
    h = x.to(compute_dtype(x))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Plain PyTorch residual add followed by RMSNorm (out of place)."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s
