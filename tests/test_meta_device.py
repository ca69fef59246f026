"""Every op with some arguments on the meta device.

Each op's fake is also its Meta kernel, and the dispatcher picks it whenever
any argument is on meta. With every argument on meta that is what we want
(shapes only: a model built on meta); with meta next to real tensors (a
weight never loaded) the fake must raise, not hand back an uninitialised
real tensor as if it were the result.
"""

from __future__ import annotations

import pytest
import torch

import torchkiln
from torchkiln.ops.paged import copy_blocks, reshape_and_cache, swap_blocks
from torchkiln.quant import quantize

bf16 = torch.bfloat16


def _cache():
    return torch.randn(6, 4, 2, 64).to(bf16)


def _qw(scheme):
    return quantize(torch.randn(48, 128), scheme, group_size=64 if scheme in ("int4", "nf4") else None)


# name -> (inputs (a list; tensors may sit in nested lists), fn(*inputs))
CASES = {
    "rms_norm": (lambda: [torch.randn(5, 96), torch.randn(96)], lambda x, w: torchkiln.rms_norm(x, w)),
    "rms_norm_out": (lambda: [torch.randn(5, 96), torch.randn(96), torch.empty(5, 96)],
                     lambda x, w, out: torchkiln.rms_norm(x, w, out=out)),
    "fused_add_rms_norm": (lambda: [torch.randn(5, 96), torch.randn(5, 96), torch.randn(96)],
                           lambda x, r, w: torchkiln.fused_add_rms_norm(x, r, w)),
    "silu_and_mul": (lambda: [torch.randn(5, 96)], lambda x: torchkiln.silu_and_mul(x)),
    "silu_and_mul_out": (lambda: [torch.randn(5, 96), torch.empty(5, 48)],
                         lambda x, out: torchkiln.silu_and_mul(x, out=out)),
    "apply_rotary": (lambda: [torch.randn(5, 4, 32), torch.randn(5, 2, 32), torch.randn(16, 16), torch.randn(16, 16),
                              torch.tensor([0, 3, 9, 15, 1])],
                     lambda q, k, c, s, p: torchkiln.apply_rotary(q, k, c, s, p)),
    "apply_rotary_inplace": (lambda: [torch.randn(5, 4, 32), torch.randn(5, 2, 32), torch.randn(16, 16),
                                      torch.randn(16, 16), torch.tensor([0, 3, 9, 15, 1])],
                             lambda q, k, c, s, p: torchkiln.apply_rotary(q, k, c, s, p, inplace=True)),
    "flash_attn_func": (lambda: [torch.randn(2, 3, 4, 64), torch.randn(2, 9, 2, 64), torch.randn(2, 9, 2, 64),
                                 torch.rand(4)],
                        lambda q, k, v, a: torchkiln.flash_attn_func(q, k, v, causal=True, alibi_slopes=a)),
    "flash_attn_varlen_func": (
        lambda: [torch.randn(5, 4, 64), torch.randn(9, 2, 64), torch.randn(9, 2, 64),
                 torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 9], dtype=torch.int32)],
        lambda q, k, v, cq, ck: torchkiln.flash_attn_varlen_func(q, k, v, cq, ck, 3, 5, causal=True)),
    "flash_attn_varlen_func(block_table)": (
        lambda: [torch.randn(3, 4, 64).to(bf16), _cache(), _cache(), torch.tensor([0, 1, 3], dtype=torch.int32),
                 torch.tensor([0, 5, 12], dtype=torch.int32), torch.tensor([[4, 1], [0, 2]], dtype=torch.int32)],
        lambda q, k, v, cq, ck, t: torchkiln.flash_attn_varlen_func(q, k, v, cq, ck, 2, 7, block_table=t)),
    "paged_attention": (
        lambda: [torch.randn(2, 4, 64).to(bf16), _cache(), _cache(), torch.tensor([[4, 1], [0, 2]], dtype=torch.int32),
                 torch.tensor([5, 7], dtype=torch.int32)],
        lambda q, k, v, t, n: torchkiln.paged_attention(q, k, v, t, n)),
    "reshape_and_cache": (
        lambda: [torch.randn(3, 2, 64).to(bf16), torch.randn(3, 2, 64).to(bf16), _cache(), _cache(),
                 torch.tensor([0, -1, 17])],
        lambda k, v, kc, vc, s: reshape_and_cache(k, v, kc, vc, s)),
    "copy_blocks": (lambda: [[_cache(), _cache()], [_cache(), _cache()], torch.tensor([[0, 3], [2, 5]])],
                    lambda kcs, vcs, m: copy_blocks(kcs, vcs, m)),
    "swap_blocks": (lambda: [_cache(), _cache(), torch.tensor([[0, 3], [2, 5]])],
                    lambda src, dst, m: swap_blocks(src, dst, m)),
    **{f"quant_matmul({s})": (lambda s=s: [torch.randn(3, 128).to(bf16), _qw(s), torch.randn(48).to(bf16)],
                              lambda x, qw, b: torchkiln.quant_matmul(x, qw, b))
       for s in ("int8", "int4", "nf4", "w8a8")},
}


def _to_meta(obj):
    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if isinstance(obj, list):
        return [_to_meta(t) for t in obj]
    if isinstance(obj, torchkiln.QuantizedWeight):
        return quantize(torch.empty(obj.out_features, obj.in_features, device="meta"), obj.scheme,
                        group_size=obj.group_size if obj.scheme in ("int4", "nf4") else None)
    return obj


def _outputs(result):
    result = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in result if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", CASES)
def test_all_on_meta_gives_shapes(name):
    make, fn = CASES[name]
    real = fn(*make())
    on_meta = fn(*[_to_meta(a) for a in make()])
    for got, want in zip(_outputs(on_meta), _outputs(real), strict=True):
        assert got.is_meta and got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("name", [n for n in CASES if n != "silu_and_mul"])  # one input: nothing to mix
def test_one_argument_on_meta_raises(name):
    make, fn = CASES[name]
    inputs = make()
    for i in range(len(inputs)):
        mixed = make()
        mixed[i] = _to_meta(mixed[i])
        with pytest.raises(RuntimeError, match="meta"):
            fn(*mixed)
