"""The fused gradient pack / unpack kernels on every CPU ISA."""

from __future__ import annotations

import pytest
import torch

from torchkiln import _C

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("comm", DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
def test_pack_unpack(cpu_isa, grad_dtype, comm):
    sizes = [1, 37, 1000, 70000, 5]  # odd sizes; 70000 spans several thread tasks
    grads = [torch.randn(n).to(grad_dtype) for n in sizes]
    grads[3] = None  # a parameter without a gradient packs as zeros
    offsets, total = [], 3  # a gap at the start: untouched
    for n in sizes:
        offsets.append(total)
        total += n
    bucket = torch.full((total,), float("nan")).to(comm)
    _C.pack_gradients(grads, offsets, sizes, bucket, 0.5, None)
    assert bucket[:3].isnan().all()
    for g, o, n in zip(grads, offsets, sizes):
        ref = (g.float() * 0.5).to(comm) if g is not None else torch.zeros(n, dtype=comm)
        assert torch.equal(bucket[o : o + n], ref)
    outs = [torch.full((n,), float("nan")).to(grad_dtype) for n in sizes]
    _C.unpack_gradients(bucket, offsets, outs)
    for out, o, n in zip(outs, offsets, sizes):
        assert torch.equal(out, bucket[o : o + n].float().to(grad_dtype))


def test_error_feedback_carries_the_rounding(cpu_isa):
    # Sending bf16 each step with the residual added back: the running sum of
    # what was sent tracks the running sum of the exact values.
    g = torch.randn(4099) * 1e-3
    bucket = torch.empty(4099, dtype=torch.bfloat16)
    residual = torch.zeros(4099)
    sent = torch.zeros(4099, dtype=torch.float64)
    for _ in range(20):
        before = residual.clone()
        _C.pack_gradients([g], [0], [4099], bucket, 1.0, residual)
        v = g + before
        assert torch.equal(bucket, v.to(torch.bfloat16))
        assert torch.equal(residual, v - bucket.float())
        sent += bucket.double()
    exact = g.double() * 20
    # with feedback the total is off by one rounding, not twenty
    assert (sent - exact).abs().max() <= g.abs().max().double() * 2**-8
    no_fb = torch.zeros(4099, dtype=torch.float64)
    for _ in range(20):
        _C.pack_gradients([g], [0], [4099], bucket, 1.0, None)
        no_fb += bucket.double()
    assert (no_fb - exact).abs().max() > 4 * (sent - exact).abs().max()


def test_pack_bad_inputs():
    with pytest.raises(Exception, match="does not fit the bucket"):
        _C.pack_gradients([torch.randn(10)], [5], [10], torch.empty(12), 1.0, None)
    with pytest.raises(Exception, match="same length"):
        _C.pack_gradients([torch.randn(10)], [0, 1], [10], torch.empty(12), 1.0, None)
    with pytest.raises(Exception, match="numels"):
        _C.pack_gradients([torch.randn(10)], [0], [9], torch.empty(12), 1.0, None)
