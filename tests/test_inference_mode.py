"""Every public op under torch.inference_mode, the mode serving code runs in
(and, last, the wrappers' shortcut under torch.no_grad).

Inputs are made inside the mode (inference tensors, as a server's would be)
and each result must equal the same call made outside it. An op that hands
work to torch's thread pool must carry the mode along: pool threads start
without it, and writing an inference tensor from outside the mode raises.
"""

from __future__ import annotations

import sys

import pytest
import torch

import torchkiln
from attention_helpers import random_cache
from torchkiln.memory import PagedKVCache
from torchkiln.quant import quantize

bf16 = torch.bfloat16


def both_modes(make_inputs, fn):
    """fn(*inputs) inside inference_mode (inputs made there too) and outside it
    (under no_grad, on clones made outside); returns both results."""
    torch.manual_seed(0)
    inputs = make_inputs()
    plain = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
    with torch.inference_mode():
        inferred = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
        assert all(t.is_inference() for t in inferred if isinstance(t, torch.Tensor))
        got = fn(*inferred)
    with torch.no_grad():
        want = fn(*plain)
    return got, want


def assert_same(got, want):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_norms_activation_rotary():
    hidden = 96
    cos, sin = (torch.randn(64, 16) for _ in range(2))

    def inputs():
        return (torch.randn(5, hidden).to(bf16), torch.randn(5, hidden).to(bf16), torch.randn(hidden).to(bf16),
                torch.randn(5, 2 * hidden).to(bf16), torch.randn(5, 4, 32).to(bf16), torch.randn(5, 2, 32).to(bf16),
                torch.tensor([0, 3, 9, 63, 1]))

    def run(x, res, w, gate_up, q, k, pos):
        out = torch.empty_like(x)
        normed = torchkiln.rms_norm(x, w)
        torchkiln.rms_norm(x, w, out=out)
        fused, summed = torchkiln.fused_add_rms_norm(x, res, w)  # updates res in place
        act = torchkiln.silu_and_mul(gate_up)
        rq, rk = torchkiln.apply_rotary(q, k, cos, sin, pos)
        torchkiln.apply_rotary(q, k, cos, sin, pos, inplace=True)
        return normed, out, fused, summed, res, act, rq, rk, q, k

    assert_same(*both_modes(inputs, run))


@pytest.mark.parametrize("sq", [1, 3, 100], ids=lambda n: f"sq{n}")  # decode kernel (1, 3) and the general path
def test_flash_attn(sq):
    def inputs():
        return (torch.randn(2, sq, 8, 64).to(bf16), torch.randn(2, 130, 2, 64).to(bf16),
                torch.randn(2, 130, 2, 64).to(bf16))

    assert_same(*both_modes(inputs, lambda q, k, v: torchkiln.flash_attn_func(q, k, v, causal=True, return_lse=True)))


def test_paged():
    lens = [37, 1, 70]

    def inputs():
        k, v, table, seq_lens = random_cache(lens, 16, 2, 64, bf16)
        return torch.randn(3, 8, 64).to(bf16), k, v, table, seq_lens, torch.randn(3, 2, 64).to(bf16)

    def run(q, k, v, table, seq_lens, new_kv):
        decode = torchkiln.paged_attention(q, k, v, table, seq_lens, return_lse=True)
        cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        cu_q = torch.arange(4, dtype=torch.int32)
        varlen = torchkiln.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lens), causal=True, block_table=table)
        cache = PagedKVCache(1, 8, 4, 2, 64, dtype=bf16)
        cache.write(0, new_kv, new_kv * 2, torch.tensor([5, -1, 30]))
        cache.copy(torch.tensor([[1, 6]]))
        return (*decode, varlen, cache.key_caches[0], cache.value_caches[0])

    assert_same(*both_modes(inputs, run))


# M past the register-decoding rows (at most 48, quant_ops.cpp) and n past
# 64 per thread: the dequantise-and-GEMM path, whose tiles run on torch's
# pool threads.
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
@pytest.mark.parametrize("m", [1, 17, 64])
def test_quant_matmul(scheme, m):
    w = torch.randn(256, 512)
    qw = quantize(w, scheme, group_size=64 if scheme in ("int4", "nf4") else None)

    def inputs():
        return torch.randn(m, 512).to(bf16), torch.randn(256).to(bf16)

    assert_same(*both_modes(inputs, lambda x, bias: torchkiln.quant_matmul(x, qw, bias)))


