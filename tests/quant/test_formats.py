"""Quantised weights as objects: GPTQ / AWQ import, safetensors round trips,
QuantLinear and quantize_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchkiln
from quant_reference import pack_awq, pack_gptq
from torchkiln.nn import QuantLinear, quantize_model


def _random_int4(k: int, n: int, group: int):
    codes = torch.randint(0, 16, (k, n))
    zeros = torch.randint(1, 16, (k // group, n))  # GPTQ stores zero - 1, so zero >= 1
    scales = (torch.rand(k // group, n) * 0.02 + 0.001).half()
    return codes, zeros, scales


def _dense(codes, zeros, scales, group_of_k):
    # W[n, k] = scale[g(k), n] * (q[k, n] - zero[g(k), n])
    s = scales.float()[group_of_k]  # (k, n)
    z = zeros.float()[group_of_k]
    return ((codes.float() - z) * s).t()


@pytest.mark.parametrize("group", [32, 128])
def test_from_gptq_matches_dense(group):
    k, n = 256, 48
    codes, zeros, scales = _random_int4(k, n, group)
    qweight, qzeros = pack_gptq(codes, zeros)
    qw = torchkiln.from_gptq(qweight, qzeros, scales, bits=4, group_size=group)
    ref = _dense(codes, zeros, scales, torch.arange(k) // group)
    assert torch.equal(torchkiln.dequantize(qw), ref)
    assert qw.k_perm is None
    # an explicit trivial g_idx is the same checkpoint
    qw2 = torchkiln.from_gptq(qweight, qzeros, scales, g_idx=torch.arange(k, dtype=torch.int32) // group,
                              group_size=group)
    assert qw2.k_perm is None and torch.equal(torchkiln.dequantize(qw2), ref)


def test_from_gptq_act_order():
    k, n, group = 256, 40, 64
    codes, zeros, scales = _random_int4(k, n, group)
    g_idx = (torch.arange(k) // group)[torch.randperm(k)].to(torch.int32)  # act-order: groups scattered
    qweight, qzeros = pack_gptq(codes, zeros)
    qw = torchkiln.from_gptq(qweight, qzeros, scales, g_idx=g_idx, group_size=group)
    ref = _dense(codes, zeros, scales, g_idx.long())
    assert qw.k_perm is not None
    assert torch.equal(torchkiln.dequantize(qw), ref)
    x = torch.randn(5, k)
    torch.testing.assert_close(torchkiln.quant_matmul(x, qw).double(), x.double() @ ref.double().T,
                               rtol=1e-4, atol=1e-4)


def test_from_awq_matches_dense():
    k, n, group = 256, 64, 128
    codes, zeros, scales = _random_int4(k, n, group)
    zeros = zeros - 1  # AWQ stores the zero point itself (0..15)
    qweight, qzeros = pack_awq(codes, zeros)
    qw = torchkiln.from_awq(qweight, qzeros, scales, group_size=group)
    ref = _dense(codes, zeros, scales, torch.arange(k) // group)
    assert torch.equal(torchkiln.dequantize(qw), ref)
    x = torch.randn(3, k).bfloat16()
    out = torchkiln.quant_matmul(x, qw)
    ref_out = x.double() @ ref.double().T
    assert ((out.double() - ref_out).norm() / ref_out.norm()) < 1e-2


def test_import_bad_inputs():
    codes, zeros, scales = _random_int4(256, 48, 128)
    qweight, qzeros = pack_gptq(codes, zeros)
    with pytest.raises(NotImplementedError, match="only bits=4"):
        torchkiln.from_gptq(qweight, qzeros, scales, bits=8)
    with pytest.raises(TypeError, match="qweight must be a 2-D int32 tensor"):
        torchkiln.from_gptq(qweight.long(), qzeros, scales)
    with pytest.raises(ValueError, match=r"scales must be \(2, 48\)"):
        torchkiln.from_gptq(qweight, qzeros, scales[:1])
    with pytest.raises(ValueError, match="every group in g_idx"):
        torchkiln.from_gptq(qweight, qzeros, scales, g_idx=torch.zeros(256, dtype=torch.int32).index_fill_(0, torch.tensor([0]), 1))
    with pytest.raises(ValueError, match=r"g_idx must be \(256,\)"):
        torchkiln.from_gptq(qweight, qzeros, scales, g_idx=torch.zeros(10, dtype=torch.int32))
    aq, az = pack_awq(codes, zeros - 1)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        torchkiln.from_awq(aq, az, scales, group_size=100)


@pytest.mark.parametrize("scheme,kw", [("int8", {}), ("int4", {"group_size": 64}), ("int4", {"symmetric": True}),
                                       ("nf4", {}), ("nf4", {"double_quant": True}), ("w8a8", {})])
def test_save_load_round_trip(tmp_path, scheme, kw):
    qw = torchkiln.quantize(torch.randn(40, 256), scheme, **kw)
    path = tmp_path / "w.safetensors"
    qw.save(str(path))
    back = torchkiln.QuantizedWeight.load(str(path))
    assert (back.scheme, back.shape, back.group_size, back.symmetric) == (qw.scheme, qw.shape, qw.group_size,
                                                                          qw.symmetric)
    assert torch.equal(torchkiln.dequantize(back), torchkiln.dequantize(qw))
    x = torch.randn(3, 256)
    assert torch.equal(torchkiln.quant_matmul(x, back), torchkiln.quant_matmul(x, qw))
    if kw.get("double_quant"):
        # saved without the fp32 absmax: 8-bit codes + one scale per 256
        with open(path, "rb") as f:
            assert b'"scales"' not in f.read(4096)


def test_save_load_act_order(tmp_path):
    codes, zeros, scales = _random_int4(128, 32, 32)
    qweight, qzeros = pack_gptq(codes, zeros)
    g_idx = (torch.arange(128) // 32)[torch.randperm(128)].to(torch.int32)
    qw = torchkiln.from_gptq(qweight, qzeros, scales, g_idx=g_idx, group_size=32)
    qw.save(str(tmp_path / "a.safetensors"))
    back = torchkiln.QuantizedWeight.load(str(tmp_path / "a.safetensors"))
    assert torch.equal(back.k_perm, qw.k_perm)
    assert torch.equal(torchkiln.dequantize(back), torchkiln.dequantize(qw))


def test_load_version_1_fp32_zeros(tmp_path):
    """Files written before version 2 hold int4 zero points as fp32; they load
    into uint8 exactly, and zero points that are not whole numbers are refused."""
    from safetensors.torch import save_file

    qw = torchkiln.quantize(torch.randn(24, 256), "int4", group_size=64)
    assert qw.zeros.dtype == torch.uint8
    # 64 codes (32 bytes) + an fp32 scale + a one-byte zero per group
    assert qw.nbytes() == 24 * 128 + 24 * 4 * (4 + 1)
    v1 = {**qw.metadata(), "version": "1"}
    tensors = {**qw.tensors(), "zeros": qw.zeros.to(torch.float32)}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=v1)
    back = torchkiln.QuantizedWeight.load(str(tmp_path / "v1.safetensors"))
    assert back.zeros.dtype == torch.uint8 and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(torchkiln.dequantize(back), torchkiln.dequantize(qw))
    tensors["zeros"] = tensors["zeros"] + 0.5
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=v1)
    with pytest.raises(ValueError, match="zeros must be whole numbers"):
        torchkiln.QuantizedWeight.load(str(tmp_path / "bad.safetensors"))


def test_weight_object_bad_inputs():
    qw = torchkiln.quantize(torch.randn(8, 64), "int4", group_size=32)
    with pytest.raises(ValueError, match="scheme must be one of"):
        torchkiln.QuantizedWeight("int3", 64, 8, 32, False, qw.qweight, qw.scales)
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        torchkiln.dequantize(qw, torch.int32)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 64\)"):
        torchkiln.quant_matmul(torch.tensor(1.0), qw)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a torchkiln quantised weight"):
        torchkiln.QuantizedWeight.load(str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
def test_quant_linear(scheme):
    lin = nn.Linear(128, 40)
    q = QuantLinear.from_linear(lin, scheme, group_size=64 if scheme in ("int4", "nf4") else None)
    x = torch.randn(2, 7, 128, requires_grad=True)
    y = q(x)
    w = torchkiln.dequantize(q.qweight_spec)
    ref = torch.nn.functional.linear(x.detach(), w, lin.bias.detach())
    if scheme != "w8a8":
        torch.testing.assert_close(y.detach(), ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad is not None and q.bias.grad is not None
    torch.testing.assert_close(x.grad, torch.ones(2, 7, 40) @ w)
    # the quantised weight travels with state_dict
    q2 = QuantLinear.from_linear(nn.Linear(128, 40), scheme, group_size=64 if scheme in ("int4", "nf4") else None)
    q2.load_state_dict(q.state_dict())
    torch.testing.assert_close(q2(x), y)
    assert scheme in repr(q)
    # model.to(dtype) converts the bias, never the codes or the fp32 scales
    scales_before = q.scales.clone()
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float32 and torch.equal(q.scales, scales_before)
    assert q.bias.dtype == torch.bfloat16
    xb = x.detach().bfloat16()
    assert q(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("scheme,kw", [("int8", {}), ("int4", {"group_size": 32}),
                                       ("nf4", {"group_size": 32, "double_quant": True}), ("w8a8", {})])
@pytest.mark.parametrize("fill", ["to_empty", "assign"])
def test_quantize_model_on_meta_then_load(scheme, kw, fill):
    """A big model is built on the meta device, quantised there (no dense
    weight ever exists) and filled from a saved quantised state_dict."""
    def make():
        return nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64, bias=False))

    saved = quantize_model(make(), scheme, skip=(), **kw)
    x = torch.randn(5, 128)
    ref = saved(x)
    with torch.device("meta"):
        model = make()
    quantize_model(model, scheme, skip=(), **kw)
    for name, t in saved.state_dict().items():
        got = model.state_dict()[name]
        assert got.is_meta and got.shape == t.shape and got.dtype == t.dtype, name
    assert model(torch.randn(5, 128, device="meta")).shape == (5, 64)
    with pytest.raises(NotImplementedError, match="meta"):
        model.to("cpu")  # no data to copy, as for any meta module
    if fill == "to_empty":
        model.to_empty(device="cpu")
        model.load_state_dict(saved.state_dict())
    else:
        model.load_state_dict(saved.state_dict(), assign=True)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_quantize_model_skips_patterns():
    model = nn.Sequential()
    model.add_module("layers", nn.ModuleList([nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64))
                                               for _ in range(2)]))
    model.add_module("lm_head", nn.Linear(64, 100))
    x = torch.randn(3, 64)

    def run(m):
        h = x
        for blk in m.layers:
            h = blk(h)
        return m.lm_head(h)

    ref = run(model)
    quantize_model(model, "int8", skip=("lm_head", "layers.1.2"))
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.layers[0][0], QuantLinear) and isinstance(model.layers[0][2], QuantLinear)
    assert isinstance(model.layers[1][0], QuantLinear) and type(model.layers[1][2]) is nn.Linear
    out = run(model)
    assert ((out - ref).norm() / ref.norm()) < 0.05  # int8 weights: small, nonzero error
