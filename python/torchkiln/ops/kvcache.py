"""flash-attn's decode entry point, ``flash_attn_with_kvcache``, built from
torchkiln's ops: append the new keys / values to the cache in place
(reshape_and_cache), rotate them and the queries first when asked
(rotary_embedding), then attend over the cache (flash_attn_varlen_func with
a block table).

A contiguous cache (batch_cache, seqlen_cache, heads_k, head_dim) is a paged
cache whose blocks are whole sequences: sequence b's single block is
cache_batch_idx[b] (or b). So both cache layouts run the same kernels, and a
decode step captures in a CUDA graph like the ops it is made of.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import flash_attn_varlen_func
from .paged import reshape_and_cache
from .rotary import apply_rotary

_NAME = "flash_attn_with_kvcache"
# Up to this many new tokens (or sequences) on the CPU, the slots and checks
# are computed in plain Python (_plan_on_host); past it tensor ops are cheaper
# (measured: 16 tokens 25 vs 85 us, 64: 64 vs 88, 128: 140 vs 88).
_HOST_PLAN_MAX_TOKENS = 96


def _reads_values(t: Tensor) -> bool:
    """Whether checks may read tensor values on the host: not while
    torch.compile traces, nor while a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _like(t: Tensor, name: str, q: Tensor) -> None:
    """t must share q's dtype and device (the caches, k, v)."""
    if t.dtype != q.dtype:
        raise TypeError(f"{_NAME}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{_NAME}: {name} must be on {q.device} like q, got {t.device}")


def _int32_vector(t: Tensor, name: str, batch: int, device: torch.device) -> Tensor:
    if t.dtype != torch.int32:
        raise TypeError(f"{_NAME}: {name} must be int32, got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{_NAME}: {name} must be (batch,) = ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{_NAME}: {name} must be on {device} like q, got {t.device}")
    return t


def _block_table(q: Tensor, k_cache: Tensor, cache_batch_idx: Tensor | None, block_table: Tensor | None) -> Tensor:
    """The table the attention reads: the given one, or (contiguous cache)
    one block per sequence."""
    batch = q.shape[0]
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError(f"{_NAME}: cache_batch_idx can't be combined with block_table")
        if block_table.dtype != torch.int32:
            raise TypeError(f"{_NAME}: block_table must be int32, got {block_table.dtype}")
        if block_table.device != q.device:
            raise ValueError(f"{_NAME}: block_table must be on {q.device} like q, got {block_table.device}")
        if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
            raise ValueError(f"{_NAME}: block_table must be (batch, max_blocks) = ({batch}, >= 1), "
                             f"got {tuple(block_table.shape)}")
        return block_table
    if cache_batch_idx is None:
        if batch > k_cache.shape[0]:
            raise ValueError(f"{_NAME}: q has {batch} sequences but k_cache only {k_cache.shape[0]}; "
                             "pass cache_batch_idx to pick them")
        return torch.arange(batch, dtype=torch.int32, device=q.device).view(batch, 1)
    # Its values are checked with the others, in _check_values.
    return _int32_vector(cache_batch_idx, "cache_batch_idx", batch, q.device).view(batch, 1)


