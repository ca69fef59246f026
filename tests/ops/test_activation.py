"""SwiGLU gate silu_and_mul: correctness, gradients, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import torchkiln
from reference import ANY_LAYOUTS, FLOAT_DTYPES, assert_within_rule, poison_allocator, silu_and_mul_ref, to64

ops = torch.ops.torchkiln
SHAPES = [(1, 2), (3, 14), (5, 226), (2, 3, 2 * 1023), (4, 2 * 2048), (1, 2 * 11008)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_silu_and_mul_forward(backend, dtype, shape):
    x = (3 * torch.randn(shape, device=backend)).to(dtype)
    poison_allocator(x[..., : shape[-1] // 2])
    out = torchkiln.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_within_rule(out, silu_and_mul_ref(to64(x)), silu_and_mul_ref(x))


def test_silu_and_mul_extreme_values(backend):
    # Large |a| saturates the sigmoid; NaN must propagate, not vanish.
    a = torch.tensor([-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0, float("nan")], device=backend)
    x = torch.cat([a, torch.full_like(a, 2.0)])
    out = torchkiln.silu_and_mul(x)
    ref = silu_and_mul_ref(x.double())
    torch.testing.assert_close(out[:-1].double(), ref[:-1], rtol=1e-6, atol=1e-30)
    assert torch.isnan(out[-1])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_silu_and_mul_strided_rows(backend, dtype):
    base = torch.randn(7, 300, device=backend).to(dtype)
    x = base[:, 10:236]  # rows 300 apart, d = 113
    out = torchkiln.silu_and_mul(x)
    assert_within_rule(out, silu_and_mul_ref(to64(x)), silu_and_mul_ref(x))


# x and grad_out in any layout, as F.silu takes them.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ANY_LAYOUTS)
def test_any_input_layout(backend, dtype, layout):
    x = (2 * torch.randn(4, 5, 2 * 37, device=backend)).to(dtype)
    g = torch.randn(4, 5, 37, device=backend).to(dtype)
    xl, gl = ANY_LAYOUTS[layout](x), ANY_LAYOUTS[layout](g)
    assert not xl.is_contiguous()
    expected = torchkiln.silu_and_mul(xl.contiguous())
    torch.testing.assert_close(torchkiln.silu_and_mul(xl), expected, rtol=0, atol=0)
    out = torch.full_like(expected, 3.0)
    torchkiln.silu_and_mul(xl, out=out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        ops.silu_and_mul_backward(gl, xl), ops.silu_and_mul_backward(gl.contiguous(), xl.contiguous()), rtol=0, atol=0
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 14), (2, 5, 226), (3, 2 * 2053)], ids=str)
def test_silu_and_mul_backward(backend, dtype, shape):
    x = (2 * torch.randn(shape, device=backend)).to(dtype)
    g = torch.randn(*shape[:-1], shape[-1] // 2, device=backend).to(dtype)

    def grad(fn, conv):
        a = conv(x).detach().requires_grad_()
        fn(a).backward(conv(g))
        return a.grad

    assert_within_rule(
        grad(torchkiln.silu_and_mul, lambda t: t),
        grad(silu_and_mul_ref, lambda t: t.double()),
        grad(silu_and_mul_ref, lambda t: t),
        factor=3.0,
    )


def test_out_variant(backend):
    x = torch.randn(5, 2 * 77, device=backend)
    buf = torch.full((5, 90), 3.0, device=backend)
    out = buf[:, 5:82]
    assert torchkiln.silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, torchkiln.silu_and_mul(x), rtol=0, atol=0)
    assert (buf[:, :5] == 3).all() and (buf[:, 82:] == 3).all()
    with pytest.raises(ValueError, match=r"out must have shape \[5, 77\]"):
        torchkiln.silu_and_mul(x, out=buf)
    shared = torch.randn(5 * 154 + 5 * 77, device=backend)
    with pytest.raises(ValueError, match="out is written and must not share memory with x"):
        torchkiln.silu_and_mul(shared[: 5 * 154].view(5, 154), out=shared[5 * 154 - 1 : -1].view(5, 77))
    with pytest.raises(RuntimeError, match="does not support autograd"):
        torchkiln.silu_and_mul(x.clone().requires_grad_(), out=out)


def test_opcheck(backend):
    x = torch.randn(3, 5, 2 * 37, device=backend)
    g = torch.randn(3, 5, 37, device=backend)
    torch.library.opcheck(ops.silu_and_mul, (x,))
    torch.library.opcheck(ops.silu_and_mul, (x.clone().requires_grad_(),))
    torch.library.opcheck(ops.silu_and_mul_backward, (g, x))
    torch.library.opcheck(ops.silu_and_mul, (x.bfloat16(),))
    torch.library.opcheck(ops.silu_and_mul_out, (torch.empty_like(g), x))


def test_bad_inputs(backend):
    dev = backend
    with pytest.raises(ValueError, match="must be even"):
        torchkiln.silu_and_mul(torch.randn(4, 7, device=dev))
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        torchkiln.silu_and_mul(torch.randn(4, 8, device=dev).double())
    with pytest.raises(ValueError, match="x must not be empty"):
        torchkiln.silu_and_mul(torch.randn(0, 8, device=dev))
    with pytest.raises(ValueError, match="at least one dimension"):
        torchkiln.silu_and_mul(torch.tensor(1.0, device=dev))
    # x is copied when its layout needs it; out, being written, is not.
    with pytest.raises(ValueError, match="out must be contiguous in its last dimension"):
        torchkiln.silu_and_mul(torch.randn(2, 8, device=dev), out=torch.randn(4, 2, device=dev).t())
    x = torch.randn(4, 8, device=dev)
    with pytest.raises(ValueError, match=r"grad_out must have shape \[4, 4\]"):
        ops.silu_and_mul_backward(torch.randn(4, 8, device=dev), x)
    with pytest.raises(TypeError, match="grad_out must have the same dtype as x"):
        ops.silu_and_mul_backward(torch.randn(4, 4, device=dev).half(), x)
