"""Single-mutation fuzz of every raw op (torch.ops.torchkiln.*), past the
Python wrappers' own checks.

Each case starts from a valid call and changes one argument: its dtype, its
shape (one more or one fewer along each dimension, an extra or a missing
dimension, empty), its layout (transposed storage, a stride-0 expand, a
strided last dimension), a value of an index tensor (-1, huge, past the end),
a NaN or inf, a scalar (negative, zero, huge, NaN), or the meta device. Every
such call must either raise a Python exception or run; a crash fails the
whole run, and under the CI's AddressSanitizer build so does any read or write
out of bounds. A layout change the op accepts must not change what it computes:
the returned tensors and the tensors it writes equal those of the same call
with that argument made contiguous.
"""

from __future__ import annotations

import pytest
import torch

import torchkiln

ops = torch.ops.torchkiln
ERRORS = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)
D = 64  # head_dim of the attention cases


def _attention_cases(dev):
    q, k, v = (torch.randn(2, n, h, D, device=dev) for n, h in ((5, 4), (7, 2), (7, 2)))
    yield "flash_attn_fwd", ops.flash_attn_fwd, [q, k, v, 0.125, -1, 0, 0.0, torch.rand(4, device=dev)]
    out, lse = ops.flash_attn_fwd(q, k, v, 0.125, -1, 0, 0.0, None)
    yield "flash_attn_bwd", ops.flash_attn_bwd, [torch.randn_like(out), q, k, v, out, lse, 0.125, -1, 0, 0.0, None]
    qv, kv, vv = torch.randn(9, 4, D, device=dev), torch.randn(12, 2, D, device=dev), torch.randn(12, 2, D, device=dev)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32, device=dev)
    varlen = [qv, kv, vv, cu_q, cu_k, 5, 7, 0.125, -1, 0, 0.0, None]
    yield "flash_attn_varlen_fwd", ops.flash_attn_varlen_fwd, varlen + [None]
    o, l = ops.flash_attn_varlen_fwd(*varlen, None)
    yield "flash_attn_varlen_bwd", ops.flash_attn_varlen_bwd, [torch.randn_like(o), qv, kv, vv, o, l, *varlen[3:]]
    kc, vc = torch.randn(6, 4, 2, D, device=dev), torch.randn(6, 4, 2, D, device=dev)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=dev)
    cu_cached = torch.tensor([0, 10, 22], dtype=torch.int32, device=dev)
    yield "flash_attn_varlen_fwd paged", ops.flash_attn_varlen_fwd, [
        qv, kc, vc, cu_q, cu_cached, 5, 12, 0.125, -1, 0, 0.0, None, table]
    lens = torch.tensor([10, 12], dtype=torch.int32, device=dev)
    yield "paged_attention", ops.paged_attention, [
        torch.randn(2, 4, D, device=dev), kc, vc, table, lens, 0.125, -1, -1, 0.0, None]
    slots = torch.tensor([0, 5, -1], device=dev)
    yield "reshape_and_cache", ops.reshape_and_cache, [
        torch.randn(3, 2, D, device=dev), torch.randn(3, 2, D, device=dev), kc.clone(), vc.clone(), slots]
    pairs = torch.tensor([[0, 1], [2, 3]])
    yield "copy_blocks", ops.copy_blocks, [[kc.clone(), kc.clone()], [vc.clone(), vc.clone()], pairs]
    yield "swap_blocks", ops.swap_blocks, [kc, kc.clone(), pairs]


