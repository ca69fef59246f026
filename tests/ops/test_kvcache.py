"""flash_attn_with_kvcache: cache writes, rotary positions and attention over
contiguous and paged caches, against the same steps done by hand (the cache
written at the expected slots, then flash-attn's rule per sequence)."""

from __future__ import annotations

import pytest
import torch

import torchkiln
from attention_helpers import capture_cuda_graph, random_cache
from conftest import DEVICES, REQUIRES_CUDA
from reference import assert_within_rule, poison_allocator
from torchkiln.ops import kvcache
from torchkiln.ops.attention import attention_ref
from torchkiln.ops.paged import gather_cache
from torchkiln.ops.rotary import rope_cos_sin

fa = torchkiln.flash_attn_with_kvcache
BF16 = torch.bfloat16


def make_cache(layout, lens, new, heads_k, d, dev, capacity=96, block=16):
    """(k_cache, v_cache, table as the kernels read it, kwargs naming it):
    room for every sequence's lens[b] + new tokens."""
    batch = len(lens)
    if layout == "paged":
        k, v, table, _ = random_cache([capacity] * batch, block, heads_k, d, BF16, device=dev)
        return k, v, table, dict(block_table=table)
    rows = batch + 2  # spare rows: cache_batch_idx picks among them
    k, v = (torch.randn(rows, capacity, heads_k, d, device=dev).to(BF16) for _ in range(2))
    if layout == "contiguous":
        return k, v, torch.arange(batch, dtype=torch.int32, device=dev)[:, None], {}
    idx = torch.randperm(rows)[:batch].to(torch.int32).to(dev)
    return k, v, idx[:, None], dict(cache_batch_idx=idx)


def expected_positions(lens, n, dev):
    return torch.tensor(lens, device=dev)[:, None] + torch.arange(n, device=dev)


@pytest.fixture(params=["python plan", "tensor-op plan"])
def plan(request, monkeypatch):
    """Both ways the wrapper computes slots, checks and cu_seqlens on the
    CPU: plain Python for a few tokens, tensor ops past that (and always on
    CUDA, where the Python one never runs)."""
    params = request.node.callspec.params
    on_cuda = params.get("dev") == "cuda" or params.get("backend", ("cpu",))[0] == "cuda"
    if request.param == "python plan" and on_cuda:
        pytest.skip("CUDA tensors always take the tensor-op plan")
    if request.param == "tensor-op plan":
        monkeypatch.setattr(kvcache, "_HOST_PLAN_MAX_TOKENS", 0)
    return request.param


def test_python_and_tensor_op_plans_agree():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        batch, new, block = int(torch.randint(1, 9, (1,))), int(torch.randint(0, 4, (1,))), int(torch.randint(1, 9, (1,)))
        cols, rows = int(torch.randint(1, 6, (1,))), int(torch.randint(1, 40, (1,)))
        new = min(new, cols * block)
        table = torch.randint(0, rows, (batch, cols), dtype=torch.int32, generator=gen)
        lens = torch.randint(0, cols * block - new + 1, (batch,), dtype=torch.int32, generator=gen)
        args = (lens, new, table, block, rows, cols * block, int(torch.randint(1, 4, (1,))), None)
        host, device = kvcache._plan_on_host(*args), kvcache._plan_on_device(*args, table)
        for a, b, what in zip(host, device, ("slots", "cu_seqlens_q", "cu_seqlens_k")):
            assert (a is None) == (b is None) and (a is None or (a.dtype == b.dtype and torch.equal(a, b))), \
                f"trial {trial}: {what} {a} != {b}"


CASES = [  # (seqlen_q = seqlen_new, causal, window, rotary, extra)
    (1, True, (-1, -1), None, {}),  # decode
    (3, True, (-1, -1), "gptj", {}),  # speculative decoding, flash-attn's default rotary
    (20, True, (8, 0), "neox", dict(softcap=4.0)),  # a chunk of prefill, windowed
    (2, False, (-1, -1), "gptj", dict(alibi=True)),  # not causal: every query at cache_seqlens
]


