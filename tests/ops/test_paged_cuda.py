"""Paged KV-cache ops on CUDA: split-KV decode against the same attention over
a contiguous copy (fp64 reference, flash-attn's rule), cache writes with
padding slots, block copies, device <-> host swaps, bad inputs. Skips without
a GPU; scripts/gpu_check.sh runs it."""

from __future__ import annotations

import pytest
import torch

import torchkiln
from attention_helpers import capture_cuda_graph, random_cache
from conftest import REQUIRES_CUDA
from reference import FLOAT_DTYPES, assert_within_rule, poison_allocator
from torchkiln.memory import PagedKVCache
from torchkiln.ops.paged import paged_attention_ref

pytestmark = REQUIRES_CUDA

ops = torch.ops.torchkiln
DEV = "cuda"


CASES = [  # (seq_lens, block_size, heads, kv_heads, head_dim)
    ([1, 17, 100], 16, 4, 2, 64),
    ([5, 33], 1, 8, 8, 32),
    ([64, 1, 250, 31], 32, 8, 2, 128),
    ([2048], 16, 32, 8, 128),  # one long sequence: split over the context
    ([9, 40], 16, 6, 1, 40),  # MQA, odd head_dim (a multiple of 8)
    ([700, 3000, 12], 16, 64, 4, 256),  # 16 query heads per kv head: two head groups per block row
    ([32768], 16, 32, 8, 128),  # 32k context: many splits and the combine kernel
    ([0, 17, 0, 100], 16, 4, 2, 64),  # length 0: padding entries of a decode batch (zeros, lse +inf)
    ([0, 0], 16, 4, 2, 64),  # no keys anywhere: still one split
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens,block_size,heads,kv_heads,d", CASES)
def test_paged_attention(dtype, seq_lens, block_size, heads, kv_heads, d):
    k, v, table, lens = random_cache(seq_lens, block_size, kv_heads, d, dtype, device=DEV)
    q = torch.randn(len(seq_lens), heads, d, device=DEV).to(dtype)
    poison_allocator(q)
    out, lse = torchkiln.paged_attention(q, k, v, table, lens, return_lse=True)
    ref_out, ref_lse = paged_attention_ref(q.double(), k, v, table, lens)
    low_out, _ = paged_attention_ref(q, k, v, table, lens)
    assert_within_rule(out, ref_out, low_out)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_attention_options(dtype):
    k, v, table, lens = random_cache([50, 1300, 3], 16, 2, 64, dtype, device=DEV)
    q = (3 * torch.randn(3, 4, 64, device=DEV)).to(dtype)
    for kw in (
        {"softcap": 5.0},
        {"alibi_slopes": torch.rand(4, device=DEV)},
        {"window_size": (20, -1)},
        {"window_size": (700, -1)},  # whole chunks before the window are skipped
        {"softmax_scale": 0.05},
        {"window_size": (2**40 + 5, -1)},  # beyond 32 bits: no window, not a wrapped 5
    ):
        out = torchkiln.paged_attention(q, k, v, table, lens, **kw)
        ref, _ = paged_attention_ref(q.double(), k, v, table, lens, **kw)
        low, _ = paged_attention_ref(q, k, v, table, lens, **kw)
        assert_within_rule(out, ref, low, what=str(kw))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_reshape_and_cache_with_padding(dtype):
    cache = PagedKVCache(1, 6, 4, 2, 16, dtype=dtype, device=DEV)
    key, value = torch.randn(7, 2, 16, device=DEV).to(dtype), torch.randn(7, 2, 16, device=DEV).to(dtype)
    slots = torch.tensor([5, -1, 0, 23, 9, -1, 12], device=DEV)
    cache.write(0, key, value, slots)
    kc, vc = cache.key_caches[0].flatten(0, 1), cache.value_caches[0].flatten(0, 1)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(kc[slot], key[t]) and torch.equal(vc[slot], value[t])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(24) if s not in written]
    assert (kc[untouched] == 0).all() and (vc[untouched] == 0).all()


@pytest.mark.parametrize("d", [16, 24])  # 16-byte and 2-byte copy paths (24 * 2 * 2 * 4 bytes)
def test_copy_and_swap_round_trip(d):
    cache = PagedKVCache(2, 8, 3, 2, d, dtype=torch.bfloat16, device=DEV)
    for layer in range(2):
        cache.key_caches[layer].normal_()
        cache.value_caches[layer].normal_()
    before = [t.clone() for t in cache.key_caches + cache.value_caches]
    cache.copy(torch.tensor([[1, 5], [2, 6]]))
    for t, b in zip(cache.key_caches + cache.value_caches, before):
        assert torch.equal(t[5], b[1]) and torch.equal(t[6], b[2])
        assert torch.equal(t[[0, 1, 2, 3, 4, 7]], b[[0, 1, 2, 3, 4, 7]])
    host = PagedKVCache(2, 3, 3, 2, d, dtype=torch.bfloat16)
    cache.swap_into(host, torch.tensor([[5, 0], [3, 2]]))
    back = PagedKVCache(2, 8, 3, 2, d, dtype=torch.bfloat16, device=DEV)
    host.swap_into(back, torch.tensor([[0, 5], [2, 3]]))
    torch.cuda.synchronize()
    for t, b in zip(back.key_caches + back.value_caches, cache.key_caches + cache.value_caches):
        assert torch.equal(t[[3, 5]], b[[3, 5]])


