"""Fused attention on CUDA (bf16 / fp16 tensor-core kernels): the CPU suite's
cases against an fp64 reference under flash-attn's rule (outputs 2x,
gradients 3x), plus what only the CUDA path does: head_dim padding to the
instantiated sizes, copies of misaligned inputs, paged K/V, determinism of the
two-kernel backward. Skips without a GPU; scripts/gpu_check.sh runs it."""

from __future__ import annotations

import pytest
import torch

import torchkiln
from attention_helpers import capture_cuda_graph, check_grads, grads, qkv, random_cache
from conftest import REQUIRES_CUDA
from reference import assert_within_rule, poison_allocator, to64
from torchkiln.ops.attention import attention_ref
from torchkiln.ops.paged import gather_cache

pytestmark = REQUIRES_CUDA

ops = torch.ops.torchkiln
DEV = "cuda"
LOWP = [torch.bfloat16, torch.float16]
SEQLENS = [(1, 239), (3, 799), (113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024), (2048, 2048)]
HEAD_DIMS = [32, 40, 64, 96, 128, 256, 72]  # 32 / 40 / 72 run padded
HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1)}


def check(q, k, v, **kw):
    poison_allocator(q)
    out, lse = torchkiln.flash_attn_func(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = attention_ref(to64(q), to64(k), to64(v), **kw)
    low_out, low_lse = attention_ref(q, k, v, **kw)
    assert out.dtype == q.dtype and out.device == q.device and lse.dtype == torch.float32
    assert_within_rule(out, ref_out, low_out, what="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be +inf exactly for rows that see no key"
    assert_within_rule(lse[finite], ref_lse[finite], low_lse[finite], atol=1e-4, what="lse")


GRID = [
    (sq, sk, HEAD_DIMS[n % len(HEAD_DIMS)], list(HEADS)[n % 3], LOWP[n % 2])
    for n, (sq, sk) in enumerate(SEQLENS * 2)
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk,d,heads,dtype", GRID, ids=lambda x: str(x).removeprefix("torch."))
def test_forward(causal, sq, sk, d, heads, dtype):
    q, k, v = qkv(2, sq, sk, *HEADS[heads], d, dtype, device=DEV)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize(
    "window,causal",
    [((32, 16), False), ((0, 0), False), ((100, -1), False), ((-1, 7), False), ((48, -1), True),
     ((2**40 + 5, 2**33), False)],  # windows beyond 32 bits mean "unbounded", never a wrapped 5
)
def test_sliding_window(window, causal):
    q, k, v = qkv(2, 157, 301, 4, 2, 64, torch.bfloat16, device=DEV)
    check(q, k, v, window_size=window, causal=causal)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_softcap_and_alibi(dtype):
    q, k, v = qkv(2, 77, 190, 4, 2, 128, dtype, device=DEV)
    q = q * 4  # large scores, so the cap matters
    check(q, k, v, softcap=5.0)
    check(q, k, v, alibi_slopes=torch.rand(4, device=DEV), causal=True)
    check(q, k, v, alibi_slopes=torch.rand(2, 4, device=DEV), softcap=10.0, window_size=(40, 5))


def test_strided_and_misaligned_inputs():
    # Views into one packed qkv projection (B, S, 3, H, D)[:, :, i]: used in place.
    q, k, v = torch.randn(2, 65, 3, 4, 64, device=DEV).bfloat16().unbind(2)
    check(q, k, v, softmax_scale=0.3, causal=True)
    # A base that is not 16-byte aligned: the glue copies it first.
    base = torch.randn(2 * 65 * 4 * 64 + 1, device=DEV).half()
    q = base[1:].view(2, 65, 4, 64)
    check(q, k.half(), v.half(), causal=True)


def test_rows_without_keys_are_zero():
    q, k, v = qkv(1, 40, 10, 2, 2, 64, torch.bfloat16, device=DEV)
    out, lse = torchkiln.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert (out[:, :30] == 0).all() and (lse[:, :, :30] == float("inf")).all()
    assert torch.isfinite(lse[:, :, 30:]).all()


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen(dtype, causal):
    lens_q = [1, 37, 130, 5, 64, 1, 300]
    lens_k = [1, 50, 130, 9, 200, 3, 301]
    heads, heads_k, d = 4, 2, 128
    q = torch.randn(sum(lens_q), heads, d, device=DEV).to(dtype)
    k = torch.randn(sum(lens_k), heads_k, d, device=DEV).to(dtype)
    v = torch.randn(sum(lens_k), heads_k, d, device=DEV).to(dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out, lse = torchkiln.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, return_lse=True
    )
    assert out.shape == q.shape and lse.shape == (heads, q.shape[0])
    for b in range(len(lens_q)):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        seq = (q[qs][None], k[ks][None], v[ks][None])
        ref_out, ref_lse = attention_ref(*(to64(t) for t in seq), causal=causal)
        low_out, _ = attention_ref(*seq, causal=causal)
        assert_within_rule(out[qs][None], ref_out, low_out, what=f"sequence {b}")
        torch.testing.assert_close(lse[:, qs], ref_lse[0].float(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "batch,sq,sk,heads,kw",
    [(1, 1, 20000, (32, 8), dict(causal=True)),  # one long sequence: split over the keys
     (5, 1, 777, (16, 2), dict(alibi_slopes="batch", window_size=(300, 0), softcap=8.0)),
     (3, 1, 64, (4, 4), dict(window_size=(-1, 5))),
     (4, 4, 3000, (32, 8), dict(causal=True)),  # speculative decoding: 4 rows x 4 heads per kv head
     (2, 8, 900, (8, 8), dict(alibi_slopes="batch", window_size=(100, 3))),
     (2, 6, 4, (4, 2), dict(causal=True))],  # more rows than keys: the first see none
    ids=["long", "options", "short", "spec4", "spec8-options", "spec-few-keys"],
)
def test_few_queries_per_sequence(batch, sq, sk, heads, kw):
    """Up to 8 queries per sequence run through the paged decode kernel with
    the keys in place; the backward then works from its out and lse."""
    q, k, v = qkv(batch, sq, sk, *heads, 128, torch.bfloat16, device=DEV)
    if kw.get("alibi_slopes") == "batch":
        kw = dict(kw, alibi_slopes=torch.rand(batch, heads[0], device=DEV))
    check(q, k, v, **kw)
    check_grads(q, k, v, **kw)
    # K and V strided differently (the kernel reads both through one layout): the flash kernels
    kv = torch.randn(batch, sk, 2 * heads[1], 128, device=DEV).bfloat16()
    check(q, kv[:, :, : heads[1]], v, **kw)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "block_table"])
def test_varlen_few_queries_per_sequence(paged):
    lens_q, lens_k = [1, 0, 3, 2, 1, 4], [3000, 7, 2, 0, 129, 500]
    heads, heads_k, d, block = 8, 2, 128, 16
    q = torch.randn(sum(lens_q), heads, d, device=DEV).bfloat16()
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    if paged:
        k, v, table, _ = random_cache(lens_k, block, heads_k, d, torch.bfloat16, device=DEV)
        seq_kv = [(gather_cache(k, table[s], n), gather_cache(v, table[s], n)) for s, n in enumerate(lens_k)]
        extra = dict(block_table=table)
    else:
        k, v = (torch.randn(sum(lens_k), heads_k, d, device=DEV).bfloat16() for _ in range(2))
        seq_kv = [(k[int(cu_k[s]):int(cu_k[s + 1])], v[int(cu_k[s]):int(cu_k[s + 1])]) for s in range(len(lens_k))]
        extra = {}
    poison_allocator(q)
    out, lse = torchkiln.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                                return_lse=True, **extra)
    for s in range(len(lens_q)):
        rows = slice(int(cu_q[s]), int(cu_q[s + 1]))
        if lens_q[s] == 0:
            continue
        if lens_k[s] == 0:
            assert (out[rows] == 0).all() and (lse[:, rows] == float("inf")).all()
            continue
        seq = (q[rows][None], seq_kv[s][0][None], seq_kv[s][1][None])
        ref, ref_lse = attention_ref(*(to64(t) for t in seq), causal=True)
        low, _ = attention_ref(*seq, causal=True)
        assert_within_rule(out[rows][None], ref, low, what=f"sequence {s}")
        torch.testing.assert_close(lse[:, rows], ref_lse[0].float(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_chunked_prefill_through_block_table(block_size):
    shapes = [(0, 37), (50, 20), (129, 1), (16, 16), (300, 150)]  # (cached prefix, new tokens)
    heads, kv_heads, d = 8, 2, 128
    lens = [p + n for p, n in shapes]
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + 3
    k = torch.randn(num_blocks, block_size, kv_heads, d, device=DEV).bfloat16()
    v = torch.randn(num_blocks, block_size, kv_heads, d, device=DEV).bfloat16()
    perm = torch.randperm(num_blocks).tolist()
    table = torch.full((len(lens), max(need) + 2), -7, dtype=torch.int32)  # rows padded: a strided slice
    for s, n in enumerate(need):
        for b in range(n):
            table[s, b] = perm.pop()
    table = table.to(DEV)[:, : max(need)]
    new = [n for _, n in shapes]
    q = torch.randn(sum(new), heads, d, device=DEV).bfloat16()
    cu_q, cu_k = _cu(new), _cu(lens)
    out = torchkiln.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(new), max(lens), causal=True, block_table=table)
    for s in range(len(shapes)):
        qs = slice(int(cu_q[s]), int(cu_q[s + 1]))
        kc, vc = (gather_cache(c, table[s], lens[s])[None] for c in (k, v))
        ref, _ = attention_ref(q[qs][None].double(), kc.double(), vc.double(), causal=True)
        low, _ = attention_ref(q[qs][None], kc, vc, causal=True)
        assert_within_rule(out[qs][None], ref, low, what=f"sequence {s}")


@pytest.mark.parametrize("max_q", [1, 64], ids=["decode", "prefill"])
def test_varlen_through_block_table_replays_from_a_cuda_graph(max_q):
    """A serving step (varlen queries reading K/V through the block table)
    captured once for fixed bounds, max_q query rows per sequence and full
    table rows, then replayed with new lengths and tokens, as a server
    replays its graphs; unused query rows are padding. While capturing, the
    glue reads nothing on the host. Both kernels: max_q = 1 runs as decode."""
    block, heads, kv_heads, d = 16, 8, 2, 128
    k, v, table, _ = random_cache([300, 700, 40], block, kv_heads, d, torch.bfloat16, device=DEV)
    max_k = table.shape[1] * block
    q = torch.empty(3 * max_q, heads, d, device=DEV, dtype=torch.bfloat16)
    cu_q, cu_k = (torch.empty(4, dtype=torch.int32, device=DEV) for _ in range(2))

    def step():
        return torchkiln.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, block_table=table,
                                                return_lse=True)

    q.normal_()
    cu_q.copy_(_cu([max_q] * 3))
    cu_k.copy_(_cu([300, 700, 40]))
    graph, (out, lse) = capture_cuda_graph(step)
    replays = ([[1, 1, 1], [300, 701, 41]], [[max_q, max_q // 2 + 1, 1], [max_k, 1 + max_q // 2, 100]])
    for lens_q, lens_k in replays:
        q.normal_()
        cu_q.copy_(_cu(lens_q))
        cu_k.copy_(_cu(lens_k))
        graph.replay()
        for s in range(3):
            rows = slice(int(cu_q[s]), int(cu_q[s + 1]))
            seq = (q[rows][None], *(gather_cache(c, table[s], lens_k[s])[None] for c in (k, v)))
            ref, ref_lse = attention_ref(*(to64(t) for t in seq), causal=True)
            low, _ = attention_ref(*seq, causal=True)
            assert_within_rule(out[rows][None], ref, low, what=f"sequence {s} of replay {lens_q}, {lens_k}")
            torch.testing.assert_close(lse[:, rows], ref_lse[0].float(), rtol=1e-4, atol=1e-3)


def test_varlen_forward_backward_replays_from_a_cuda_graph():
    """A packed training step, forward and backward, captured once with
    max_seqlen bounds and replayed with new sequence boundaries: the results
    equal eager calls bit for bit (the kernels are deterministic; only the
    grids, planned for the bounds, are larger)."""
    heads, kv_heads, d, total_q, total_k, max_q, max_k = 8, 2, 64, 300, 420, 200, 300
    q = torch.empty(total_q, heads, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.empty(total_k, kv_heads, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    dout = torch.empty(total_q, heads, d, device=DEV, dtype=torch.bfloat16)
    cu_q, cu_k = (torch.empty(4, dtype=torch.int32, device=DEV) for _ in range(2))

    def step():
        out = torchkiln.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    for t in (q, k, v, dout):
        t.data.normal_()
    cu_q.copy_(_cu([100, 100, 100]))
    cu_k.copy_(_cu([140, 140, 140]))
    graph, captured = capture_cuda_graph(step)
    for lens_q, lens_k in (([200, 1, 99], [200, 1, 219]), ([0, 150, 150], [120, 300, 0])):
        for t in (q, k, v, dout):
            t.data.normal_()
        cu_q.copy_(_cu(lens_q))
        cu_k.copy_(_cu(lens_k))
        graph.replay()
        eager = step()
        for name, a, b in zip(("out", "dq", "dk", "dv"), captured, eager):
            assert torch.equal(a, b), f"{name} of the replay with lengths {lens_q}, {lens_k}"


# ----------------------------------------------------------------------------- backward
BWD_GRID = [
    (1, 239, 32, "mha", torch.bfloat16),
    (113, 203, 40, "gqa", torch.bfloat16),
    (128, 217, 64, "mqa", torch.float16),
    (108, 256, 96, "gqa", torch.bfloat16),
    (256, 512, 72, "mha", torch.float16),
    (512, 256, 128, "mqa", torch.bfloat16),
    (200, 200, 256, "gqa", torch.float16),
    (1023, 1024, 128, "gqa", torch.bfloat16),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk,d,heads,dtype", BWD_GRID, ids=lambda x: str(x).removeprefix("torch."))
def test_backward(causal, sq, sk, d, heads, dtype):
    q, k, v = qkv(2, sq, sk, *HEADS[heads], d, dtype, device=DEV)
    check_grads(q, k, v, causal=causal)


def test_backward_options():
    q, k, v = qkv(2, 97, 150, 4, 2, 64, torch.bfloat16, device=DEV)
    check_grads(q, k, v, window_size=(30, 8))
    check_grads(4 * q, k, v, softcap=6.0, causal=True)
    check_grads(q, k, v, alibi_slopes=torch.rand(2, 4, device=DEV), window_size=(64, -1))
    check_grads(q, k, v, softmax_scale=0.05)


def test_backward_rows_without_keys():
    q, k, v = qkv(1, 50, 20, 2, 1, 64, torch.bfloat16, device=DEV)
    check_grads(q, k, v, causal=True)  # the first 30 queries see no key


def test_backward_deterministic():
    q, k, v = qkv(1, 700, 700, 8, 2, 128, torch.bfloat16, device=DEV)
    g = torch.randn(q.shape, device=DEV).to(q.dtype)
    first = grads(torchkiln.flash_attn_func, lambda t: t, q, k, v, g, causal=True, deterministic=True)
    for _ in range(3):
        again = grads(torchkiln.flash_attn_func, lambda t: t, q, k, v, g, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_backward(causal):
    lens_q, lens_k = [1, 40, 97, 3, 0], [1, 60, 97, 11, 5]
    heads, heads_k, d = 4, 2, 64
    q = torch.randn(sum(lens_q), heads, d, device=DEV).bfloat16()
    k = torch.randn(sum(lens_k), heads_k, d, device=DEV).bfloat16()
    v = torch.randn(sum(lens_k), heads_k, d, device=DEV).bfloat16()
    g = torch.randn(q.shape, device=DEV).bfloat16()
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)

    def varlen(q, k, v):
        return torchkiln.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 97, 97, causal=causal)

    poison_allocator(k)
    ours = grads(varlen, lambda t: t, q, k, v, g)
    for b in range(4):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        seq = (q[qs][None], k[ks][None], v[ks][None])
        ref = grads(attention_ref, lambda t: t.double(), *seq, g[qs][None], causal=causal)
        low = grads(attention_ref, lambda t: t, *seq, g[qs][None], causal=causal)
        for name, a, r, lo in zip(("dq", "dk", "dv"), (ours[0][qs], ours[1][ks], ours[2][ks]), ref, low):
            assert_within_rule(a[None], r, lo, factor=3.0, what=f"{name} of sequence {b}")
    last = slice(int(cu_k[4]), int(cu_k[5]))  # keys of a sequence without queries
    assert (ours[1][last] == 0).all() and (ours[2][last] == 0).all()


def test_opcheck_and_compile():
    q, k, v = qkv(2, 33, 47, 4, 2, 64, torch.bfloat16, device=DEV)
    torch.library.opcheck(ops.flash_attn_fwd, (q, k, v, 0.2, -1, 0, 0.0, None))
    rg = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(ops.flash_attn_fwd, (*rg, 0.2, 16, 0, 2.0, torch.rand(4, device=DEV)))
    out, lse = ops.flash_attn_fwd(q, k, v, 0.2, -1, 0, 0.0, None)
    torch.library.opcheck(ops.flash_attn_bwd, (torch.randn_like(out), q, k, v, out, lse, 0.2, -1, 0, 0.0, None))
    q40 = torch.randn(2, 33, 4, 40, device=DEV).half()  # padded head_dim
    torch.library.opcheck(ops.flash_attn_fwd, (q40, q40[:, :, :2], q40[:, :, :2], 0.2, -1, -1, 0.0, None))
    cu = torch.tensor([0, 10, 33], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, 20, 47], dtype=torch.int32, device=DEV)
    varlen_args = (cu, cu_k, 23, 27, 0.2, -1, -1, 0.0, None)
    torch.library.opcheck(ops.flash_attn_varlen_fwd, (q[0], k[0], v[0], *varlen_args))
    out, lse = ops.flash_attn_varlen_fwd(q[0], k[0], v[0], *varlen_args)
    torch.library.opcheck(ops.flash_attn_varlen_bwd, (torch.randn_like(out), q[0], k[0], v[0], out, lse, *varlen_args))

    torch._dynamo.reset()

    def f(q, k, v):
        out, lse = torchkiln.flash_attn_func(q, k, v, causal=True, return_lse=True)
        return (out.float() ** 2).sum() + lse.sum()

    one = torch.tensor(1.0, device=DEV)
    eager = grads(f, lambda t: t, q, k, v, one)
    compiled = grads(torch.compile(f, fullgraph=True), lambda t: t, q, k, v, one)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_bad_inputs():
    q, k, v = qkv(2, 16, 16, 4, 2, 64, torch.bfloat16, device=DEV)
    fa = torchkiln.flash_attn_func
    with pytest.raises(TypeError, match="CUDA kernels take bfloat16 or float16"):
        fa(q.float(), k.float(), v.float())
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8 on CUDA, got 36"):
        x = torch.randn(1, 4, 2, 36, device=DEV).bfloat16()
        fa(x, x, x)
    with pytest.raises(RuntimeError, match="k must be on the same device as q"):
        fa(q, k.cpu(), v)
    with pytest.raises(ValueError, match=r"heads of q \(4\) must be a multiple of the heads of k and v \(3\)"):
        fa(q, torch.randn(2, 16, 3, 64, device=DEV).bfloat16(), torch.randn(2, 16, 3, 64, device=DEV).bfloat16())
    fv = torchkiln.flash_attn_varlen_func
    qp, kp = q.flatten(0, 1), k.flatten(0, 1)
    cu = torch.tensor([0, 10, 32], dtype=torch.int32, device=DEV)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        fv(qp, kp, kp, cu.long(), cu, 22, 22)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        fv(qp, kp, kp, cu, torch.tensor([0, 20, 10], dtype=torch.int32, device=DEV), 22, 22)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be on the same device as q"):
        fv(qp, kp, kp, cu.cpu(), cu, 22, 22)


def test_memory_is_linear_in_seqlen():
    # 16k tokens, 8 heads: one head's score matrix alone would be 512 MiB in bf16.
    q, k, v = (t.requires_grad_() for t in qkv(1, 16384, 16384, 8, 8, 64, torch.bfloat16, device=DEV))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = torchkiln.flash_attn_func(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    grown_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    assert torch.isfinite(q.grad.float()).all()
    # out, dout, dq, dk, dv (16 MiB each) and lse / dsum (0.5 MiB each).
    assert grown_mb < 160, f"peak CUDA memory grew by {grown_mb:.0f} MiB"
