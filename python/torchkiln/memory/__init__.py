"""Paged KV-cache memory (PagedAttention-style)."""

from .block_allocator import BlockAllocator, OutOfBlocks

__all__ = ["BlockAllocator", "OutOfBlocks"]
