"""Block allocator throughput (issue targets: >= 2M blocks/s allocate+free
through the batch API; match_prefix of a 4096-token prompt, block 16, < 50 us).
No torch baseline exists for these: the figures stand alone."""

import random

import pytest

from torchkiln.memory import BlockAllocator


@pytest.mark.parametrize("batch", [16, 256, 4096])
def test_allocate_free(benchmark, batch):
    a = BlockAllocator(100_000, 16)

    def step():
        a.free(a.allocate(batch))

    benchmark.extra_info["blocks_per_call"] = batch
    benchmark(step)


def test_match_prefix_4096(benchmark):
    a = BlockAllocator(100_000, 16)
    tokens = [random.randrange(32000) for _ in range(4096)]
    blocks = a.allocate(256)
    a.commit(blocks, tokens)
    a.free(blocks)

    def step():
        a.free(a.match_prefix(tokens))

    benchmark(step)
