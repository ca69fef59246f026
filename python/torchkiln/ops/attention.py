"""Fused attention with FlashAttention-2 semantics (kernels: csrc/attention/).

Layouts follow flash-attn: q (batch, seqlen_q, heads, head_dim), k/v
(batch, seqlen_k, heads_k, head_dim) with heads % heads_k == 0 (GQA/MQA); the
varlen form packs sequences as (total_tokens, heads, head_dim) with int32
cu_seqlens of length batch + 1. Masks align bottom-right when seqlen_q !=
seqlen_k; a query that sees no key outputs zeros (lse = +inf).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._ext import _C  # noqa: F401  (registers the ops)
from ._util import call, register_fake

_ops = torch.ops.torchkiln


def _window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    left, right = window_size
    return (left, 0) if causal else (left, right)


def softmax_scale_or_default(softmax_scale: float | None, head_dim: int) -> float:
    """The given scale, or 1 / sqrt(head_dim) as flash-attn defaults it."""
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def _check_dropout(dropout_p: float) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError("torchkiln attention: dropout_p must be 0.0 (dropout is not implemented)")


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T * scale [softcap, ALiBi, masks]) v, as flash_attn.flash_attn_func.

    Returns out (batch, seqlen_q, heads, head_dim) in q's dtype, and with
    ``return_lse`` also the fp32 log-sum-exp (batch, heads, seqlen_q).
    Differentiable in q, k and v. ``deterministic`` is accepted for API
    compatibility: the kernels are always deterministic (gradients are bitwise
    identical across runs; on CPU with the same thread count), because no
    gradient is accumulated with atomics.

    Devices: CPU takes fp32 / bf16 / fp16 and any head_dim up to 256; CUDA
    takes bf16 / fp16 and head_dim a multiple of 8 up to 256 (kernels exist
    for 64, 96, 128 and 256; other sizes run zero-padded to the next one).
    """
    _check_dropout(dropout_p)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    left, right = _window(causal, window_size)
    out, lse = call(_ops.flash_attn_fwd, q, k, v, scale, left, right, softcap, alibi_slopes)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    block_table: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed variable-length sequences, as
    flash_attn.flash_attn_varlen_func: q (total_q, heads, head_dim), k/v
    (total_k, heads_k, head_dim); sequence b spans tokens
    [cu_seqlens[b], cu_seqlens[b + 1]). lse is (heads, total_q).

    With ``block_table`` (int32 (batch, max_blocks)), k and v are paged KV
    caches (num_blocks, block_size, heads_k, head_dim) and sequence b's keys
    0 .. cu_seqlens_k[b+1] - cu_seqlens_k[b] - 1 are read through its row of
    the table: prefill and chunked prefill over a cached prefix (the new
    queries are the last keys; causal aligns them bottom-right). No gradient
    flows through a paged cache.

    On CUDA the call can be captured in a CUDA graph; cu_seqlens and the
    table are then not checked, and max_seqlen_q / max_seqlen_k must bound
    the lengths of every replay (longer sequences are cut there)."""
    _check_dropout(dropout_p)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    left, right = _window(causal, window_size)
    out, lse = call(
        _ops.flash_attn_varlen_fwd, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
        softcap, alibi_slopes, block_table,
    )
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- fake kernels
@register_fake("torchkiln::flash_attn_fwd")
def _fwd_fake(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@register_fake("torchkiln::flash_attn_varlen_fwd")
def _varlen_fwd_fake(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
    softcap, alibi_slopes, block_table=None,
):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@register_fake("torchkiln::flash_attn_bwd")
def _bwd_fake(dout, q, k, v, out, lse, softmax_scale, window_left, window_right, softcap, alibi_slopes):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@register_fake("torchkiln::flash_attn_varlen_bwd")
def _varlen_bwd_fake(
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
    window_right, softcap, alibi_slopes,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------------------------- autograd
# Gradients flow to q, k and v; lse is an auxiliary output (its gradient is
# ignored, as in flash-attn) and alibi slopes / cu_seqlens get none.
def _fwd_setup(ctx, inputs, output) -> None:
    q, k, v, scale, left, right, softcap, alibi = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], alibi)
    ctx.options = (scale, left, right, softcap)


def _fwd_backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, out, lse, alibi = ctx.saved_tensors
    dq, dk, dv = _ops.flash_attn_bwd(grad_out.contiguous(), q, k, v, out, lse, *ctx.options, alibi)
    return dq, dk, dv, None, None, None, None, None


def _varlen_setup(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, alibi, *rest = inputs
    ctx.paged = bool(rest) and rest[0] is not None
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, alibi)
    ctx.options = (max_q, max_k, scale, left, right, softcap)
    ctx.num_inputs = len(inputs)


def _varlen_backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    if ctx.paged:
        raise NotImplementedError("torchkiln attention: no backward through a paged KV cache (block_table)")
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    dq, dk, dv = _ops.flash_attn_varlen_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.options, alibi)
    return (dq, dk, dv) + (None,) * (ctx.num_inputs - 3)


torch.library.register_autograd("torchkiln::flash_attn_fwd", _fwd_backward, setup_context=_fwd_setup)
torch.library.register_autograd("torchkiln::flash_attn_varlen_fwd", _varlen_backward, setup_context=_varlen_setup)


# ----------------------------------------------------------------------------- eager reference
def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch attention in q's dtype with the same semantics, scores
    materialised: (out (batch, seqlen_q, heads, D), lse (batch, heads, seqlen_q)).
    A test oracle (run it on fp64 copies), not a kernel."""
    batch, sq, heads, d = q.shape
    sk, heads_k = k.shape[1], k.shape[2]
    scale = softmax_scale_or_default(softmax_scale, d)
    k = k.repeat_interleave(heads // heads_k, dim=2)
    v = v.repeat_interleave(heads // heads_k, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q * scale, k)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device).view(-1, 1)
    j = torch.arange(sk, device=q.device).view(1, -1)
    diag = i + sk - sq
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype).view(-1 if alibi_slopes.dim() == 2 else 1, heads, 1, 1)
        s = s - slopes * (diag - j).abs().to(s.dtype)
    left, right = _window(causal, window_size)
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        hidden |= j < diag - left
    if right >= 0:
        hidden |= j > diag + right
    s = s.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhts,bshd->bthd", p, v)
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))