def test_layers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 256, bias=True)
    model = torch.nn.Sequential(torchkiln.nn.RMSNorm(512), torchkiln.nn.QuantLinear.from_linear(linear, scheme="int4"),
                                torchkiln.nn.SwiGLU(256, 384)).to(bf16)

    assert_same(*both_modes(lambda: (torch.randn(40, 512).to(bf16),), model))


def _wrapper_calls(requires_grad: bool) -> dict:
    """One call of each wrapper that goes through ops/_util.call, on inputs
    that require grad or not."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 96).to(bf16).requires_grad_(requires_grad), torch.randn(96).to(bf16).requires_grad_(requires_grad)
    gate_up = torch.randn(5, 192).to(bf16).requires_grad_(requires_grad)
    q, k, v = (torch.randn(2, n, h, 64).to(bf16).requires_grad_(requires_grad) for n, h in ((3, 8), (40, 2), (40, 2)))
    cos, sin = (torch.randn(64, 16) for _ in range(2))
    pos = torch.tensor([0, 3, 9, 63, 1])
    cu_q, cu_k = torch.tensor([0, 1, 3], dtype=torch.int32), torch.tensor([0, 30, 80], dtype=torch.int32)
    int4, w8a8 = quantize(torch.randn(64, 96), "int4", group_size=32), quantize(torch.randn(64, 96), "w8a8")
    return {
        "rms_norm": lambda: torchkiln.rms_norm(x, w),
        "silu_and_mul": lambda: torchkiln.silu_and_mul(gate_up),
        "apply_rotary": lambda: torchkiln.apply_rotary(q[0], k[0, :3], cos, sin, pos[:3]),
        "flash_attn_func": lambda: torchkiln.flash_attn_func(q, k, v, causal=True, return_lse=True),
        "flash_attn_varlen_func": lambda: torchkiln.flash_attn_varlen_func(
            q[0], k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 2, 50, causal=True, return_lse=True),
        "quant_matmul int4": lambda: torchkiln.quant_matmul(x, int4),
        "quant_matmul w8a8": lambda: torchkiln.quant_matmul(x, w8a8),
    }


def _count_guard_entries(monkeypatch) -> list:
    """Patches torch._C._AutoDispatchBelowAutograd to note, per entry, the
    module that entered it; returns the (shared) list of names."""
    entered = []
    below_autograd = torch._C._AutoDispatchBelowAutograd

    def counting():
        entered.append(sys._getframe(1).f_globals["__name__"])
        return below_autograd()

    monkeypatch.setattr(torch._C, "_AutoDispatchBelowAutograd", counting)
    return entered


def test_grad_mode_without_grad_inputs_skips_the_autograd_layer(monkeypatch):
    """In grad mode with no input requiring grad (a frozen model called
    without torch.no_grad) there is nothing to record: the wrappers call the
    ops below the Python autograd layer. With inputs that require grad they
    go through it and the results carry a grad_fn."""
    entered = _count_guard_entries(monkeypatch)
    for name, call in _wrapper_calls(requires_grad=False).items():
        entered.clear()
        got = call()
        assert entered[:1] == ["torchkiln.ops._util"], f"{name}: went through the autograd layer: {entered}"
        for a in got if isinstance(got, tuple) else (got,):
            assert a.grad_fn is None and not a.requires_grad, name
    for name, call in _wrapper_calls(requires_grad=True).items():
        entered.clear()
        got = call()
        assert entered[:1] != ["torchkiln.ops._util"], f"{name}: skipped the autograd layer with inputs needing grad"
        assert (got[0] if isinstance(got, tuple) else got).grad_fn is not None, name


def test_no_grad_skips_the_autograd_layer(monkeypatch):
    """Under torch.no_grad the wrappers call the ops below the Python autograd
    layer (ops/_util.call). Each result equals the same call in grad mode,
    made through that layer, and nothing is recorded for inputs that
    require grad."""
    calls = _wrapper_calls(requires_grad=True)
    entered = _count_guard_entries(monkeypatch)
    for name, call in calls.items():
        want = call()
        entered.clear()
        with torch.no_grad():
            got = call()
        # torch's own no-grad path (torch._library.autograd) enters it too, later
        assert entered[:1] == ["torchkiln.ops._util"], f"{name}: went through the autograd layer: {entered}"
        got, want = (r if isinstance(r, tuple) else (r,) for r in (got, want))
        assert len(got) == len(want), name
        for a, b in zip(got, want):
            assert a.grad_fn is None and not a.requires_grad, f"{name}: recorded under no_grad"
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