def _new_slots(cache_lens: Tensor, new: int, table: Tensor, block_size: int, num_blocks: int
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cache slots of the new tokens, (batch * new,) int64: token i of
    sequence b goes to position cache_lens[b] + i. Also returns, (batch, new)
    each, whether that token's block id lies outside the cache, the table
    column and the id (for _check_values' message). Slots of such tokens and
    of positions outside the table are -1, which the write skips, so even an
    unchecked call (compiling, capturing) never writes outside the cache."""
    pos = cache_lens.long().unsqueeze(1) + torch.arange(new, device=cache_lens.device)
    cols = table.shape[1]
    col = pos.div(block_size, rounding_mode="floor").clamp_(0, cols - 1)
    block = table.long().gather(1, col)
    bad_id = (block < 0) | (block >= num_blocks)
    slots = block * block_size + (pos - col * block_size)
    return slots.masked_fill_((pos < 0) | (pos >= cols * block_size) | bad_id, -1).flatten(), bad_id, col, block


def _check_values(cache_lens: Tensor, new: int, capacity: int, cache_batch_idx: Tensor | None, num_rows: int,
                  new_slots: tuple[Tensor, Tensor, Tensor, Tensor] | None) -> None:
    """The checks that read tensor values, in one transfer to the host (on
    CUDA one synchronisation per call, not one per check). num_rows: the
    caches' first dim (sequences of a contiguous cache, blocks of a paged one)."""
    stats = [cache_lens.min(), cache_lens.max()]
    if cache_batch_idx is not None:
        stats += [cache_batch_idx.min(), cache_batch_idx.max()]
    if new_slots is not None:
        _, bad_id, col, block = new_slots
        first = bad_id.flatten().int().argmax()  # the first bad token, when any
        stats += [bad_id.any(), first, col.flatten()[first], block.flatten()[first]]
    _raise_on_bad_values(torch.stack([t.long() for t in stats]).tolist(), new, capacity,
                         cache_batch_idx is not None, new_slots is not None, num_rows)


def _raise_on_bad_values(vals: list[int], new: int, capacity: int, has_batch_idx: bool, has_new_slots: bool,
                         num_rows: int) -> None:
    """vals: min and max of cache_lens, of cache_batch_idx (when given) and,
    for new tokens, whether any block id is bad and the first such token's
    flat index, table column and id."""
    lo, hi = vals[:2]
    if has_batch_idx:
        idx_lo, idx_hi = vals[2:4]
        if idx_lo < 0 or idx_hi >= num_rows:
            raise IndexError(f"{_NAME}: cache_batch_idx must lie in [0, {num_rows}), got values in [{idx_lo}, {idx_hi}]")
    if lo < 0 or hi + new > capacity:
        raise ValueError(f"{_NAME}: cache_seqlens + seqlen_new must lie in [0, {capacity}] (the keys a "
                         f"sequence's cache holds), got cache_seqlens in [{lo}, {hi}] and seqlen_new {new}")
    if has_new_slots and vals[-4]:
        first, col, block = vals[-3:]
        b, i = divmod(first, new)
        raise IndexError(f"{_NAME}: block_table[{b}, {col}] = {block} is not a block of the cache [0, {num_rows}), "
                         f"and new token {i} of sequence {b} goes there")


def _plan_on_device(cache_lens: Tensor, new: int, table: Tensor, block_size: int, num_rows: int, capacity: int,
                    seqlen_q: int, cache_batch_idx: Tensor | None, q: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
    """New tokens' slots (or None), cu_seqlens_q and cu_seqlens_k, as tensor
    ops on q's device: traceable by torch.compile and capturable in a CUDA
    graph (the value checks are skipped then)."""
    batch = table.shape[0]
    new_slots = _new_slots(cache_lens, new, table, block_size, num_rows) if new > 0 else None
    if _reads_values(q):
        _check_values(cache_lens, new, capacity, cache_batch_idx, num_rows, new_slots)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
    cu_k = torch.cat((zero, (cache_lens + new).cumsum(0, dtype=torch.int32)))
    return (None if new_slots is None else new_slots[0]), cu_q, cu_k


def _plan_on_host(cache_lens: Tensor, new: int, table: Tensor, block_size: int, num_rows: int, capacity: int,
                  seqlen_q: int, cache_batch_idx: Tensor | None) -> tuple[Tensor | None, Tensor, Tensor]:
    """_plan_on_device for a few tokens in CPU tensors, eager: the same
    slots, checks and messages in plain Python, which beats two dozen tiny
    torch ops (a whole decode step at batch 1, 64 keys: 103 -> 37 us)."""
    lens = cache_lens.tolist()
    batch = len(lens)
    vals = [min(lens), max(lens)]
    if cache_batch_idx is not None:
        idx = cache_batch_idx.flatten().tolist()
        vals += [min(idx), max(idx)]
    slots = None
    if new > 0:
        cols, ids, slots = table.shape[1], table.numpy(), []
        bad = None  # (flat index, column, id) of the first token whose block is not in the cache
        for b, length in enumerate(lens):
            for i in range(new):
                pos = length + i
                col = min(max(pos // block_size, 0), cols - 1)
                block = int(ids[b, col])
                if not 0 <= block < num_rows:
                    bad = bad or (b * new + i, col, block)
                    slots.append(-1)
                elif 0 <= pos < cols * block_size:
                    slots.append(block * block_size + pos - col * block_size)
                else:
                    slots.append(-1)
        vals += [bad is not None, *(bad or (0, 0, 0))]
    _raise_on_bad_values(vals, new, capacity, cache_batch_idx is not None, new > 0, num_rows)
    cu_k = [0]
    for length in lens:
        cu_k.append(cu_k[-1] + length + new)
    return (
        None if slots is None else torch.tensor(slots, dtype=torch.int64),
        torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32),
        torch.tensor(cu_k, dtype=torch.int32),
    )


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of q (batch, seqlen_q, heads, head_dim) over a KV cache, as
    flash_attn.flash_attn_with_kvcache.

    k_cache / v_cache: (batch_cache, seqlen_cache, heads_k, head_dim), or with
    ``block_table`` (int32 (batch, max_blocks)) paged caches (num_blocks,
    block_size, heads_k, head_dim). Sequence b holds cache_seqlens[b] tokens
    (int32 (batch,), an int for all, or None for the whole cache row); with
    ``cache_batch_idx`` (int32 (batch,), contiguous caches only) it is cache
    row cache_batch_idx[b].

    k / v (batch, seqlen_new, heads_k, head_dim), when given, are written
    into the caches in place at positions cache_seqlens[b] .. + seqlen_new - 1
    and then attended to as well. rotary_cos / rotary_sin ((max_position,
    rot_dim / 2), needs k and v) rotate k at those positions and q at the
    same ones when causal or windowed (else every query at cache_seqlens[b]);
    ``rotary_interleaved`` picks GPT-J pairs (flash-attn's default) over
    GPT-NeoX halves. Masks, softcap and ALiBi are flash_attn's, aligned
    bottom-right over cache_seqlens[b] + seqlen_new keys.

    Returns out (batch, seqlen_q, heads, head_dim) and, with
    ``return_softmax_lse``, the fp32 lse (batch, heads, seqlen_q).
    ``num_splits`` is accepted for compatibility (the kernels choose their
    own split of the keys); ``cache_leftpad`` is not supported. No backward.
    """
    if cache_leftpad is not None:
        raise NotImplementedError(f"{_NAME}: cache_leftpad is not supported")
    if q.dim() != 4 or q.numel() == 0:
        raise ValueError(f"{_NAME}: q must be a non-empty (batch, seqlen_q, heads, head_dim) tensor, got shape "
                         f"{tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{_NAME}: k_cache and v_cache must be 4-d tensors of one shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if (k is None) != (v is None):
        raise ValueError(f"{_NAME}: k and v must be given together")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache"), (k, "k"), (v, "v")):
        if t is not None:
            _like(t, name, q)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{_NAME}: rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None and k is None:
        raise ValueError(f"{_NAME}: rotary_cos / rotary_sin rotate the new keys: pass k and v as well")
    if num_splits < 0:
        raise ValueError(f"{_NAME}: num_splits must be >= 0, got {num_splits}")
    batch, seqlen_q, heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    table = _block_table(q, k_cache, cache_batch_idx, block_table)
    capacity = table.shape[1] * block_size  # keys a sequence can hold

    if cache_seqlens is None:
        cache_lens = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int):
        cache_lens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    else:
        cache_lens = _int32_vector(cache_seqlens, "cache_seqlens", batch, q.device)
    new = 0
    if k is not None:
        new = k.shape[1]
        expected = (batch, new, k_cache.shape[2], k_cache.shape[3])
        for t, name in ((k, "k"), (v, "v")):
            if t.dim() != 4 or t.shape != expected:
                raise ValueError(f"{_NAME}: {name} must be (batch, seqlen_new, heads_k, head_dim) = {expected}, "
                                 f"got {tuple(t.shape)}")
    plan_args = (cache_lens, new, table, block_size, k_cache.shape[0], capacity, seqlen_q,
                 table if cache_batch_idx is not None else None)
    if q.device.type == "cpu" and batch * max(new, 1) <= _HOST_PLAN_MAX_TOKENS and not torch.compiler.is_compiling():
        slots, cu_q, cu_k = _plan_on_host(*plan_args)
    else:
        slots, cu_q, cu_k = _plan_on_device(*plan_args, q)

    if rotary_cos is not None:
        steps = torch.arange(max(seqlen_q, new), device=q.device)
        start = cache_lens.long().unsqueeze(1)
        q_pos = start + steps[:seqlen_q] if causal or window_size != (-1, -1) else start.expand(batch, seqlen_q)
        q, _ = apply_rotary(q, None, rotary_cos, rotary_sin, q_pos, interleaved=rotary_interleaved)
        if new > 0:
            k, _ = apply_rotary(k, None, rotary_cos, rotary_sin, start + steps[:new], interleaved=rotary_interleaved)
    if slots is not None:
        heads_k = k_cache.shape[2]
        reshape_and_cache(k.reshape(batch * new, heads_k, head_dim), v.reshape(batch * new, heads_k, head_dim),
                          k_cache, v_cache, slots)

    out, lse = flash_attn_varlen_func(
        q.reshape(batch * seqlen_q, heads, head_dim), k_cache, v_cache, cu_q, cu_k, seqlen_q, capacity,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, return_lse=True, block_table=table,
    )
    out = out.view(batch, seqlen_q, heads, head_dim)
    if not return_softmax_lse:
        return out
    return out, lse.view(heads, batch, seqlen_q).transpose(0, 1).contiguous()