def _layer_cases(dev):
    x, w = torch.randn(3, 5, 96, device=dev).bfloat16(), torch.randn(96, device=dev).bfloat16()
    yield "rms_norm", ops.rms_norm, [x, w, 1e-6]
    yield "rms_norm_out", ops.rms_norm_out, [torch.empty_like(x), x, w, 1e-6]
    yield "fused_add_rms_norm", ops.fused_add_rms_norm, [x, x.clone(), w, 1e-6]
    yield "fused_add_rms_norm_out", ops.fused_add_rms_norm_out, [torch.empty_like(x), x, x.clone(), w, 1e-6]
    yield "rms_norm_backward", ops.rms_norm_backward, [torch.randn_like(x), x, w, 1e-6, None]
    cos, sin = torch.randn(16, 16, device=dev), torch.randn(16, 16, device=dev)
    xr, pos = torch.randn(5, 3, 40, device=dev), torch.tensor([0, 3, 15, 2, 1], device=dev)
    yield "rotary_embedding", ops.rotary_embedding, [xr, cos, sin, pos, False, False]
    yield "rotary_embedding_", ops.rotary_embedding_, [xr.clone(), xr.clone(), cos, sin, pos, True]
    g = torch.randn(3, 2 * 40, device=dev)
    yield "silu_and_mul", ops.silu_and_mul, [g]
    yield "silu_and_mul_out", ops.silu_and_mul_out, [torch.empty(3, 40, device=dev), g]
    yield "silu_and_mul_backward", ops.silu_and_mul_backward, [torch.randn(3, 40, device=dev), g]


def _quant_cases(dev):
    weight = torch.randn(48, 256)
    x = torch.randn(3, 256, device=dev).bfloat16()
    bias = torch.randn(48, device=dev).bfloat16()
    for scheme in ("int8", "int4", "nf4", "w8a8"):
        qw = torchkiln.quantize(weight, scheme, group_size=64 if scheme in ("int4", "nf4") else None).to(dev)
        if scheme == "w8a8":
            yield "quant_matmul_w8a8", ops.quant_matmul_w8a8, [x, qw.qweight, qw.scales, qw.weight_sums, bias]
            continue
        packed = [qw.qweight, qw.scales, qw.zeros]
        yield f"quant_matmul_weight_only {scheme}", ops.quant_matmul_weight_only, [
            x, *packed, bias, scheme, qw.group_size]
        yield f"quant_matmul_weight_only_grad_input {scheme}", ops.quant_matmul_weight_only_grad_input, [
            torch.randn(3, 48, device=dev).bfloat16(), *packed, scheme, qw.group_size, 256]
        yield f"quant_dequantize {scheme}", ops.quant_dequantize, [*packed, scheme, qw.group_size, 256, torch.bfloat16]
    if dev == "cpu":
        yield "quant_quantize", ops.quant_quantize, [weight, "int4", 64, False]


def base_cases(dev):
    return {name: (op, args) for name, op, args in (*_attention_cases(dev), *_layer_cases(dev), *_quant_cases(dev))}


CASE_NAMES = list(base_cases("cpu"))
# Ops that take some argument in more than one layout, so the comparison
# below must have run for them. quant_dequantize reads only packed weights,
# which come from quantize in the one layout the kernels read.
TAKE_ANY_LAYOUT = [n for n in CASE_NAMES if not n.startswith("quant_dequantize")]

# Same values (for a tensor of >= 2 elements), other strides.
LAYOUTS = {
    "transposed storage": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else None,
    "strided last dim": lambda t: torch.stack([t, t], -1)[..., 0] if t.dim() >= 1 else None,
    "expanded": lambda t: t[:1].expand(t.shape) if t.dim() >= 1 and t.numel() > 1 else None,
}


