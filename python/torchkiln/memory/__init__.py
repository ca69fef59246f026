"""Paged KV-cache memory (PagedAttention-style): the block allocator and the
per-layer cache tensors. The ops live in torchkiln.ops.paged."""

from .block_allocator import BlockAllocator, OutOfBlocks
from .kv_cache import PagedKVCache

__all__ = ["BlockAllocator", "OutOfBlocks", "PagedKVCache"]
