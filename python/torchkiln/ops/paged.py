"""Paged KV-cache ops (kernels: csrc/paged/): cache writes, block copies and
swaps, and decode attention through block tables.

A layer's cache is a pair of (num_blocks, block_size, num_kv_heads, head_dim)
tensors; token t of a sequence lives in block block_table[t // block_size]
at offset t % block_size. Kernels on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._ext import _C  # noqa: F401  (registers the ops)
from ._util import register_fake
from .attention import attention_ref, softmax_scale_or_default

_ops = torch.ops.torchkiln


def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor) -> None:
    """Writes key/value (num_tokens, num_kv_heads, head_dim) into cache slots
    ``block * block_size + offset`` (int64 slot_mapping; a negative slot is
    padding and skipped; a slot past the cache raises IndexError, except
    under CUDA graph capture, where it is skipped unchecked)."""
    _ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


def copy_blocks(key_caches: Sequence[Tensor], value_caches: Sequence[Tensor], block_mapping: Tensor) -> None:
    """Copies blocks src -> dst (int64 (n, 2) on the CPU) in every layer's
    caches: the data side of copy-on-write."""
    _ops.copy_blocks(list(key_caches), list(value_caches), block_mapping)


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    """Copies blocks between two caches of the same block shape, typically on
    different devices (offload to host memory and back)."""
    _ops.swap_blocks(src, dst, block_mapping)


def paged_attention(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    softmax_scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode attention: q (num_seqs, heads, head_dim), one new token per
    sequence at position seq_len - 1, over its seq_lens cached tokens found
    through block_table (int32 (num_seqs, max_blocks); seq_lens int32). A
    length of 0 (a padding entry of a fixed-size decode batch) gives zeros
    and an lse of +inf. GQA when heads is a multiple of the cache's kv heads. The context is split
    across threads (Flash-Decoding) when there are few sequences. Returns out
    (num_seqs, heads, head_dim) and with ``return_lse`` the fp32 lse."""
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    out, lse = _ops.paged_attention(
        q, key_cache, value_cache, block_table, seq_lens, scale, window_size[0], window_size[1], softcap, alibi_slopes
    )
    return (out, lse) if return_lse else out


@register_fake("torchkiln::reshape_and_cache")
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping) -> None:
    return None


@register_fake("torchkiln::copy_blocks", own_device=("block_mapping",))
def _copy_blocks_fake(key_caches, value_caches, block_mapping) -> None:
    return None


@register_fake("torchkiln::swap_blocks", own_device=("src", "dst", "block_mapping"))
def _swap_blocks_fake(src, dst, block_mapping) -> None:
    return None


@register_fake("torchkiln::paged_attention")
def _paged_attention_fake(q, key_cache, value_cache, block_table, seq_lens, scale, left, right, softcap, alibi):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


def gather_cache(cache: Tensor, block_table: Tensor, seq_len: int) -> Tensor:
    """One sequence's cached rows, contiguous: (seq_len, num_kv_heads, head_dim)."""
    block_size = cache.shape[1]
    blocks = block_table[: (seq_len + block_size - 1) // block_size].long()
    return cache[blocks].flatten(0, 1)[:seq_len]


def paged_attention_ref(
    q: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_table: Tensor,
    seq_lens: Tensor,
    softmax_scale: float | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: gathers each sequence's K/V and runs attention_ref in
    q's dtype. Returns (out, lse)."""
    outs, lses = [], []
    for s in range(q.shape[0]):
        n = int(seq_lens[s])
        k = gather_cache(key_cache, block_table[s], n).to(q.dtype)[None]
        v = gather_cache(value_cache, block_table[s], n).to(q.dtype)[None]
        out, lse = attention_ref(q[s : s + 1, None], k, v, softmax_scale, False, window_size, softcap, alibi_slopes)
        outs.append(out[0, 0])
        lses.append(lse[0, :, 0])
    return torch.stack(outs), torch.stack(lses)
