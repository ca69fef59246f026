"""KV-cache block allocator: reference counts, copy-on-write, prefix caching.

The bookkeeping is C++ (csrc/paged/block_allocator.*, O(1) per block); this
module gives it a Python face: lists in and out (one call handles many
blocks), `OutOfBlocks` when memory runs out, and any hashable `extra_key` to
keep caches apart (for example one per LoRA adapter).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

from .._ext import _C

_MASK64 = (1 << 64) - 1


class OutOfBlocks(RuntimeError):
    """Too few free blocks (cached ones included) for an all-or-nothing request."""

    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"requested {requested} KV-cache blocks but only {free} are free")
        self.requested = requested
        self.free = free


def _key64(extra_key: Hashable | None) -> int:
    """A 64-bit key, stable across processes for None, ints, str and bytes."""
    if extra_key is None:
        return 0
    if isinstance(extra_key, bool) or not isinstance(extra_key, (int, str, bytes)):
        return (hash(extra_key) ^ 0x5BD1E995) & _MASK64
    data = extra_key.encode() if isinstance(extra_key, str) else extra_key
    if isinstance(extra_key, int):
        data = extra_key.to_bytes((extra_key.bit_length() + 8) // 8 + 1, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


class BlockAllocator:
    """Fixed-size blocks of a paged KV cache: ``num_blocks`` and ``block_size``
    (tokens a block) each in [1, 2^31). Memory is O(num_blocks) plus the
    tokens of the blocks committed to the prefix cache.

    - ``allocate(n)``: n blocks (ref count 1), all or nothing; raises
      :class:`OutOfBlocks` (changing nothing) when too few are free after
      evicting unused cached blocks.
    - ``free(blocks)``: one reference less each; a block at zero becomes free
      (still cached, and evicted least-recently-freed first, a chain's tail
      before its head). Unknown ids or extra frees raise ``ValueError`` and
      change nothing.
    - ``fork(blocks)``: share blocks (ref count + 1) for parallel sampling.
    - ``copy_on_write(block)``: ``(src, dst)``; write into dst, after copying
      src's contents when ``dst != src``.
    - ``match_prefix(token_ids, extra_key)`` / ``commit(blocks, token_ids, extra_key)``:
      prefix caching over full blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self._core = _C.BlockAllocator(num_blocks, block_size, enable_prefix_caching)

    def allocate(self, n: int) -> list[int]:
        blocks = self._core.try_allocate(n)
        if blocks is None:
            raise OutOfBlocks(n, self._core.num_free)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        self._core.free(blocks)

    def fork(self, blocks: Sequence[int]) -> list[int]:
        self._core.fork(blocks)
        return list(blocks)

    def copy_on_write(self, block: int) -> tuple[int, int]:
        pair = self._core.try_copy_on_write(block)
        if pair is None:
            raise OutOfBlocks(1, self._core.num_free)
        return pair

    def match_prefix(self, token_ids: Sequence[int], extra_key: Hashable | None = None) -> list[int]:
        return self._core.match_prefix(token_ids, _key64(extra_key))

    def commit(self, blocks: Sequence[int], token_ids: Sequence[int], extra_key: Hashable | None = None) -> None:
        self._core.commit(blocks, token_ids, _key64(extra_key))

    def reset_prefix_cache(self) -> None:
        self._core.reset_prefix_cache()

    def ref_count(self, block: int) -> int:
        return self._core.ref_count(block)

    def is_cached(self, block: int) -> bool:
        return self._core.is_cached(block)

    def free_order(self) -> list[int]:
        """Free blocks in the order allocation takes them (uncached first)."""
        return self._core.free_order()

    @property
    def num_blocks(self) -> int:
        return self._core.num_blocks

    @property
    def block_size(self) -> int:
        return self._core.block_size

    @property
    def num_free(self) -> int:
        return self._core.num_free

    @property
    def num_cached(self) -> int:
        return self._core.num_cached

    def usage(self) -> float:
        """Fraction of blocks in use (referenced)."""
        return 1.0 - self._core.num_free / self._core.num_blocks

    def stats(self) -> dict[str, int]:
        """Prefix-cache hits and misses (in blocks) and evictions."""
        return self._core.stats()
