"""Every public op under torch.inference_mode, the mode serving code runs in.

Inputs are made inside the mode (inference tensors, as a server's would be)
and each result must equal the same call made outside it. An op that hands
work to torch's thread pool must carry the mode along: pool threads start
without it, and writing an inference tensor from outside the mode raises.
"""

from __future__ import annotations

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
