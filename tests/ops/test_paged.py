"""Paged KV-cache ops: cache writes, block copies/swaps, paged decode
attention against the same attention over a contiguous copy (fp64 reference,
flash-attn's tolerance rule), on every CPU ISA."""

from __future__ import annotations

import pytest
import torch

import torchkiln
from attention_helpers import random_cache
from reference import FLOAT_DTYPES, assert_within_rule
from torchkiln.memory import PagedKVCache
from torchkiln.ops.paged import copy_blocks, gather_cache, paged_attention_ref, reshape_and_cache, swap_blocks

ops = torch.ops.torchkiln


CASES = [  # (seq_lens, block_size, heads, kv_heads, head_dim)
    ([1, 17, 100], 16, 4, 2, 64),
    ([5, 33], 1, 8, 8, 32),
    ([64, 1, 250, 31], 32, 8, 2, 128),
    ([2048], 16, 32, 8, 128),  # one long sequence: split over the context
    ([1500, 3, 40, 0, 200], 16, 4, 2, 64),  # mixed lengths: the long one split, the short ones mostly whole
    ([9, 40], 16, 6, 1, 40),  # MQA, head_dim not a multiple of the vector width
    ([70, 5], 16, 4, 2, 192),  # P V: register blocks of head_dim plus a remainder in L1
    ([23, 70], 16, 8, 2, 72),  # groups of 4 heads: 4 x 4 scores with a partial last vector, then pairs
    ([37, 130], 16, 16, 2, 96),  # groups of 8: bf16 takes the vdpbf16ps loops (odd key counts, d % 64 != 0)
    ([45, 300], 16, 4, 4, 160),  # MHA: P V a head at a time, 128 columns in registers, the rest in L1
    ([20, 129], 16, 6, 2, 128),  # groups of 3: the same, one pass
    ([0, 17, 0, 100], 16, 4, 2, 64),  # length 0: padding entries of a decode batch (zeros, lse +inf)
    ([0, 0], 16, 4, 2, 64),  # no keys anywhere
    ([33, 200], 16, 4, 4, 64),  # MHA d64: P V in a register pass of 4 vectors (AVX2: 8)
    ([100, 7], 16, 8, 4, 64),  # groups of 2, the same
    ([20, 90], 16, 4, 4, 96),  # passes of 4 and 2 vectors (AVX2: 8 and 4)
    ([31, 66], 16, 8, 2, 80),  # tiles of 4 heads: passes of 4 and 1 vectors
    ([50, 3], 16, 4, 4, 72),  # a last partial vector in L1
    ([300, 17, 2], 16, 28, 4, 128),  # groups of 7 (Qwen2 7B): tiles of 4, padded with a zero query head
    ([50, 1], 16, 10, 2, 64),  # groups of 5: padded to 8
    ([300, 1, 77], 16, 32, 2, 128),  # groups of 16: bf16 puts the query heads in the lanes
    ([37, 130, 1, 64], 16, 16, 2, 128),  # groups of 8: a query head in each lane pair, against two keys
    ([129, 40], 1, 32, 1, 64),  # MQA, 32 heads: two lane blocks
    ([65, 16], 32, 16, 1, 256),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens,block_size,heads,kv_heads,d", CASES)
def test_paged_attention(cpu_isa, dtype, seq_lens, block_size, heads, kv_heads, d):
    if cpu_isa == "scalar" and sum(seq_lens) * heads * d > 2e6:
        pytest.skip("large case: covered by the vector paths")
    k, v, table, lens = random_cache(seq_lens, block_size, kv_heads, d, dtype)
    q = torch.randn(len(seq_lens), heads, d).to(dtype)
    out, lse = torchkiln.paged_attention(q, k, v, table, lens, return_lse=True)
    ref_out, ref_lse = paged_attention_ref(q.double(), k, v, table, lens)
    low_out, _ = paged_attention_ref(q, k, v, table, lens)
    assert_within_rule(out, ref_out, low_out)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_attention_options(cpu_isa, dtype):
    k, v, table, lens = random_cache([50, 130, 3], 16, 2, 64, dtype)
    q = (3 * torch.randn(3, 4, 64)).to(dtype)
    for kw in ({"softcap": 5.0}, {"alibi_slopes": torch.rand(4)}, {"window_size": (20, -1)}, {"softmax_scale": 0.05},
               {"window_size": (2**40 + 5, -1)}):  # beyond 32 bits: no window
        out = torchkiln.paged_attention(q, k, v, table, lens, **kw)
        ref, _ = paged_attention_ref(q.double(), k, v, table, lens, **kw)
        low, _ = paged_attention_ref(q, k, v, table, lens, **kw)
        assert_within_rule(out, ref, low, what=str(kw))


def test_paged_matches_contiguous_flash_attention():
    k, v, table, lens = random_cache([77, 200], 16, 2, 64, torch.float32)
    q = torch.randn(2, 4, 64)
    out = torchkiln.paged_attention(q, k, v, table, lens)
    for s, n in enumerate(lens.tolist()):
        kc, vc = gather_cache(k, table[s], n)[None], gather_cache(v, table[s], n)[None]
        dense = torchkiln.flash_attn_func(q[s : s + 1, None], kc, vc, causal=True)[0, 0]
        torch.testing.assert_close(out[s], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_reshape_and_cache_with_padding(cpu_isa, dtype):
    cache = PagedKVCache(1, 6, 4, 2, 16, dtype=dtype)
    key, value = torch.randn(7, 2, 16).to(dtype), torch.randn(7, 2, 16).to(dtype)
    slots = torch.tensor([5, -1, 0, 23, 9, -1, 12])
    cache.write(0, key, value, slots)
    kc, vc = cache.key_caches[0].flatten(0, 1), cache.value_caches[0].flatten(0, 1)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(kc[slot], key[t]) and torch.equal(vc[slot], value[t])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(24) if s not in written]
    assert (kc[untouched] == 0).all() and (vc[untouched] == 0).all()


def test_copy_and_swap_round_trip():
    cache = PagedKVCache(2, 8, 4, 2, 16, dtype=torch.bfloat16)
    for layer in range(2):
        cache.key_caches[layer].normal_()
        cache.value_caches[layer].normal_()
    before = [t.clone() for t in cache.key_caches + cache.value_caches]
    cache.copy(torch.tensor([[1, 5], [2, 6]]))
    for t, b in zip(cache.key_caches + cache.value_caches, before):
        assert torch.equal(t[5], b[1]) and torch.equal(t[6], b[2])
        assert torch.equal(t[[0, 1, 2, 3, 4, 7]], b[[0, 1, 2, 3, 4, 7]])
    host = PagedKVCache(2, 3, 4, 2, 16, dtype=torch.bfloat16)
    cache.swap_into(host, torch.tensor([[5, 0], [3, 2]]))
    back = PagedKVCache(2, 8, 4, 2, 16, dtype=torch.bfloat16)
    host.swap_into(back, torch.tensor([[0, 5], [2, 3]]))
    for t, b in zip(back.key_caches + back.value_caches, cache.key_caches + cache.value_caches):
        assert torch.equal(t[[3, 5]], b[[3, 5]])


def test_opcheck(cpu_isa):
    k, v, table, lens = random_cache([20, 3], 8, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32)
    torch.library.opcheck(ops.paged_attention, (q, k, v, table, lens, 0.2, -1, -1, 0.0, None))
    slots = torch.tensor([0, -1, 9])
    torch.library.opcheck(ops.reshape_and_cache, (torch.randn(3, 2, 32), torch.randn(3, 2, 32), k.clone(), v.clone(), slots))
    torch.library.opcheck(ops.copy_blocks, ([k.clone()], [v.clone()], torch.tensor([[0, 1]])))
    torch.library.opcheck(ops.swap_blocks, (k, v.clone(), torch.tensor([[0, 1]])))
    cu_q, cu_k = torch.tensor([0, 4, 5], dtype=torch.int32), torch.tensor([0, 20, 23], dtype=torch.int32)
    torch.library.opcheck(
        ops.flash_attn_varlen_fwd, (torch.randn(5, 4, 32), k, v, cu_q, cu_k, 4, 20, 0.2, -1, 0, 0.0, None, table)
    )


def test_compile():
    torch._dynamo.reset()
    k, v, table, lens = random_cache([20, 3], 8, 2, 32, torch.float32)
    q, key, value = torch.randn(2, 4, 32), torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    slots = torch.tensor([20, 40])

    def step(q, key, value, kc, vc):
        torchkiln.ops.paged.reshape_and_cache(key, value, kc, vc, slots)
        return torchkiln.paged_attention(q, kc, vc, table, lens)

    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    eager = step(q, key, value, k1, v1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, key, value, k2, v2)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_bad_inputs():
    k, v, table, lens = random_cache([20, 3], 8, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32)
    pa = torchkiln.paged_attention
    bad_table = table.clone()
    bad_table[0, 1] = 99
    with pytest.raises(IndexError, match=r"block_table\[0, 1\] = 99 is not a block of the cache"):
        pa(q, k, v, bad_table, lens)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 100 must be in \[0, 24\]"):
        pa(q, k, v, table, torch.tensor([100, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = -1 must be in"):
        pa(q, k, v, table, torch.tensor([20, -1], dtype=torch.int32))
    with pytest.raises(TypeError, match="key_cache must have the same dtype as q"):
        pa(q.bfloat16(), k, v, table, lens)
    with pytest.raises(TypeError, match="block_table and seq_lens must be int32"):
        pa(q, k, v, table.long(), lens)
    with pytest.raises(ValueError, match=r"heads of q \(3\) must be a multiple"):
        pa(torch.randn(2, 3, 32), k, v, table, lens)
    with pytest.raises(ValueError, match="head_dim 16 differs"):
        pa(torch.randn(2, 4, 16), k, v, table, lens)
    with pytest.raises(ValueError, match="must have the same shape and strides"):
        pa(q, k, v[:, :4], table, lens)
    with pytest.raises(ValueError, match=r"must be \(num_blocks, block_size, num_kv_heads, head_dim\)"):
        pa(q, k[0], v[0], table, lens)

    key = torch.randn(3, 2, 32)
    with pytest.raises(IndexError, match="slot 9999 is out of range for a cache of"):
        reshape_and_cache(key, key, k, v, torch.tensor([0, 9999, 1]))
    with pytest.raises(TypeError, match="slot_mapping must be int64"):
        reshape_and_cache(key, key, k, v, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"key must be \(num_tokens, 2, 32\)"):
        reshape_and_cache(torch.randn(3, 4, 32), key, k, v, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="key must have the same dtype as key_cache"):
        reshape_and_cache(key.half(), key, k, v, torch.tensor([0, 1, 2]))

    with pytest.raises(IndexError, match="outside the caches' blocks"):
        copy_blocks([k], [v], torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match="is a destination twice"):
        copy_blocks([k], [v], torch.tensor([[0, 2], [1, 2]]))
    with pytest.raises(ValueError, match="both a source and a destination"):
        copy_blocks([k], [v], torch.tensor([[0, 2], [2, 3]]))
    with pytest.raises(TypeError, match="block_mapping must be int64"):
        swap_blocks(k, v, torch.tensor([[0, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="same block shape"):
        swap_blocks(k, v[:, :4], torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="same block shape"):
        swap_blocks(k, v[0], torch.tensor([[0, 1]]))
    with pytest.raises(IndexError, match="outside the caches' blocks"):
        swap_blocks(k, v[:2].clone(), torch.tensor([[5, 2]]))


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_chunked_prefill_through_block_table(cpu_isa, block_size, dtype):
    # (cached prefix, new tokens): plain prefill, chunked prefill, one new token.
    shapes = [(0, 37), (50, 20), (129, 1), (16, 16)]
    heads, kv_heads, d = 4, 2, 64
    k, v, table, lens = random_cache([p + n for p, n in shapes], block_size, kv_heads, d, dtype)
    new = [n for _, n in shapes]
    q = torch.randn(sum(new), heads, d).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *lens.cumsum(0).tolist()], dtype=torch.int32)
    out = torchkiln.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(new), int(lens.max()), causal=True, block_table=table
    )
    for s, n in enumerate(new):
        qs = slice(int(cu_q[s]), int(cu_q[s + 1]))
        kc, vc = (gather_cache(c, table[s], int(lens[s]))[None] for c in (k, v))
        ref, _ = torchkiln.ops.attention.attention_ref(q[qs][None].double(), kc.double(), vc.double(), causal=True)
        low, _ = torchkiln.ops.attention.attention_ref(q[qs][None], kc, vc, causal=True)
        assert_within_rule(out[qs][None], ref, low, what=f"sequence {s}")


def test_chunked_prefill_bad_inputs():
    k, v, table, lens = random_cache([20, 3], 8, 2, 32, torch.float32)
    q = torch.randn(5, 4, 32)
    cu_q = torch.tensor([0, 4, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 23], dtype=torch.int32)
    fv = torchkiln.flash_attn_varlen_func
    bad = table.clone()
    bad[0, 2] = 1000
    with pytest.raises(IndexError, match=r"block_table\[0, 2\] = 1000 is not a block of the cache"):
        fv(q, k, v, cu_q, cu_k, 4, 20, causal=True, block_table=bad)
    with pytest.raises(ValueError, match="has 30 keys, more than 3 blocks of 8 hold"):
        fv(q, k, v, cu_q, torch.tensor([0, 30, 33], dtype=torch.int32), 4, 30, causal=True, block_table=table)
    with pytest.raises(TypeError, match="block_table must be int32"):
        fv(q, k, v, cu_q, cu_k, 4, 20, block_table=table.long())
    with pytest.raises(ValueError, match="with a block_table, k and v must be caches"):
        fv(q, k[0], v[0], cu_q, cu_k, 4, 20, block_table=table)
    out = fv(q.requires_grad_(), k, v, cu_q, cu_k, 4, 20, causal=True, block_table=table)
    with pytest.raises(NotImplementedError, match="no backward through a paged KV cache"):
        out.sum().backward()
