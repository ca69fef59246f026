"""Test oracles: fp64 references and flash-attn's tolerance rule.

The eager ``*_ref`` functions in ``torchkiln.ops`` are written for any dtype;
run on fp64 copies of the inputs they are the reference, and run on the
original low-precision inputs they are "plain PyTorch in the same dtype",
whose error sets the bar: a kernel may be at most ``factor`` times as far from
the fp64 reference as plain PyTorch is, plus a small absolute slack.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchkiln.ops.activation import silu_and_mul_ref  # noqa: F401  (re-exported oracles)
from torchkiln.ops.norm import fused_add_rms_norm_ref, rms_norm_ref  # noqa: F401
from torchkiln.ops.rotary import rotary_ref  # noqa: F401

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Views of t (2-d or more) in layouts a row-strided kernel cannot read as
# they are, for ops that take any layout of a read-only input.
ANY_LAYOUTS = {
    "transposed": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
    "expanded": lambda t: t[:1].expand(t.shape),
    "strided_last": lambda t: torch.stack([t, t], -1)[..., 0],
}


def to64(t: Tensor | None, requires_grad: bool = False) -> Tensor | None:
    """A detached fp64 copy (integer tensors are returned as they are)."""
    if t is None or not t.is_floating_point():
        return t
    return t.detach().double().requires_grad_(requires_grad)


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_within_rule(
    out: Tensor, ref64: Tensor, torch_lowp: Tensor, *, factor: float = 2.0, atol: float = 1e-5, what: str = "output"
) -> None:
    """max|out - ref64| <= factor * max|torch_lowp - ref64| + atol."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or poisoned elements?)"
    err, base = max_err(out, ref64), max_err(torch_lowp, ref64)
    assert err <= factor * base + atol, (
        f"{what}: max error {err:.3e} exceeds {factor} x plain PyTorch's {base:.3e} + {atol:.0e}"
    )


def poison_allocator(like: Tensor, count: int = 4) -> None:
    """Fill and release a few NaN blocks of like's size so a kernel that skips
    output elements returns NaN there rather than lucky zeros (the CUDA caching
    allocator, and often malloc, hand the same memory out again)."""
    blocks = [torch.full_like(like, float("nan")) for _ in range(count)]
    del blocks