@pytest.mark.parametrize("layout", ["contiguous", "cache_batch_idx", "paged"])
@pytest.mark.parametrize("n,causal,window,rotary,extra", CASES, ids=str)
def test_appends_rotates_and_attends(backend, layout, n, causal, window, rotary, extra, plan):
    dev = backend
    lens, heads, heads_k, d = [5, 0, 60], 8, 2, 64
    k_cache, v_cache, table, kw = make_cache(layout, lens, n, heads_k, d, dev)
    before = (k_cache.clone(), v_cache.clone())
    q = torch.randn(3, n, heads, d, device=dev).to(BF16)
    k, v = (torch.randn(3, n, heads_k, d, device=dev).to(BF16) for _ in range(2))
    kw = dict(kw, causal=causal, window_size=window, softcap=extra.get("softcap", 0.0))
    alibi = torch.rand(3, heads, device=dev) if extra.get("alibi") else None
    if rotary:
        cos, sin = rope_cos_sin(48, 256, device=dev)  # partial rotary: 48 of 64 features
        kw.update(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=rotary == "gptj")
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    poison_allocator(q)
    out, lse = fa(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, alibi_slopes=alibi,
                  return_softmax_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (3, heads, n) and lse.is_contiguous()

    k_pos = expected_positions(lens, n, dev)
    q_pos = k_pos if causal or window != (-1, -1) else k_pos[:, :1].expand(3, n)
    if rotary:
        q, _ = torchkiln.apply_rotary(q, None, cos, sin, q_pos, interleaved=rotary == "gptj")
        k, _ = torchkiln.apply_rotary(k, None, cos, sin, k_pos, interleaved=rotary == "gptj")
    # The caches: the new rows at positions lens[b] .. + n - 1 of each sequence, nothing else changed.
    block = k_cache.shape[1]
    want_k, want_v = (c.clone() for c in before)
    for b in range(3):
        for i in range(n):
            p = lens[b] + i
            blk = int(table[b, p // block])
            want_k[blk, p % block], want_v[blk, p % block] = k[b, i], v[b, i]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)

    for b in range(3):
        keys = [gather_cache(c, table[b], lens[b] + n)[None] for c in (k_cache, v_cache)]
        slopes = None if alibi is None else alibi[b:b + 1]
        ref_kw = dict(causal=causal, window_size=window, softcap=kw["softcap"], alibi_slopes=slopes)
        ref, ref_lse = attention_ref(q[b:b + 1].double(), *(t.double() for t in keys), **ref_kw)
        low, _ = attention_ref(q[b:b + 1], *keys, **ref_kw)
        assert_within_rule(out[b:b + 1], ref, low, what=f"sequence {b}")
        torch.testing.assert_close(lse[b:b + 1].double(), ref_lse, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dev", DEVICES)
def test_no_new_tokens_with_rotary(dev):
    """k and v with zero new tokens: nothing is written, q still rotates
    at cache_seqlens."""
    k_cache, v_cache, _, _ = make_cache("contiguous", [4, 9], 0, 2, 32, dev, capacity=16)
    before = k_cache.clone()
    q = torch.randn(2, 1, 4, 32, device=dev).to(BF16)
    empty = torch.empty(2, 0, 2, 32, device=dev).to(BF16)
    cos, sin = rope_cos_sin(32, 64, device=dev)
    lens = torch.tensor([4, 9], dtype=torch.int32, device=dev)
    out = fa(q, k_cache, v_cache, empty, empty, cos, sin, cache_seqlens=lens, causal=True)
    assert torch.equal(k_cache, before)
    q_rot, _ = torchkiln.apply_rotary(q, None, cos, sin, lens.long()[:, None], interleaved=True)
    torch.testing.assert_close(out, fa(q_rot, k_cache, v_cache, cache_seqlens=lens, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("dev", DEVICES)
def test_whole_cache_and_int_lengths(dev):
    """No new tokens: cache_seqlens=None reads every row of the cache; an int
    gives every sequence that length; the default scale and no mask."""
    k_cache, v_cache, table, _ = make_cache("contiguous", [0, 0], 0, 2, 32, dev, capacity=40)
    q = torch.randn(2, 1, 4, 32, device=dev).to(BF16)
    for lens, n in ((None, 40), (17, 17)):
        out = fa(q, k_cache, v_cache, cache_seqlens=lens)
        ref, _ = attention_ref(q.double(), k_cache[:2, :n].double(), v_cache[:2, :n].double())
        low, _ = attention_ref(q, k_cache[:2, :n], v_cache[:2, :n])
        assert_within_rule(out, ref, low, what=f"cache_seqlens={lens}")


@pytest.mark.parametrize("dev", DEVICES)
def test_decode_loop_matches_full_attention(dev, plan):
    """Token by token into an empty cache with causal attention and rotary:
    the last step's output equals one causal pass over the whole rotated
    sequence."""
    heads, heads_k, d, steps = 4, 2, 64, 12
    k_cache, v_cache, _, _ = make_cache("contiguous", [0], steps, heads_k, d, dev, capacity=16)
    cos, sin = rope_cos_sin(d, 64, device=dev)
    q = torch.randn(1, steps, heads, d, device=dev).to(BF16)
    k, v = (torch.randn(1, steps, heads_k, d, device=dev).to(BF16) for _ in range(2))
    lens = torch.zeros(1, dtype=torch.int32, device=dev)
    for t in range(steps):
        out = fa(q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1], v[:, t:t + 1], cos, sin, cache_seqlens=lens,
                 causal=True)
        lens += 1
    pos = torch.arange(steps, device=dev)[None]
    q_rot, k_rot = torchkiln.apply_rotary(q, k, cos, sin, pos, interleaved=True)
    full = torchkiln.flash_attn_func(q_rot, k_rot, v, causal=True)
    torch.testing.assert_close(out, full[:, -1:], rtol=0.02, atol=0.02)
    assert torch.equal(k_cache[:1, :steps], k_rot) and torch.equal(v_cache[:1, :steps], v)


def test_compiles_fullgraph():
    """A decode step under torch.compile(fullgraph=True): the host checks step
    aside (the ops keep theirs) and the result equals eager."""
    k_cache, v_cache, _, _ = make_cache("contiguous", [3, 9], 1, 2, 32, "cpu", capacity=32)
    q = torch.randn(2, 1, 4, 32).to(BF16)
    k, v = (torch.randn(2, 1, 2, 32).to(BF16) for _ in range(2))
    lens = torch.tensor([3, 9], dtype=torch.int32)

    def step(q, kc, vc, k, v, lens):
        return fa(q, kc, vc, k, v, cache_seqlens=lens, causal=True)

    caches = (k_cache.clone(), v_cache.clone())
    torch._dynamo.reset()
    eager = step(q, k_cache, v_cache, k, v, lens)
    compiled = torch.compile(step, fullgraph=True)(q, *caches, k, v, lens)
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("dev", [pytest.param("cuda", marks=REQUIRES_CUDA)])
def test_decode_step_replays_from_a_cuda_graph(dev, layout):
    """A decode step (append with rotary, attend) captured once and replayed
    with the lengths advanced: every replay equals an eager call on a copy
    of the caches."""
    heads, heads_k, d = 8, 2, 128
    k_cache, v_cache, _, kw = make_cache(layout, [0, 0, 0], 1, heads_k, d, dev, capacity=256)
    cos, sin = rope_cos_sin(d, 512, device=dev)
    q = torch.empty(3, 1, heads, d, device=dev, dtype=BF16)
    k, v = (torch.empty(3, 1, heads_k, d, device=dev, dtype=BF16) for _ in range(2))
    lens = torch.tensor([7, 100, 0], dtype=torch.int32, device=dev)

    def step(kc=k_cache, vc=v_cache):
        return fa(q, kc, vc, k, v, cos, sin, cache_seqlens=lens, causal=True, **kw)

    for t in (q, k, v):
        t.normal_()
    graph, out = capture_cuda_graph(step)
    for _ in range(3):
        lens += torch.tensor([1, 50, 1], dtype=torch.int32, device=dev)
        for t in (q, k, v):
            t.normal_()
        kc, vc = k_cache.clone(), v_cache.clone()
        graph.replay()
        eager = step(kc, vc)
        torch.testing.assert_close(out, eager)  # the plans differ (capacity vs longest): not bitwise
        assert torch.equal(kc, k_cache) and torch.equal(vc, v_cache)


def test_bad_inputs(plan):
    k_cache, v_cache, _, _ = make_cache("contiguous", [0, 0], 1, 2, 32, "cpu", capacity=16)
    q = torch.randn(2, 1, 4, 32).to(BF16)
    k = torch.randn(2, 1, 2, 32).to(BF16)
    lens = torch.tensor([3, 16], dtype=torch.int32)  # full: no room for a new token
    cos, sin = rope_cos_sin(32, 64)
    cases = [
        (dict(cache_leftpad=lens), NotImplementedError, "cache_leftpad is not supported"),
        (dict(k=k), ValueError, "k and v must be given together"),
        (dict(rotary_cos=cos, rotary_sin=sin), ValueError, "pass k and v as well"),
        (dict(rotary_cos=cos, k=k, v=k), ValueError, "rotary_cos and rotary_sin must be given together"),
        (dict(cache_seqlens=lens.long()), TypeError, "cache_seqlens must be int32"),
        (dict(cache_seqlens=lens[:1]), ValueError, r"cache_seqlens must be \(batch,\)"),
        (dict(cache_seqlens=lens, k=k, v=k), ValueError, r"cache_seqlens \+ seqlen_new must lie in \[0, 16\]"),
        (dict(cache_seqlens=-1), ValueError, "cache_seqlens in \\[-1, -1\\]"),
        (dict(k=k[:, :, :1], v=k[:, :, :1]), ValueError, r"k must be \(batch, seqlen_new, heads_k, head_dim\)"),
        (dict(cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32)), IndexError, "cache_batch_idx must lie"),
        (dict(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32), block_table=lens[:, None]), ValueError,
         "cache_batch_idx can't be combined with block_table"),
        (dict(num_splits=-1), ValueError, "num_splits must be >= 0"),
        (dict(k=k.float(), v=k.float()), TypeError, "k must have q's dtype"),
        (dict(k=k, v=k.half()), TypeError, "v must have q's dtype"),
        (dict(k=k, v=k, cache_seqlens=lens - 3, block_table=torch.tensor([[0], [9]], dtype=torch.int32)), IndexError,
         r"block_table\[1, 0\] = 9 is not a block of the cache \[0, 4\), and new token 0 of sequence 1"),
        (dict(block_table=lens[:, None].long()), TypeError, "block_table must be int32"),
        (dict(block_table=lens), ValueError, r"block_table must be \(batch, max_blocks\)"),
        (dict(block_table=lens[:1, None]), ValueError, r"block_table must be \(batch, max_blocks\)"),
    ]
    for kw, exc, msg in cases:
        before = k_cache.clone()
        with pytest.raises(exc, match=msg):
            fa(q, k_cache, v_cache, **kw)
        assert torch.equal(k_cache, before), f"{kw}: the cache changed although the call raised"
    with pytest.raises(ValueError, match="q must be a non-empty"):
        fa(q[0], k_cache, v_cache)
    with pytest.raises(ValueError, match="q must be a non-empty"):
        fa(q[:, :0], k_cache, v_cache)
    with pytest.raises(ValueError, match="k_cache and v_cache must be"):
        fa(q, k_cache, v_cache[:1])
    with pytest.raises(TypeError, match="k_cache must have q's dtype"):
        fa(q.half(), k_cache, v_cache)
    with pytest.raises(TypeError, match="v_cache must have q's dtype"):
        fa(q, k_cache, v_cache.half())
    with pytest.raises(ValueError, match="q has 3 sequences but k_cache only 2"):
        fa(torch.randn(3, 1, 4, 32).to(BF16), k_cache[:2], v_cache[:2])
    with pytest.raises(NotImplementedError, match="no backward through a paged KV cache"):
        fa(q.requires_grad_(), k_cache, v_cache).sum().backward()