def test_decode_step_replays_from_a_cuda_graph():
    """A decode step (cache write, then paged attention) captured once and
    replayed with new tokens and lengths, as a server replays its decode
    graphs. While capturing, the glue reads nothing on the host."""
    block, heads, kv_heads, d = 16, 8, 2, 128
    k, v, table, lens = random_cache([37, 300, 5], block, kv_heads, d, torch.bfloat16, device=DEV)
    capacity = table.shape[1] * block
    q = torch.empty(3, heads, d, device=DEV, dtype=torch.bfloat16)
    key, value = (torch.empty(3, kv_heads, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    slots = torch.empty(3, dtype=torch.int64, device=DEV)

    def fill(new_lens):  # the next token of every sequence, written at position len - 1
        for t in (q, key, value):
            t.copy_(torch.randn_like(t))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        slot = [int(table[s, (n - 1) // block]) * block + (n - 1) % block for s, n in enumerate(new_lens)]
        slots.copy_(torch.tensor(slot))

    def step():
        torchkiln.ops.paged.reshape_and_cache(key, value, k, v, slots)
        return torchkiln.paged_attention(q, k, v, table, lens, return_lse=True)

    fill([37, 300, 5])
    graph, (out, lse) = capture_cuda_graph(step)
    for new_lens in ([38, 301, 6], [1, capacity, 17]):
        fill(new_lens)
        kc, vc = k.clone(), v.clone()
        graph.replay()
        torchkiln.ops.paged.reshape_and_cache(key, value, kc, vc, slots)
        assert torch.equal(kc, k) and torch.equal(vc, v)
        ref, ref_lse = paged_attention_ref(q.double(), kc, vc, table, lens)
        low, _ = paged_attention_ref(q, kc, vc, table, lens)
        assert_within_rule(out, ref, low, what=f"replay with lengths {new_lens}")
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-3)


def test_opcheck_and_compile():
    k, v, table, lens = random_cache([20, 3], 8, 2, 32, torch.bfloat16, device=DEV)
    q = torch.randn(2, 4, 32, device=DEV).bfloat16()
    torch.library.opcheck(ops.paged_attention, (q, k, v, table, lens, 0.2, -1, -1, 0.0, None))
    slots = torch.tensor([0, -1, 9], device=DEV)
    key = torch.randn(3, 2, 32, device=DEV).bfloat16()
    torch.library.opcheck(ops.reshape_and_cache, (key, key.clone(), k.clone(), v.clone(), slots))
    torch.library.opcheck(ops.copy_blocks, ([k.clone()], [v.clone()], torch.tensor([[0, 1]])))

    torch._dynamo.reset()
    new_slots = torch.tensor([20, 40], device=DEV)

    def step(q, key, value, kc, vc):
        torchkiln.ops.paged.reshape_and_cache(key, value, kc, vc, new_slots)
        return torchkiln.paged_attention(q, kc, vc, table, lens)

    key, value = key[:2], key[1:]
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    eager = step(q, key, value, k1, v1)
    compiled = torch.compile(step, fullgraph=True)(q, key, value, k2, v2)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_bad_inputs():
    k, v, table, lens = random_cache([20, 3], 8, 2, 32, torch.bfloat16, device=DEV)
    q = torch.randn(2, 4, 32, device=DEV).bfloat16()
    bad = table.clone()
    bad[0, 1] = 99
    with pytest.raises(IndexError, match=r"block_table\[0, 1\] = 99 is not a block of the cache"):
        torchkiln.paged_attention(q, k, v, bad, lens)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 40 must be in \[0, 24\]"):
        torchkiln.paged_attention(q, k, v, table, torch.tensor([20, 40], dtype=torch.int32, device=DEV))
    with pytest.raises(RuntimeError, match="key_cache must be on the same device as q"):
        torchkiln.paged_attention(q.cpu(), k, v, table, lens)
    k36 = torch.randn(8, 8, 2, 36, device=DEV).bfloat16()
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8 on CUDA, got 36"):
        torchkiln.paged_attention(torch.randn(2, 4, 36, device=DEV).bfloat16(), k36, k36, table[:, :1], lens.clamp(max=8))
    with pytest.raises(IndexError, match="out of range for a cache of"):
        ops.reshape_and_cache(q[:, :2], q[:, :2], k, v, torch.tensor([0, 10**6], device=DEV))
