"""Quantised matmul ops (kernels: csrc/quant/): fakes, autograd, wrappers.

The weight is frozen: autograd flows to x and bias only. The gradient of x
is grad @ W (quant_matmul_weight_only_grad_input: on AVX-512 CPUs a GEMM
that dequantises 128 columns of W at a time, for bf16 grad only with
AVX512_BF16; elsewhere W
dequantised whole, on CPU to fp32 where that GEMM is faster, the product
rounded to grad's dtype). For W8A8 the activation quantisation is treated
as identity, the straight-through estimator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from .._ext import _C  # registers the ops
from ._util import call, register_fake

if TYPE_CHECKING:
    from ..quant.weight import QuantizedWeight

_ops = torch.ops.torchkiln


def dequantize_packed(qw: "QuantizedWeight", dtype: torch.dtype) -> Tensor:
    """Dense W (out, in) of an int8 / int4 / nf4 weight in stored column order."""
    return _ops.quant_dequantize(qw.qweight, qw.scales, qw.zeros, qw.scheme, qw.group_size, qw.in_features, dtype)


def quantize_cpu(weight: Tensor, fmt: str, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(codes, scales, zeros) of a CPU fp32 / bf16 / fp16 weight in the kernel
    layouts: codes int8 (out, in) for ``"int8"``, packed uint8 for 4-bit;
    scales (out, groups); zeros for int4 only (else None)."""
    q, scales, zeros = _ops.quant_quantize(weight.detach(), fmt, group_size, symmetric)
    return q, scales, zeros if fmt == "int4" else None


def quant_matmul(x: Tensor, qw: "QuantizedWeight", bias: Tensor | None = None) -> Tensor:
    """``x @ W.T (+ bias)`` for x (..., in_features) in fp32 / bf16 / fp16 with W
    the quantised weight ``qw``; returns (..., out_features) in x's dtype.

    Differentiable in x and bias. For ``w8a8`` each row of x is quantised to
    int8 (scale max|row| / 127) and multiplied with int8 dot products.
    """
    if x.dim() == 0 or x.shape[-1] != qw.in_features:
        raise ValueError(
            f"quant_matmul: x must be (..., {qw.in_features}) to match the weight's in_features, got {tuple(x.shape)}"
        )
    if qw.k_perm is not None:
        x = x.index_select(-1, qw.k_perm)
    if qw.scheme == "w8a8":
        return call(_ops.quant_matmul_w8a8, x, qw.qweight, qw.scales, qw.weight_sums, bias)
    return call(_ops.quant_matmul_weight_only, x, qw.qweight, qw.scales, qw.zeros, bias, qw.scheme, qw.group_size)


# ---------------------------------------------------------------- fakes
@register_fake("torchkiln::quant_matmul_weight_only")
def _weight_only_fake(x, qweight, scales, zeros, bias, format, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@register_fake("torchkiln::quant_matmul_weight_only_grad_input")
def _weight_only_grad_input_fake(grad, qweight, scales, zeros, format, group_size, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features))


@register_fake("torchkiln::quant_dequantize")
def _dequantize_fake(qweight, scales, zeros, format, group_size, in_features, dtype):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=dtype)


@register_fake("torchkiln::quant_quantize")
def _quantize_fake(weight, format, group_size, symmetric):
    n, k = weight.shape
    cols = k if format == "int8" else (k + 63) // 64 * 32
    codes = weight.new_empty((n, cols), dtype=torch.int8 if format == "int8" else torch.uint8)
    groups = k // group_size
    scales = weight.new_empty((n, groups), dtype=torch.float32)
    return codes, scales, weight.new_empty((n if format == "int4" else 0, groups), dtype=torch.uint8)


@register_fake("torchkiln::quant_matmul_w8a8")
def _w8a8_fake(x, qweight, scales, weight_sums, bias):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


# ---------------------------------------------------------------- autograd
def _weight_only_setup(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias, format, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.format, ctx.group_size, ctx.in_features = format, group_size, x.shape[-1]
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _grad_times_weight(grad: Tensor, dense: Callable[[torch.dtype], Tensor]) -> Tensor:
    """grad @ W, W = dense(dtype). A 16-bit grad on CPU multiplies in fp32
    where ATen's fp32 GEMM is the faster one on this machine, as the forward's
    many-row path does (csrc/common/cpu_gemm_choice.h)."""
    if grad.device.type == "cpu" and grad.dtype != torch.float32:
        if _C.cpu_gemm_prefers_fp32(str(grad.dtype).removeprefix("torch.")):
            return (grad.float() @ dense(torch.float32)).to(grad.dtype)
    return grad @ dense(grad.dtype)


def _weight_only_backward(ctx, grad: Tensor):
    qweight, scales, zeros = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.quant_matmul_weight_only_grad_input(
            grad, qweight, scales, zeros, ctx.format, ctx.group_size, ctx.in_features
        )
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_b, None, None


torch.library.register_autograd(
    "torchkiln::quant_matmul_weight_only", _weight_only_backward, setup_context=_weight_only_setup
)


# grad_input is linear in grad: its own gradient is gg @ W.T, the forward op.
def _grad_input_setup(ctx, inputs, output) -> None:
    grad, qweight, scales, zeros, format, group_size, in_features = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.format, ctx.group_size = format, group_size


def _grad_input_backward(ctx, gg: Tensor):
    qweight, scales, zeros = ctx.saved_tensors
    grad_grad = None
    if ctx.needs_input_grad[0]:
        grad_grad = _ops.quant_matmul_weight_only(gg, qweight, scales, zeros, None, ctx.format, ctx.group_size)
    return grad_grad, None, None, None, None, None, None


torch.library.register_autograd(
    "torchkiln::quant_matmul_weight_only_grad_input", _grad_input_backward, setup_context=_grad_input_setup
)


def _w8a8_setup(ctx, inputs, output) -> None:
    x, qweight, scales, weight_sums, bias = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.in_features = x.shape[-1]
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _w8a8_backward(ctx, grad: Tensor):
    from ..quant.layout import unpack_panels

    qweight, scales = ctx.saved_tensors
    grad_x = grad_b = None
    if ctx.needs_input_grad[0]:
        q = unpack_panels(qweight, scales.shape[0], ctx.in_features)
        grad_x = _grad_times_weight(grad, lambda dtype: (q.to(torch.float32) * scales[:, None]).to(dtype))
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_b


torch.library.register_autograd("torchkiln::quant_matmul_w8a8", _w8a8_backward, setup_context=_w8a8_setup)


def quantize_rows_ref(x: Tensor) -> Tensor:
    """x rounded to its per-row int8 grid (what w8a8 multiplies), in fp32."""
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(xf / safe).clamp(-127, 127) * scale
