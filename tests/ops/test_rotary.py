"""Rotary embeddings: both styles, partial rotary, every layout, in place and
out of place, gradients, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import torchkiln
from reference import FLOAT_DTYPES, assert_within_rule, poison_allocator, rotary_ref, to64
from torchkiln.ops.rotary import rope_cos_sin

ops = torch.ops.torchkiln
MAX_POS = 777


def tables(rot_dim, dtype, device):
    cos, sin = rope_cos_sin(rot_dim, MAX_POS, device=device)
    return cos.to(dtype), sin.to(dtype)


def make_qk(layout, heads, kv_heads, head_dim, dtype, device):
    """q, k and positions in one of the supported layouts."""
    if layout == "tokens":  # (T, H, D)
        shape_q, shape_k, pos_shape = (37, heads, head_dim), (37, kv_heads, head_dim), (37,)
    else:  # (B, S, H, D)
        shape_q, shape_k, pos_shape = (3, 13, heads, head_dim), (3, 13, kv_heads, head_dim), (3, 13)
    q = torch.randn(shape_q, device=device).to(dtype)
    k = torch.randn(shape_k, device=device).to(dtype)
    if layout == "bhsd":  # (B, H, S, D) storage passed as a (B, S, H, D) view
        q = torch.randn(3, heads, 13, head_dim, device=device).to(dtype).transpose(1, 2)
        k = torch.randn(3, kv_heads, 13, head_dim, device=device).to(dtype).transpose(1, 2)
    positions = torch.randint(0, MAX_POS, pos_shape, device=device)
    return q, k, positions


CASES = [  # (head_dim, rot_dim): full, partial, odd half-sizes for vector tails
    (64, 64),
    (128, 128),
    (80, 80),
    (128, 64),
    (96, 34),
    (6, 6),
]


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("layout", ["tokens", "bshd", "bhsd"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("head_dim,rot_dim", CASES)
def test_rotary_out_of_place(backend, interleaved, layout, dtype, head_dim, rot_dim):
    q, k, positions = make_qk(layout, 4, 2, head_dim, dtype, backend)
    cos, sin = tables(rot_dim, torch.float32, backend)
    q_before, k_before = q.clone(), k.clone()
    poison_allocator(q)
    q_out, k_out = torchkiln.apply_rotary(q, k, cos, sin, positions, interleaved)
    torch.testing.assert_close(q, q_before, rtol=0, atol=0)
    torch.testing.assert_close(k, k_before, rtol=0, atol=0)
    for x, out in ((q, q_out), (k, k_out)):
        ref = rotary_ref(to64(x), cos, sin, positions, interleaved)
        assert_within_rule(out, ref, rotary_ref(x, cos, sin, positions, interleaved))
        # Features past rot_dim are copied bit for bit.
        torch.testing.assert_close(out[..., rot_dim:], x[..., rot_dim:], rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("cs_in_x_dtype", [False, True], ids=["cs_fp32", "cs_xdtype"])
@pytest.mark.parametrize("head_dim,rot_dim", [(128, 128), (80, 48), (6, 6)])
def test_rotary_in_place(backend, interleaved, dtype, cs_in_x_dtype, head_dim, rot_dim):
    # q and k live inside bigger buffers (a fused qkv projection): the
    # elements around them must be left alone.
    T, H, KV = 29, 8, 2
    qkv = torch.randn(T, (H + 2 * KV) * head_dim + 5, device=backend).to(dtype)
    sentinel = qkv.clone()
    q = qkv[:, : H * head_dim].view(T, H, head_dim)
    k = qkv[:, H * head_dim : (H + KV) * head_dim].view(T, KV, head_dim)
    cos, sin = tables(rot_dim, dtype if cs_in_x_dtype else torch.float32, backend)
    positions = torch.randint(0, MAX_POS, (T,), device=backend)
    q_ref = rotary_ref(to64(q), cos, sin, positions, interleaved)
    k_ref = rotary_ref(to64(k), cos, sin, positions, interleaved)
    q_low = rotary_ref(q.clone(), cos, sin, positions, interleaved)
    k_low = rotary_ref(k.clone(), cos, sin, positions, interleaved)

    q2, k2 = torchkiln.apply_rotary(q, k, cos, sin, positions, interleaved, inplace=True)
    assert q2 is q and k2 is k
    assert_within_rule(q, q_ref, q_low, what="q")
    assert_within_rule(k, k_ref, k_low, what="k")
    untouched = qkv[:, (H + KV) * head_dim :]
    torch.testing.assert_close(untouched, sentinel[:, (H + KV) * head_dim :], rtol=0, atol=0)


def test_rotary_in_place_without_k(backend):
    q = torch.randn(2, 5, 4, 32, device=backend)
    cos, sin = tables(32, torch.float32, backend)
    positions = torch.randint(0, MAX_POS, (2, 5), device=backend)
    expected = rotary_ref(to64(q), cos, sin, positions)
    _, k = torchkiln.apply_rotary(q, None, cos, sin, positions, inplace=True)
    assert k is None
    torch.testing.assert_close(q.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_rotary_inverse_round_trip(backend, interleaved):
    x = torch.randn(17, 3, 64, device=backend)
    cos, sin = tables(48, torch.float32, backend)
    positions = torch.randint(0, MAX_POS, (17,), device=backend)
    y = ops.rotary_embedding(x, cos, sin, positions, interleaved, False)
    back = ops.rotary_embedding(y, cos, sin, positions, interleaved, True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_rotary_backward(backend, interleaved, dtype):
    q, k, positions = make_qk("bshd", 4, 2, 80, dtype, backend)
    cos, sin = tables(64, torch.float32, backend)
    gq = torch.randn_like(q, dtype=torch.float32).to(dtype)
    gk = torch.randn_like(k, dtype=torch.float32).to(dtype)

    def grads(fn, conv):
        a, b = conv(q).detach().requires_grad_(), conv(k).detach().requires_grad_()
        qo, ko = fn(a, b)
        torch.autograd.backward((qo, ko), (conv(gq), conv(gk)))
        return a.grad, b.grad

    kq, kk = grads(lambda a, b: torchkiln.apply_rotary(a, b, cos, sin, positions, interleaved), lambda t: t)
    ref = lambda a, b: (rotary_ref(a, cos, sin, positions, interleaved), rotary_ref(b, cos, sin, positions, interleaved))  # noqa: E731
    rq, rk = grads(ref, lambda t: t.double())
    lq, lk = grads(ref, lambda t: t)
    assert_within_rule(kq, rq, lq, factor=3.0, what="grad q")
    assert_within_rule(kk, rk, lk, factor=3.0, what="grad k")


@pytest.mark.cuda
def test_cuda_out_of_range_positions_are_skipped_not_read():
    # No host sync per call on CUDA: bad tokens are left alone, never read past the table.
    if not (torch.cuda.is_available() and torchkiln.info()["build"]["cuda"]):
        pytest.skip("needs a GPU and a CUDA build")
    q = torch.randn(4, 2, 32, device="cuda")
    cos, sin = tables(32, torch.float32, "cuda")
    positions = torch.tensor([0, MAX_POS, -5, 3], device="cuda")
    before = q.clone()
    torchkiln.apply_rotary(q, None, cos, sin, positions, inplace=True)
    torch.cuda.synchronize()
    torch.testing.assert_close(q[1:3], before[1:3], rtol=0, atol=0)
    torch.testing.assert_close(q[3].double(), rotary_ref(to64(before[3:]), cos, sin, positions[3:])[0])


def test_opcheck(backend):
    q, k, positions = make_qk("bshd", 4, 2, 64, torch.float32, backend)
    cos, sin = tables(64, torch.float32, backend)
    opcheck = torch.library.opcheck
    opcheck(ops.rotary_embedding, (q, cos, sin, positions, False, False))
    opcheck(ops.rotary_embedding, (q.clone().requires_grad_(), cos, sin, positions, True, False))
    opcheck(ops.rotary_embedding_, (q.clone(), k.clone(), cos, sin, positions, False))
    opcheck(ops.rotary_embedding_, (q.clone(), None, cos, sin, positions, True))


def test_bad_inputs(backend):
    dev = backend
    q = torch.randn(5, 4, 64, device=dev)
    k = torch.randn(5, 2, 64, device=dev)
    cos, sin = tables(64, torch.float32, dev)
    pos = torch.randint(0, MAX_POS, (5,), device=dev)
    rot = torchkiln.apply_rotary
    if dev == "cpu":  # CUDA skips such tokens instead (no device sync per call)
        with pytest.raises(IndexError, match=r"positions must lie in \[0, 777\)"):
            rot(q, k, cos, sin, torch.tensor([0, 1, 2, 777, 3], device=dev))
        with pytest.raises(IndexError, match="positions must lie in"):
            rot(q, k, cos, sin, torch.tensor([0, -1, 2, 3, 3], device=dev), inplace=True)
    with pytest.raises(TypeError, match="positions must be int64"):
        rot(q, k, cos, sin, pos.int())
    with pytest.raises(ValueError, match=r"positions must have shape \[5\]"):
        rot(q, k, cos, sin, pos[:4])
    with pytest.raises(ValueError, match="head_dim .* must be even"):
        rot(torch.randn(5, 4, 63, device=dev), None, cos[:, :16], sin[:, :16], pos)
    with pytest.raises(ValueError, match="exceeds head_dim"):
        rot(torch.randn(5, 4, 32, device=dev), None, cos, sin, pos)
    with pytest.raises(ValueError, match="cos and sin must both be"):
        rot(q, k, cos, sin[:, :8], pos)
    with pytest.raises(TypeError, match="cos/sin must be float32 or the dtype of x"):
        rot(q.half(), None, cos.double(), sin.double(), pos)
    with pytest.raises(TypeError, match="sin must have the same dtype as cos"):
        rot(q, None, cos, sin.half(), pos)
    with pytest.raises(TypeError, match="k must have the same dtype as q"):
        rot(q, k.half(), cos, sin, pos, inplace=True)
    with pytest.raises(ValueError, match="must be contiguous in head_dim"):
        rot(torch.randn(5, 64, 4, device=dev).transpose(1, 2), None, cos, sin, pos)
    with pytest.raises(ValueError, match=r"must be \(tokens, heads, head_dim\)"):
        rot(torch.randn(5, 64, device=dev), None, cos, sin, pos)
    with pytest.raises(ValueError, match="x must not be empty"):
        rot(torch.randn(0, 4, 64, device=dev), None, cos, sin, pos[:0])
    with pytest.raises(TypeError, match="must be float32, bfloat16 or float16"):
        rot(q.double(), None, cos, sin, pos)
    with pytest.raises(ValueError, match="must not share memory"):
        rot(q, q, cos, sin, pos, inplace=True)
    with pytest.raises(ValueError, match="overlapping elements"):
        rot(torch.randn(1, 4, 64, device=dev).expand(5, 4, 64), None, cos, sin, pos, inplace=True)
    with pytest.raises(RuntimeError, match="does not support autograd"):
        rot(q.clone().requires_grad_(), None, cos, sin, pos, inplace=True)
