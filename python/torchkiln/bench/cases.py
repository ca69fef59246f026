"""Benchmark cases: shapes from the targets of the foundation issue, each with
our call, the eager PyTorch baseline on the same inputs, and the bytes the
op must move at minimum (for GB/s against the copy ceiling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.activation import silu_and_mul, silu_and_mul_ref
from ..ops.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from ..ops.rotary import apply_rotary, rope_cos_sin

_ops = torch.ops.torchkiln

FAMILIES = ("norm", "activation", "rope")


@dataclass(frozen=True)
class Prepared:
    ours: Callable[[], object]
    baseline: Callable[[], object]
    min_bytes: int  # compulsory traffic of the fused op: inputs read once, outputs written once


@dataclass(frozen=True)
class BenchCase:
    family: str
    name: str  # op and direction, e.g. "rms_norm fwd"
    shape: str
    dtype: torch.dtype
    setup: Callable[[str], Prepared]


def _randn(*shape, dtype, device, requires_grad=False):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(requires_grad)


def _rms_norm_fwd(rows, hidden, dtype):
    def setup(device):
        x, w = _randn(rows, hidden, dtype=dtype, device=device), _randn(hidden, dtype=dtype, device=device)
        return Prepared(lambda: rms_norm(x, w), lambda: rms_norm_ref(x, w), 2 * x.nbytes + w.nbytes)

    return setup


def _rms_norm_fwd_out(rows, hidden, dtype):
    """Both sides write into a preallocated output: the kernel's own bandwidth,
    without the page faults a fresh output costs on every call."""

    def setup(device):
        x, w = _randn(rows, hidden, dtype=dtype, device=device), _randn(hidden, dtype=dtype, device=device)
        out = torch.empty_like(x)

        def baseline():
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return torch.mul(w, h.to(dtype), out=out)

        return Prepared(lambda: rms_norm(x, w, out=out), baseline, 2 * x.nbytes + w.nbytes)

    return setup


def _fused_add_fwd(rows, hidden, dtype):
    def setup(device):
        x, w = _randn(rows, hidden, dtype=dtype, device=device), _randn(hidden, dtype=dtype, device=device)
        res = _randn(rows, hidden, dtype=dtype, device=device)
        # Ours updates the residual in place (the inference contract) and
        # allocates the output; the baseline is the usual eager
        # `h = x + residual; norm(h)`.
        return Prepared(
            lambda: fused_add_rms_norm(x, res, w, 1e-6),
            lambda: fused_add_rms_norm_ref(x, res, w, 1e-6),
            4 * x.nbytes + w.nbytes,
        )

    return setup


def _grad_call(fn, inputs, grad):
    def call():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = (grad,) * len(outs)
        return torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads)

    return call


def _rms_norm_fwd_bwd(rows, hidden, dtype):
    def setup(device):
        x = _randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        w = _randn(hidden, dtype=dtype, device=device, requires_grad=True)
        g = _randn(rows, hidden, dtype=dtype, device=device)
        # fwd: read x, write y; bwd: read x, dy, write dx.
        return Prepared(
            _grad_call(rms_norm, (x, w), g), _grad_call(rms_norm_ref, (x, w), g), 5 * x.nbytes + 3 * w.nbytes
        )

    return setup


def _fused_add_fwd_bwd(rows, hidden, dtype):
    def setup(device):
        x = _randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        r = _randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
        w = _randn(hidden, dtype=dtype, device=device, requires_grad=True)
        g = _randn(rows, hidden, dtype=dtype, device=device)
        ours = lambda a, b, c: _ops.fused_add_rms_norm(a, b, c, 1e-6)  # noqa: E731
        base = lambda a, b, c: fused_add_rms_norm_ref(a, b, c, 1e-6)  # noqa: E731
        # fwd: read x, r, write y, s; bwd: read s, dy, ds_in, write ds.
        return Prepared(_grad_call(ours, (x, r, w), g), _grad_call(base, (x, r, w), g), 8 * x.nbytes + 3 * w.nbytes)

    return setup


def _silu_fwd(rows, d, dtype):
    def setup(device):
        x = _randn(rows, 2 * d, dtype=dtype, device=device)
        return Prepared(lambda: silu_and_mul(x), lambda: silu_and_mul_ref(x), x.nbytes * 3 // 2)

    return setup


def _silu_fwd_out(rows, d, dtype):
    def setup(device):
        x = _randn(rows, 2 * d, dtype=dtype, device=device)
        out = torch.empty(rows, d, dtype=dtype, device=device)
        baseline = lambda: torch.mul(torch.nn.functional.silu(x[:, :d]), x[:, d:], out=out)  # noqa: E731
        return Prepared(lambda: silu_and_mul(x, out=out), baseline, x.nbytes * 3 // 2)

    return setup


def _silu_fwd_bwd(rows, d, dtype):
    def setup(device):
        x = _randn(rows, 2 * d, dtype=dtype, device=device, requires_grad=True)
        g = _randn(rows, d, dtype=dtype, device=device)
        # fwd: read x, write y; bwd: read x, dy, write dx.
        return Prepared(_grad_call(silu_and_mul, (x,), g), _grad_call(silu_and_mul_ref, (x,), g), 4 * x.nbytes)

    return setup


def _hf_rope(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb with cos/sin already gathered to
    (tokens, 1, head_dim) in q's dtype, as LlamaRotaryEmbedding hands them to
    every layer (the gather is not charged to the baseline)."""

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rope_tables(tokens, head_dim, dtype, device):
    cos, sin = rope_cos_sin(head_dim, 32768, device=device)
    pos = torch.randint(0, 32768, (tokens,), device=device)
    full = lambda t: torch.cat([t[pos], t[pos]], -1).to(dtype).unsqueeze(1)  # noqa: E731
    return cos, sin, pos, full(cos), full(sin)


