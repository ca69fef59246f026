"""RMSNorm and fused add + RMSNorm: correctness, gradients, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch

import torchkiln
from reference import (
    ANY_LAYOUTS,
    FLOAT_DTYPES,
    assert_within_rule,
    fused_add_rms_norm_ref,
    poison_allocator,
    rms_norm_ref,
    to64,
)

ops = torch.ops.torchkiln
# (leading shape, hidden): odd hidden sizes exercise every vector tail.
SHAPES = [((1,), 1), ((3,), 7), ((5,), 113), ((2, 3), 203), ((4,), 1023), ((2,), 4096), ((1, 2), 5000)]


def make(shape, hidden, dtype, device, scale=1.0):
    x = torch.randn(*shape, hidden, dtype=torch.float32, device=device).mul_(scale).to(dtype)
    w = (1.0 + 0.5 * torch.randn(hidden, device=device)).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,hidden", SHAPES)
def test_rms_norm_forward(backend, dtype, shape, hidden):
    x, w = make(shape, hidden, dtype, backend, scale=3.0)
    poison_allocator(x)
    out = torchkiln.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_within_rule(out, rms_norm_ref(to64(x), to64(w), 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_rms_norm_strided_rows(backend, dtype):
    # A slice along the last dim: rows start 300 elements apart, 203 used.
    base = torch.randn(6, 300, device=backend).to(dtype)
    x = base[:, 50:253]
    w = torch.randn(203, device=backend).to(dtype)
    out = torchkiln.rms_norm(x, w, 1e-6)
    assert_within_rule(out, rms_norm_ref(to64(x), to64(w), 1e-6), rms_norm_ref(x, w, 1e-6))


# Read-only inputs (x, residual, grad_out) in any layout, as F.rms_norm takes them.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ANY_LAYOUTS)
def test_any_input_layout(backend, dtype, layout):
    x, w = make((4, 6), 67, dtype, backend)
    residual = torch.randn_like(x, dtype=torch.float32).to(dtype)
    xl, rl = ANY_LAYOUTS[layout](x), ANY_LAYOUTS[layout](residual)
    assert not xl.is_contiguous()
    xc, rc = xl.contiguous(), rl.contiguous()
    expected = torchkiln.rms_norm(xc, w)
    torch.testing.assert_close(torchkiln.rms_norm(xl, w), expected, rtol=0, atol=0)
    out = torch.full_like(xc, 7.0)
    torchkiln.rms_norm(xl, w, out=out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Functional (autograd) path, then the in-place one with x in that layout.
    normed, s = torchkiln.fused_add_rms_norm(xl.clone().requires_grad_(), rl, w)
    normed_c, s_c = torchkiln.fused_add_rms_norm(xc.clone().requires_grad_(), rc, w)
    torch.testing.assert_close(normed, normed_c, rtol=0, atol=0)
    torch.testing.assert_close(s, s_c, rtol=0, atol=0)
    r_in_place = rc.clone()
    with torch.no_grad():
        torchkiln.fused_add_rms_norm(xl, r_in_place, w)
    torch.testing.assert_close(r_in_place, s_c, rtol=0, atol=0)
    # Backward with a gradient in that layout.
    g = torch.randn_like(x, dtype=torch.float32).to(dtype)
    gl = ANY_LAYOUTS[layout](g)
    for got, want in zip(
        ops.rms_norm_backward(gl, xl, w, 1e-6, gl), ops.rms_norm_backward(gl.contiguous(), xc, w, 1e-6, gl.contiguous())
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,hidden", SHAPES[1:5])
def test_fused_add_rms_norm_in_place(backend, dtype, shape, hidden):
    x, w = make(shape, hidden, dtype, backend)
    residual = torch.randn_like(x, dtype=torch.float32).to(dtype)
    residual_before, x_before = residual.clone(), x.clone()
    ref_out, ref_sum = fused_add_rms_norm_ref(to64(x), to64(residual), to64(w), 1e-6)
    lowp_out, lowp_sum = fused_add_rms_norm_ref(x, residual, w, 1e-6)
    with torch.no_grad():
        out, new_residual = torchkiln.fused_add_rms_norm(x, residual, w, 1e-6)
    assert new_residual is residual, "inference path must update residual in place"
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)
    # The sum is exactly the dtype's rounding of x + residual.
    torch.testing.assert_close(residual, x_before + residual_before, rtol=0, atol=0)
    assert_within_rule(out, ref_out, lowp_out, what="normed")
    assert_within_rule(new_residual, ref_sum, lowp_sum, what="sum")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fused_add_equals_add_then_norm(backend, dtype):
    x, w = make((9,), 333, dtype, backend)
    residual = torch.randn_like(x, dtype=torch.float32).to(dtype)
    expected = torchkiln.rms_norm(x + residual, w, 1e-6)
    out, s = ops.fused_add_rms_norm(x, residual, w, 1e-6)
    torch.testing.assert_close(s, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,hidden", [((3,), 7), ((2, 5), 113), ((37,), 1023), ((4,), 2048)])
def test_rms_norm_backward(backend, dtype, shape, hidden):
    x, w = make(shape, hidden, dtype, backend, scale=2.0)
    grad = torch.randn_like(x, dtype=torch.float32).to(dtype)

    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    torchkiln.rms_norm(x1, w1, 1e-5).backward(grad)
    x64, w64 = to64(x, True), to64(w, True)
    rms_norm_ref(x64, w64, 1e-5).backward(to64(grad))
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    rms_norm_ref(xl, wl, 1e-5).backward(grad)

    assert_within_rule(x1.grad, x64.grad, xl.grad, factor=3.0, what="grad x")
    assert_within_rule(w1.grad, w64.grad, wl.grad, factor=3.0, atol=1e-4, what="grad weight")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_fused_add_rms_norm_backward(backend, dtype):
    x, w = make((3, 7), 203, dtype, backend)
    residual = torch.randn_like(x, dtype=torch.float32).to(dtype)
    g_out, g_sum = torch.randn_like(x, dtype=torch.float32).to(dtype), torch.randn_like(x, dtype=torch.float32).to(dtype)

    def grads(fn, conv, rg=True):
        a, r, ww = (conv(t).detach().requires_grad_(rg) for t in (x, residual, w))
        out, s = fn(a, r, ww, 1e-6)
        torch.autograd.backward((out, s), (conv(g_out), conv(g_sum)))
        return a.grad, r.grad, ww.grad, r

    kx, kr, kw, r_in = grads(torchkiln.fused_add_rms_norm, lambda t: t)
    torch.testing.assert_close(r_in.detach(), residual, rtol=0, atol=0)  # autograd path: no mutation
    rx, rr, rw, _ = grads(fused_add_rms_norm_ref, lambda t: t.double())
    lx, lr, lw, _ = grads(fused_add_rms_norm_ref, lambda t: t)
    assert_within_rule(kx, rx, lx, factor=3.0, what="grad x")
    assert_within_rule(kr, rr, lr, factor=3.0, what="grad residual")
    assert_within_rule(kw, rw, lw, factor=3.0, atol=1e-4, what="grad weight")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_out_variants(backend, dtype):
    x, w = make((6,), 300, dtype, backend)
    residual = torch.randn_like(x, dtype=torch.float32).to(dtype)
    expected = torchkiln.rms_norm(x, w)
    # Into a strided view of a bigger buffer: the columns around it stay.
    buf = torch.full((6, 320), 7.0, device=backend).to(dtype)
    out = buf[:, 10:310]
    assert torchkiln.rms_norm(x, w, out=out) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (buf[:, :10] == 7).all() and (buf[:, 310:] == 7).all()
    # out=x normalises in place.
    x2 = x.clone()
    torchkiln.rms_norm(x2, w, out=x2)
    torch.testing.assert_close(x2, expected, rtol=0, atol=0)
    # vLLM style: out=x, residual updated in place.
    s_expected = x + residual
    normed_expected = torchkiln.rms_norm(s_expected, w)
    x3, r3 = x.clone(), residual.clone()
    normed, s = torchkiln.fused_add_rms_norm(x3, r3, w, out=x3)
    assert normed is x3 and s is r3
    torch.testing.assert_close(r3, s_expected, rtol=0, atol=0)
    torch.testing.assert_close(x3, normed_expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not support autograd"):
        torchkiln.rms_norm(x.clone().requires_grad_(), w, out=out)
    with pytest.raises(RuntimeError, match="does not support autograd"):
        torchkiln.fused_add_rms_norm(x.clone().requires_grad_(), residual, w, out=out)
    with pytest.raises(ValueError, match="out must have the same shape as x"):
        torchkiln.rms_norm(x, w, out=out[:, :7])
    shared = torch.randn(6 * 300 + 1, device=backend).to(dtype)
    with pytest.raises(ValueError, match="out is written and must not share memory with x"):
        torchkiln.rms_norm(shared[:-1].view(6, 300), w, out=shared[1:].view(6, 300))
    with pytest.raises(ValueError, match="out is written and must not share memory with residual"):
        torchkiln.fused_add_rms_norm(x, residual, w, out=residual)


def test_rms_norm_backward_of_broadcast_grad(backend):
    # .sum() hands backward an expanded (stride 0) gradient.
    x = torch.randn(4, 64, device=backend, requires_grad=True)
    w = torch.randn(64, device=backend, requires_grad=True)
    torchkiln.rms_norm(x, w).sum().backward()
    x64, w64 = to64(x, True), to64(w, True)
    rms_norm_ref(x64, w64).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, dtype):
    x, w = make((3, 5), 67, dtype, backend)
    r = torch.randn_like(x, dtype=torch.float32).to(dtype)
    g = torch.randn_like(x, dtype=torch.float32).to(dtype)
    opcheck = torch.library.opcheck
    opcheck(ops.rms_norm, (x, w, 1e-6))
    opcheck(ops.rms_norm, (x.clone().requires_grad_(), w.clone().requires_grad_(), 1e-6))
    opcheck(ops.fused_add_rms_norm, (x, r, w, 1e-6))
    opcheck(ops.fused_add_rms_norm, (x.clone().requires_grad_(), r.clone().requires_grad_(), w, 1e-6))
    opcheck(ops.fused_add_rms_norm_out, (torch.empty_like(x), x, r.clone(), w, 1e-6))
    opcheck(ops.rms_norm_out, (torch.empty_like(x), x, w, 1e-6))
    opcheck(ops.rms_norm_backward, (g, x, w, 1e-6, None))
    opcheck(ops.rms_norm_backward, (g, x, w, 1e-6, g.clone()))


def test_bad_inputs(backend):
    x = torch.randn(4, 16, device=backend)
    w = torch.randn(16, device=backend)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        torchkiln.rms_norm(x.to(torch.int32), w.to(torch.int32))
    with pytest.raises(TypeError, match="weight must have the same dtype as x"):
        torchkiln.rms_norm(x, w.double())
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        torchkiln.rms_norm(x, torch.randn(15, device=backend))
    with pytest.raises(ValueError, match="weight must have shape"):
        torchkiln.rms_norm(x, torch.randn(1, 16, device=backend))
    with pytest.raises(ValueError, match="x must not be empty"):
        torchkiln.rms_norm(torch.randn(0, 16, device=backend), w)
    # x is copied when its layout needs it; out, being written, is not.
    with pytest.raises(ValueError, match="out must be contiguous in its last dimension"):
        torchkiln.rms_norm(x, w, out=torch.randn(16, 4, device=backend).t())
    with pytest.raises(ValueError, match="out must have evenly strided rows"):
        torchkiln.rms_norm(torch.randn(3, 4, 16, device=backend), w,
                           out=torch.randn(4, 6, 16, device=backend)[:, ::2].transpose(0, 1))
    with pytest.raises(ValueError, match="residual must be contiguous in its last dimension"):
        with torch.no_grad():
            torchkiln.fused_add_rms_norm(x, torch.randn(16, 4, device=backend).t(), w)
    with pytest.raises(ValueError, match="eps must be finite"):
        torchkiln.rms_norm(x, w, float("nan"))
    with pytest.raises(ValueError, match="residual must have the same shape as x"):
        torchkiln.fused_add_rms_norm(x, torch.randn(4, 8, device=backend), w)
    with pytest.raises(TypeError, match="residual must have the same dtype as x"):
        torchkiln.fused_add_rms_norm(x, x.half(), w)
    with pytest.raises(ValueError, match="overlapping elements"):
        torchkiln.fused_add_rms_norm(x, torch.randn(16, device=backend).expand(4, 16), w)
    with pytest.raises(ValueError, match="residual is written and must not share memory with x"):
        torchkiln.fused_add_rms_norm(x, x, w)
    with pytest.raises(ValueError, match="grad_out must have the same shape as x"):
        ops.rms_norm_backward(torch.randn(4, 8, device=backend), x, w, 1e-6, None)


@pytest.mark.cuda
def test_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU to build a cross-device call")
    x = torch.randn(4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="weight must be on the same device as x"):
        torchkiln.rms_norm(x, torch.randn(16))
