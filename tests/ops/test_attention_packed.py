"""The packed-input attention calls equal the unpacked ones on the same data,
bit for bit, forward and backward (the gradient lands in the packed tensor),
on every CPU ISA and on CUDA; shapes that don't pack raise."""

from __future__ import annotations

import pytest
import torch

import torchkiln

BF16 = torch.bfloat16


def _grads(fn, inputs, dout):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(dout)
    return out, [t.grad for t in inputs]


def test_qkvpacked_and_kvpacked(backend):
    dev = backend
    batch, sq, sk, heads, heads_k, d = 2, 37, 53, 4, 2, 64
    qkv = torch.randn(batch, sq, 3, heads, d, device=dev).to(BF16)
    q = torch.randn(batch, sq, heads, d, device=dev).to(BF16)
    kv = torch.randn(batch, sk, 2, heads_k, d, device=dev).to(BF16)
    dout = torch.randn(batch, sq, heads, d, device=dev).to(BF16)
    kw = dict(causal=True, softcap=3.0)

    out, (dqkv,) = _grads(lambda t: torchkiln.flash_attn_qkvpacked_func(t, **kw), [qkv], dout)
    ref, grads = _grads(lambda *t: torchkiln.flash_attn_func(*t, **kw), qkv.unbind(2), dout)
    assert torch.equal(out, ref) and torch.equal(dqkv, torch.stack(grads, dim=2))

    out, (dq, dkv) = _grads(lambda a, b: torchkiln.flash_attn_kvpacked_func(a, b, **kw), [q, kv], dout)
    ref, (rq, rk, rv) = _grads(lambda *t: torchkiln.flash_attn_func(*t, **kw), [q, *kv.unbind(2)], dout)
    assert torch.equal(out, ref) and torch.equal(dq, rq) and torch.equal(dkv, torch.stack((rk, rv), dim=2))


def test_varlen_qkvpacked_and_kvpacked(backend):
    dev = backend
    lens_q, lens_k, heads, heads_k, d = [5, 1, 30], [9, 1, 40], 4, 2, 64
    cu_q = torch.tensor([0, 5, 6, 36], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 9, 10, 50], dtype=torch.int32, device=dev)
    qkv = torch.randn(36, 3, heads, d, device=dev).to(BF16)
    q = torch.randn(36, heads, d, device=dev).to(BF16)
    kv = torch.randn(50, 2, heads_k, d, device=dev).to(BF16)
    dout = torch.randn(36, heads, d, device=dev).to(BF16)

    out, (dqkv,) = _grads(lambda t: torchkiln.flash_attn_varlen_qkvpacked_func(t, cu_q, 30, causal=True), [qkv],
                          dout)
    ref, grads = _grads(lambda *t: torchkiln.flash_attn_varlen_func(*t, cu_q, cu_q, 30, 30, causal=True),
                        qkv.unbind(1), dout)
    assert torch.equal(out, ref) and torch.equal(dqkv, torch.stack(grads, dim=1))

    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    out, (dq, dkv) = _grads(lambda a, b: torchkiln.flash_attn_varlen_kvpacked_func(a, b, *args, window_size=(4, 2)),
                            [q, kv], dout)
    ref, (rq, rk, rv) = _grads(lambda *t: torchkiln.flash_attn_varlen_func(*t, *args, window_size=(4, 2)),
                               [q, *kv.unbind(1)], dout)
    assert torch.equal(out, ref) and torch.equal(dq, rq) and torch.equal(dkv, torch.stack((rk, rv), dim=1))
    out, lse = torchkiln.flash_attn_varlen_kvpacked_func(q, kv, *args, return_lse=True)
    assert lse.shape == (heads, 36)


def test_bad_packing():
    qkv = torch.randn(2, 8, 3, 4, 32)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"flash_attn_qkvpacked_func: qkv must be \(batch, seqlen, 3, heads"):
        torchkiln.flash_attn_qkvpacked_func(qkv[:, :, :2])
    with pytest.raises(ValueError, match=r"flash_attn_qkvpacked_func: qkv must be .* got shape \(8, 3, 4, 32\)"):
        torchkiln.flash_attn_qkvpacked_func(qkv[0])
    with pytest.raises(ValueError, match=r"flash_attn_kvpacked_func: kv must be \(batch, seqlen_k, 2, heads_k"):
        torchkiln.flash_attn_kvpacked_func(qkv[:, :, 0], qkv)
    with pytest.raises(ValueError, match=r"flash_attn_varlen_qkvpacked_func: qkv must be \(total_tokens, 3"):
        torchkiln.flash_attn_varlen_qkvpacked_func(qkv, cu, 8)
    with pytest.raises(ValueError, match=r"flash_attn_varlen_kvpacked_func: kv must be \(total_k, 2, heads_k"):
        torchkiln.flash_attn_varlen_kvpacked_func(qkv[0, :, 0], qkv[0], cu, cu, 8, 8)
