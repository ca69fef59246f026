"""SwiGLU gate: ``silu(x[..., :d]) * x[..., d:]`` (kernels: csrc/activation/).

x is (..., 2 * d) holding [gate, up] as produced by one merged gate/up
projection; the result is (..., d). fp32 math for every storage dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ext import _C  # noqa: F401  (registers the ops)
from ._util import call, needs_grad, register_fake

_ops = torch.ops.torchkiln


def silu_and_mul(x: Tensor, out: Tensor | None = None) -> Tensor:
    """x: (..., 2 * d) in any layout -> (..., d), differentiable in x; or,
    with ``out`` ((..., d), evenly strided rows), writes there and returns it
    (no allocation, no autograd)."""
    if out is None:
        return call(_ops.silu_and_mul, x)
    if needs_grad(x):
        raise RuntimeError("torchkiln.silu_and_mul(out=...) does not support autograd; call it without out")
    _ops.silu_and_mul_out(out, x)
    return out


@register_fake("torchkiln::silu_and_mul")
def _silu_and_mul_fake(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@register_fake("torchkiln::silu_and_mul_out")
def _silu_and_mul_out_fake(out: Tensor, x: Tensor) -> None:
    return None


@register_fake("torchkiln::silu_and_mul_backward")
def _silu_and_mul_backward_fake(grad_out: Tensor, x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output) -> None:
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    return _ops.silu_and_mul_backward(grad, x)


torch.library.register_autograd("torchkiln::silu_and_mul", _backward, setup_context=_setup)


def silu_and_mul_ref(x: Tensor) -> Tensor:
    """Plain PyTorch SwiGLU gate in x's dtype."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
