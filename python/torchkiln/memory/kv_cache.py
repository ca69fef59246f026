"""Per-layer paged K/V cache tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.paged import copy_blocks, reshape_and_cache, swap_blocks


class PagedKVCache:
    """K and V caches for every layer, each (num_blocks, block_size,
    num_kv_heads, head_dim). Block ids come from a :class:`BlockAllocator`
    with the same num_blocks and block_size."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_caches: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_caches: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size

    def write(self, layer: int, key: Tensor, value: Tensor, slot_mapping: Tensor) -> None:
        """Stores new tokens' key/value (num_tokens, num_kv_heads, head_dim) of one layer."""
        reshape_and_cache(key, value, self.key_caches[layer], self.value_caches[layer], slot_mapping)

    def copy(self, block_mapping: Tensor) -> None:
        """Copies blocks src -> dst in every layer (after copy_on_write)."""
        copy_blocks(self.key_caches, self.value_caches, block_mapping)

    def swap_into(self, other: "PagedKVCache", block_mapping: Tensor) -> None:
        """Copies blocks of every layer into `other` (e.g. a host-memory cache)."""
        for mine, theirs in zip(self.key_caches + self.value_caches, other.key_caches + other.value_caches):
            swap_blocks(mine, theirs, block_mapping)