def _rope_in_place(tokens, heads, head_dim, dtype):
    def setup(device):
        q = _randn(tokens, heads, head_dim, dtype=dtype, device=device)
        k = _randn(tokens, heads, head_dim, dtype=dtype, device=device)
        cos, sin, pos, cos_full, sin_full = _rope_tables(tokens, head_dim, dtype, device)
        return Prepared(
            lambda: apply_rotary(q, k, cos, sin, pos, inplace=True),
            lambda: _hf_rope(q, k, cos_full, sin_full),
            2 * (q.nbytes + k.nbytes),
        )

    return setup


def _rope_fwd_bwd(tokens, heads, head_dim, dtype):
    def setup(device):
        q = _randn(tokens, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
        k = _randn(tokens, heads, head_dim, dtype=dtype, device=device, requires_grad=True)
        g = _randn(tokens, heads, head_dim, dtype=dtype, device=device)
        cos, sin, pos, cos_full, sin_full = _rope_tables(tokens, head_dim, dtype, device)
        ours = lambda a, b: apply_rotary(a, b, cos, sin, pos)  # noqa: E731
        base = lambda a, b: _hf_rope(a, b, cos_full, sin_full)  # noqa: E731
        return Prepared(_grad_call(ours, (q, k), g), _grad_call(base, (q, k), g), 4 * (q.nbytes + k.nbytes))

    return setup


def cases_for(family: str | None = None, quick: bool = False) -> list[BenchCase]:
    """The benchmark cases of one family (or all). ``quick`` shrinks every
    shape for smoke tests; its timings mean nothing."""
    rows = 64 if quick else 8192
    hidden, inter, heads = (256, 512, 4) if quick else (4096, 11008, 32)
    bf16 = torch.bfloat16
    all_cases = [
        BenchCase("norm", "rms_norm fwd", f"{rows}x{hidden}", bf16, _rms_norm_fwd(rows, hidden, bf16)),
        BenchCase("norm", "rms_norm fwd out=", f"{rows}x{hidden}", bf16, _rms_norm_fwd_out(rows, hidden, bf16)),
        BenchCase("norm", "fused_add_rms_norm fwd", f"{rows}x{hidden}", bf16, _fused_add_fwd(rows, hidden, bf16)),
        BenchCase("norm", "rms_norm fwd+bwd", f"{rows}x{hidden}", bf16, _rms_norm_fwd_bwd(rows, hidden, bf16)),
        BenchCase("norm", "fused_add_rms_norm fwd+bwd", f"{rows}x{hidden}", bf16, _fused_add_fwd_bwd(rows, hidden, bf16)),
        BenchCase("activation", "silu_and_mul fwd", f"{rows}x{2 * inter}", bf16, _silu_fwd(rows, inter, bf16)),
        BenchCase("activation", "silu_and_mul fwd out=", f"{rows}x{2 * inter}", bf16, _silu_fwd_out(rows, inter, bf16)),
        BenchCase("activation", "silu_and_mul fwd+bwd", f"{rows}x{2 * inter}", bf16, _silu_fwd_bwd(rows, inter, bf16)),
        BenchCase("rope", "rotary q,k in place", f"{rows}x{heads}x128", bf16, _rope_in_place(rows, heads, 128, bf16)),
        BenchCase("rope", "rotary q,k fwd+bwd", f"{rows}x{heads}x128", bf16, _rope_fwd_bwd(rows, heads, 128, bf16)),
    ]
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return [c for c in all_cases if family is None or c.family == family]
