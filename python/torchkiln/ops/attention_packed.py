"""flash-attn's packed-input forms of the attention calls: q, k and v stacked
in one tensor (a fused QKV projection's output) or k and v in one (a fused
KV projection's). Each unpacks into strided views, which the kernels read in
place (they take any strides but head_dim's), and calls
flash_attn_func / flash_attn_varlen_func; gradients flow back into the packed
tensor through autograd's unbind."""

from __future__ import annotations

from torch import Tensor

from .attention import flash_attn_func, flash_attn_varlen_func


def _unpack(fn: str, t: Tensor, name: str, layout: str, parts: int) -> tuple[Tensor, ...]:
    """t (..., parts, heads, head_dim) as its `parts` views."""
    if t.dim() != len(layout.split(",")) or t.shape[-3] != parts:
        raise ValueError(f"{fn}: {name} must be {layout}, got shape {tuple(t.shape)}")
    return t.unbind(-3)


def flash_attn_qkvpacked_func(
    qkv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """flash_attn_func with qkv (batch, seqlen, 3, heads, head_dim)."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", qkv, "qkv", "(batch, seqlen, 3, heads, head_dim)", 3)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_lse)


def flash_attn_kvpacked_func(
    q: Tensor,
    kv: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """flash_attn_func with kv (batch, seqlen_k, 2, heads_k, head_dim)."""
    k, v = _unpack("flash_attn_kvpacked_func", kv, "kv", "(batch, seqlen_k, 2, heads_k, head_dim)", 2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_lse)


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """flash_attn_varlen_func with qkv (total_tokens, 3, heads, head_dim);
    queries and keys share cu_seqlens and max_seqlen."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", qkv, "qkv", "(total_tokens, 3, heads, head_dim)", 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_lse)


def flash_attn_varlen_kvpacked_func(
    q: Tensor,
    kv: Tensor,
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
) -> Tensor | tuple[Tensor, Tensor]:
    """flash_attn_varlen_func with kv (total_k, 2, heads_k, head_dim)."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", kv, "kv", "(total_k, 2, heads_k, head_dim)", 2)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_lse)