def _shape_and_value_mutations(t: torch.Tensor, gen: torch.Generator):
    floating = t.is_floating_point()
    yield "float16" if floating else "int16", t.to(torch.float16 if floating else torch.int16)
    yield "float64", t.double()
    if t.dtype == torch.int32:
        yield "int64", t.long()
    if t.dtype == torch.int64:
        yield "int32", t.int()
    if floating:
        yield "int32", t.to(torch.int32)
    yield "empty", t[:0] if t.dim() else t.reshape(1)[:0]
    yield "0-dim", t.reshape(-1)[0] if t.numel() else torch.zeros((), dtype=t.dtype, device=t.device)
    yield "extra dim", t.unsqueeze(0)
    if t.dim() > 1:
        yield "flattened", t.reshape(-1)
    for d in range(t.dim()):
        grown = list(t.shape)
        grown[d] += 1
        yield f"dim {d} + 1", torch.zeros(grown, dtype=t.dtype, device=t.device).copy_(
            torch.randn(grown, generator=gen).to(t.dtype))
        if t.size(d) > 1:
            yield f"dim {d} - 1", t.narrow(d, 0, t.size(d) - 1)
    if not floating and t.numel():
        info = torch.iinfo(t.dtype)
        for value in (-1, -5, 7, 12, 13, 24, 100, 2**31 - 1):
            if info.min <= value <= info.max:
                u = t.clone()
                u.view(-1)[int(torch.randint(t.numel(), (1,), generator=gen))] = value
                yield f"a value {value}", u
        yield "reversed", t.flip(-1).contiguous() if t.dim() else t
    if floating and t.numel():
        for value in (float("nan"), float("inf")):
            u = t.clone()
            u.view(-1)[0] = value
            yield f"a {value}", u
    yield "meta", t.to("meta")


def _scalar_mutations(a):
    if isinstance(a, bool) or isinstance(a, torch.dtype):
        return
    if isinstance(a, int):
        values = (-2, -1, 0, 1, 3, 1000, 2**40, -(2**40))
    elif isinstance(a, float):
        values = (0.0, -1.0, float("nan"), float("inf"), 1e30, -1e-30)
    elif isinstance(a, str):
        values = ("", "int2", "INT4")
    else:
        return
    for v in values:
        yield repr(v), v


def _clone(args):
    def one(a):
        if isinstance(a, torch.Tensor):
            return a if a.device.type == "meta" else a.clone()
        if isinstance(a, list):
            return [one(t) for t in a]
        return a

    return [one(a) for a in args]


def _written(op, args):
    """The tensors op writes (schema `Tensor(a!)`), as a flat list."""
    written = []
    for arg, value in zip(op.default._schema.arguments, args):
        if arg.alias_info is not None and arg.alias_info.is_write and value is not None:
            written.extend(value if isinstance(value, list) else [value])
    return written


def _results(op, args):
    out = op(*args)
    returned = [] if out is None else list(out) if isinstance(out, (tuple, list)) else [out]
    return returned + _written(op, args)


def _assert_same(got, want, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_mutated_calls_raise_or_run(backend, name):
    cases = base_cases(backend)
    if name not in cases:
        pytest.skip(f"{name} has no {backend} kernel")
    op, args = cases[name]
    _results(op, _clone(args))  # the unmutated call is valid
    gen = torch.Generator().manual_seed(len(name))
    accepted_layouts = 0
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            tensors = [(m, t) for m, t in _shape_and_value_mutations(a, gen)]
            tensors += [(m, f(a)) for m, f in LAYOUTS.items() if f(a) is not None]
            mutations = tensors
        elif isinstance(a, list):  # a list of caches: mutate its first tensor, or the list itself
            mutations = [("one element", a[:1]), ("no elements", [])]
            mutations += [(f"element 0 {m}", [t, *a[1:]]) for m, t in _shape_and_value_mutations(a[0], gen)]
        elif a is None:
            mutations = [("a tensor for None", torch.randn(4, device=backend))]
        else:
            mutations = list(_scalar_mutations(a))
        for what, value in mutations:
            label = f"{name}: argument {i} {what}"
            mutated = _clone(args)
            mutated[i] = value
            plain = _clone(args)  # the same call with the mutated argument contiguous
            plain[i] = value.contiguous() if what in LAYOUTS else None  # (a copy: the op may write value)
            try:
                got = _results(op, mutated)
            except ERRORS:
                continue
            if what in LAYOUTS:
                accepted_layouts += 1
                try:
                    want = _results(op, plain)
                except ERRORS:
                    continue  # e.g. an expanded index tensor that repeats a row the op rejects
                _assert_same(got, want, label)
    if name in TAKE_ANY_LAYOUT:
        assert accepted_layouts > 0, f"{name}: no layout change was accepted, so none was compared"
