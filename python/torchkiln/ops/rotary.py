"""Rotary position embeddings (RoPE), GPT-NeoX and GPT-J styles, partial rotary.

Kernels: csrc/rope/. Layouts: q/k are (tokens, heads, head_dim) with
positions (tokens,), or (batch, seq, heads, head_dim) with positions
(batch, seq); any strides except a contiguous head_dim, so a (batch, heads,
seq, head_dim) tensor can be passed as ``t.transpose(1, 2)``. cos/sin are
(max_position, rot_dim / 2), float32 or the dtype of q; rot_dim <= head_dim
and features past rot_dim pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ext import _C  # noqa: F401  (registers the ops)
from ._util import call, needs_grad, register_fake

_ops = torch.ops.torchkiln


def apply_rotary(
    q: Tensor,
    k: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    interleaved: bool = False,
    inplace: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Rotate q and k (k may be None) by the angles of ``positions``.

    interleaved=False rotates pairs (x[i], x[i + rot_dim/2]) (GPT-NeoX, Llama);
    True rotates (x[2i], x[2i+1]) (GPT-J). With ``inplace=True`` q and k are
    overwritten (one fused kernel call, no allocation; no autograd). Otherwise
    new tensors are returned and gradients flow to q and k (not cos/sin).
    """
    if inplace:
        if needs_grad(q, k):
            raise RuntimeError(
                "torchkiln.apply_rotary(inplace=True) does not support autograd; use inplace=False for training"
            )
        _ops.rotary_embedding_(q, k, cos, sin, positions, interleaved)
        return q, k
    q_out = call(_ops.rotary_embedding, q, cos, sin, positions, interleaved, False)
    k_out = None if k is None else call(_ops.rotary_embedding, k, cos, sin, positions, interleaved, False)
    return q_out, k_out


@register_fake("torchkiln::rotary_embedding")
def _rotary_fake(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    return x.new_empty(x.shape)


@register_fake("torchkiln::rotary_embedding_")
def _rotary_inplace_fake(
    q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool
) -> None:
    return None


def _rotary_setup(ctx, inputs, output) -> None:
    _, cos, sin, positions, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _rotary_backward(ctx, grad: Tensor):
    cos, sin, positions = ctx.saved_tensors
    # The rotation is orthogonal: its transpose is the rotation by -theta.
    grad_x = _ops.rotary_embedding(grad.contiguous(), cos, sin, positions, ctx.interleaved, not ctx.inverse)
    return grad_x, None, None, None, None, None


torch.library.register_autograd("torchkiln::rotary_embedding", _rotary_backward, setup_context=_rotary_setup)


def rotary_ref(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool = False) -> Tensor:
    """Plain PyTorch RoPE in x's dtype (cos/sin gathered and cast to it), the
    way model code such as Hugging Face's ``apply_rotary_pos_emb`` writes it."""
    rot = 2 * cos.shape[-1]
    c = cos[positions].to(x.dtype).unsqueeze(-2)  # (..., 1, rot/2)
    s = sin[positions].to(x.dtype).unsqueeze(-2)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        a, b = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
        rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((rotated, x_pass), dim=-1)


def rope_cos_sin(
    rot_dim: int, max_position: int, base: float = 10000.0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """fp32 (max_position, rot_dim / 2) cos/sin tables for inverse frequencies
    ``base ** (-2i / rot_dim)``, as Llama and GPT-NeoX define them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device=device) / rot_dim))
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()
