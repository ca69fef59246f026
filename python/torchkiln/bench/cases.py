"""Benchmark cases: shapes from the targets of the foundation issue, each with
our call, the eager PyTorch baseline on the same inputs, and the bytes the
op must move at minimum (for GB/s against the copy ceiling)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.activation import silu_and_mul, silu_and_mul_ref
from ..ops.attention import flash_attn_func, flash_attn_varlen_func
from ..ops.kvcache import flash_attn_with_kvcache
from ..ops.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from ..ops.paged import paged_attention
from ..ops.quant import quant_matmul
from ..ops.rotary import apply_rotary, rope_cos_sin

_ops = torch.ops.torchkiln

FAMILIES = ("norm", "activation", "rope", "attention", "paged", "quant", "comm")


@dataclass(frozen=True)
class Prepared:
    ours: Callable[[], object]
    baseline: Callable[[], object]
    min_bytes: int  # compulsory traffic of the fused op: inputs read once, outputs written once
    flops: int = 0  # useful floating-point work, for compute-bound ops (0: memory-bound)


@dataclass(frozen=True)
class BenchCase:
    family: str
    name: str  # op and direction, e.g. "rms_norm fwd"
    shape: str
    dtype: torch.dtype
    setup: Callable[[str], Prepared]
    cuda: bool = True  # has a CUDA kernel to time
    cpu: bool = True  # False: a GPU-only shape


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


def _attention_flops(batch, heads, sq, sk, d, causal):
    pairs = sq * sk - (sq * (sq - 1) // 2 if causal else 0)  # visible (query, key) pairs, sq == sk
    return 4 * batch * heads * pairs * d  # QK^T and PV, 2 FLOPs per multiply-add


def _sdpa(q, k, v, causal):
    """torch's SDPA on the same (batch, seq, heads, dim) tensors, viewed (batch, heads, seq, dim)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    )
    return out.transpose(1, 2)


def _attention_fwd(batch, heads, seq, d, dtype, causal=True):
    def setup(device):
        q, k, v = (_randn(batch, seq, heads, d, dtype=dtype, device=device) for _ in range(3))
        return Prepared(
            lambda: flash_attn_func(q, k, v, causal=causal),
            lambda: _sdpa(q, k, v, causal),
            4 * q.nbytes,
            _attention_flops(batch, heads, seq, seq, d, causal),
        )

    return setup


def _attention_fwd_bwd(batch, heads, seq, d, dtype, causal=True):
    def setup(device):
        q, k, v = (_randn(batch, seq, heads, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
        g = _randn(batch, seq, heads, d, dtype=dtype, device=device)
        ours = lambda a, b, c: flash_attn_func(a, b, c, causal=causal)  # noqa: E731
        base = lambda a, b, c: _sdpa(a, b, c, causal)  # noqa: E731
        # The backward does 2.5x the forward's matmul work (flash-attn's count).
        return Prepared(
            _grad_call(ours, (q, k, v), g), _grad_call(base, (q, k, v), g), 10 * q.nbytes,
            int(3.5 * _attention_flops(batch, heads, seq, seq, d, causal)),
        )

    return setup


def _attention_decode(batch, sq, sk, heads, kv_heads, d, dtype):
    """A few new queries (decode, speculative tokens) against a KV cache held
    as one contiguous tensor, causal (bottom-right), GQA; baseline SDPA with
    the same mask."""

    def setup(device):
        q = _randn(batch, sq, heads, d, dtype=dtype, device=device)
        k, v = (_randn(batch, sk, kv_heads, d, dtype=dtype, device=device) for _ in range(2))
        mask = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return Prepared(
            lambda: flash_attn_func(q, k, v, causal=True),
            lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True),
            2 * q.nbytes + k.nbytes + v.nbytes,
        )

    return setup


def _kvcache_decode(batch, ctx, heads, kv_heads, d, dtype):
    """flash_attn_with_kvcache's decode step (append one token per sequence
    to a contiguous cache, attend over ctx keys) against the same two steps
    in plain PyTorch: an indexed write and SDPA over the filled rows. Every
    call writes the same slot, so the lengths stay put."""

    def setup(device):
        q = _randn(batch, 1, heads, d, dtype=dtype, device=device)
        k, v = (_randn(batch, 1, kv_heads, d, dtype=dtype, device=device) for _ in range(2))
        kc, vc = (_randn(batch, ctx + 64, kv_heads, d, dtype=dtype, device=device) for _ in range(2))
        lens = torch.full((batch,), ctx - 1, dtype=torch.int32, device=device)
        qt = q.transpose(1, 2)

        def baseline():
            kc[:, ctx - 1], vc[:, ctx - 1] = k[:, 0], v[:, 0]
            kt, vt = kc[:, :ctx].transpose(1, 2), vc[:, :ctx].transpose(1, 2)
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

        return Prepared(
            lambda: flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True),
            baseline,
            2 * q.nbytes + 2 * batch * ctx * kv_heads * d * kc.element_size(),
        )

    return setup


def _attention_varlen(lengths, heads, d, dtype):
    """Packed varlen against SDPA on the same batch padded to the longest sequence."""

    def setup(device):
        total, longest = sum(lengths), max(lengths)
        q, k, v = (_randn(total, heads, d, dtype=dtype, device=device) for _ in range(3))
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        padded = [torch.zeros(len(lengths), longest, heads, d, dtype=dtype, device=device) for _ in range(3)]
        for b, n in enumerate(lengths):
            for dst, src in zip(padded, (q, k, v)):
                dst[b, :n] = src[cu[b] : cu[b] + n]
        flops = sum(_attention_flops(1, heads, n, n, d, True) for n in lengths)
        return Prepared(
            lambda: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True),
            lambda: _sdpa(*padded, True),
            4 * q.nbytes,
            flops,
        )

    return setup


def _paged_decode(seqs, heads, kv_heads, ctx, d, block_size, dtype, baseline):
    """Decode over a paged cache with shuffled blocks; the baseline reads the
    same K/V from a contiguous cache (torch SDPA with GQA, or torchkiln's own
    flash_attn_func)."""

    def setup(device):
        blocks_per_seq = (ctx + block_size - 1) // block_size
        num_blocks = seqs * blocks_per_seq
        k_cache = _randn(num_blocks, block_size, kv_heads, d, dtype=dtype, device=device)
        v_cache = _randn(num_blocks, block_size, kv_heads, d, dtype=dtype, device=device)
        table = torch.randperm(num_blocks, device=device).to(torch.int32).view(seqs, blocks_per_seq)
        lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
        q = _randn(seqs, heads, d, dtype=dtype, device=device)
        k = k_cache[table.long()].flatten(1, 2)[:, :ctx]  # (seqs, ctx, kv_heads, d), contiguous copy
        v = v_cache[table.long()].flatten(1, 2)[:, :ctx]
        if baseline == "sdpa":
            kt, vt, qt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), q[:, :, None]

            def base():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        else:

            def base():
                return flash_attn_func(q[:, None], k, v, causal=True)

        return Prepared(
            lambda: paged_attention(q, k_cache, v_cache, table, lens), base, k.nbytes + v.nbytes + 2 * q.nbytes
        )

    return setup


# Decode reads every weight once per token and a model's weights never fit in
# cache, so each call of a quant case uses the next of several weight copies
# that together exceed this (3x the 32 MiB L3 here): timings are DRAM-bound
# like real decoding, for torchkiln and the baseline alike.
_ROTATION_BYTES = 96 << 20


def _rotating(make, nbytes):
    """A callable cycling through enough copies from make() to span _ROTATION_BYTES."""
    copies = [make() for _ in range(max(1, -(-_ROTATION_BYTES // max(1, nbytes))))]
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    return next_copy


def _aten_int4(qw):
    """The same int4 weight in ATen's CPU int4 format: W = (q - 8) * scale + offset."""
    from ..quant import unpack_codes

    codes = unpack_codes(qw).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale = qw.scales.t()
    offset = (8 - qw.zeros.t().to(torch.float32)) * scale
    return packed, torch.stack([scale, offset], dim=-1).to(torch.bfloat16).contiguous()


def _quant_matmul_case(m, k, n, scheme, baseline, dtype, int4_group=128):
    """quant_matmul on (m, k) activations against one baseline on the same weights:
    'dense' = F.linear with the bf16 weight, 'aten' = ATen's int4 / int8 CPU kernels."""

    def setup(device):
        from ..quant import dequantize, quantize

        x = _randn(m, k, dtype=dtype, device=device)
        gs = int4_group if scheme == "int4" else None

        def make():
            w = torch.randn(n, k, device=device) * 0.02
            qw = quantize(w, scheme, group_size=gs)
            if baseline == "dense":
                other = dequantize(qw, dtype)
            elif scheme == "int4":
                other = _aten_int4(qw)
            else:
                other = (dequantize(qw, torch.float32).div(qw.scales).round().to(torch.int8),
                         qw.scales.reshape(-1).to(dtype))
            return qw, other

        qw0 = quantize(torch.randn(n, k, device=device), scheme, group_size=gs)
        wbytes = sum(t.numel() * t.element_size() for t in (qw0.qweight, qw0.scales, qw0.zeros, qw0.weight_sums)
                     if t is not None)
        # sized by the quantised weight, the smaller of the two (ATen's int4
        # format is about as small), so both span the rotation
        next_copy = _rotating(make, wbytes)
        if baseline == "dense":
            base = lambda: torch.nn.functional.linear(x, next_copy()[1])  # noqa: E731
        elif scheme == "int4":
            def base():
                packed, sz = next_copy()[1]
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, gs, sz)
        else:
            def base():
                w8, sc = next_copy()[1]
                return torch._weight_int8pack_mm(x, w8, sc)

        flops = 2 * m * n * k if m > 1 else 0
        return Prepared(lambda: quant_matmul(x, next_copy()[0]), base, wbytes + x.nbytes + m * n * x.element_size(),
                        flops)

    return setup


def _quant_grad_case(m, k, n, scheme, dtype):
    """The input gradient of quant_matmul (QLoRA's backward through a frozen
    base layer), grad (m, n) @ W, against the dense bf16 weight's grad @ W
    (what a bf16 nn.Linear's backward computes for its input)."""

    def setup(device):
        from ..quant import dequantize, quantize

        g = _randn(m, n, dtype=dtype, device=device)
        gs = {"int4": 128, "nf4": 64}.get(scheme)

        def make():
            qw = quantize(torch.randn(n, k, device=device) * 0.02, scheme, group_size=gs)
            return qw, dequantize(qw, dtype)

        qw0 = make()[0]
        wbytes = sum(t.numel() * t.element_size() for t in (qw0.qweight, qw0.scales, qw0.zeros) if t is not None)
        next_copy = _rotating(make, wbytes)

        def ours():
            qw = next_copy()[0]
            return torch.ops.torchkiln.quant_matmul_weight_only_grad_input(
                g, qw.qweight, qw.scales, qw.zeros, qw.scheme, qw.group_size, k)

        return Prepared(ours, lambda: g @ next_copy()[1], wbytes + g.nbytes + m * k * g.element_size(), 2 * m * n * k)

    return setup


def _quantize_case(k, n, scheme, dtype):
    """torchkiln.quantize (C++ on CPU) against the same scheme written in plain
    PyTorch over the whole weight (the definitions in quant/quantize.py)."""

    def setup(device):
        from ..quant import layout, quantize
        from ..quant.quantize import int4_codes, nf4_codes

        w = _randn(n, k, dtype=dtype, device=device) * 0.02
        gs = {"int4": 128, "nf4": 64}[scheme]

        def base():
            wf = w.to(torch.float32)
            if not torch.isfinite(wf).all():
                raise ValueError("weight contains inf or nan")
            if scheme == "int4":
                q, s, z = int4_codes(wf, gs, False)
                return layout.pack_nibbles(q), s, z
            q, s = nf4_codes(wf, gs)
            return layout.pack_nibbles(q), s

        out_bytes = n * k // 2 + n * (k // gs) * (5 if scheme == "int4" else 4)  # fp32 scale (+ uint8 zero)
        return Prepared(lambda: quantize(w, scheme, group_size=gs), base, w.nbytes + out_bytes)

    return setup


def cases_for(family: str | None = None, quick: bool = False, device: str = "cpu") -> list[BenchCase]:
    """The benchmark cases of one family (or all) that run on ``device``.
    ``quick`` shrinks every shape for smoke tests; its timings mean nothing."""
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
    if quick:
        attn_shapes = [(1, 2, 128, 64)]
        varlen_lengths = [5, 60, 1, 30]
    else:
        attn_shapes = [(4, 8, 2048, 128), (1, 16, 1024, 64)]
        g = torch.Generator().manual_seed(0)
        cuts = sorted(torch.randperm(8191, generator=g)[:7].add(1).tolist())
        varlen_lengths = [b - a for a, b in zip([0, *cuts], [*cuts, 8192])]
    for b, h, s, d in attn_shapes:
        shape = f"{b}x{h}x{s}x{d} causal"
        for dt in (torch.float32, bf16):
            all_cases.append(
                BenchCase("attention", "flash_attn fwd", shape, dt, _attention_fwd(b, h, s, d, dt), cuda=False)
            )
        all_cases.append(
            BenchCase("attention", "flash_attn fwd+bwd", shape, bf16, _attention_fwd_bwd(b, h, s, d, bf16), cuda=False)
        )
    # A short prompt: few enough queries that the forward weighs the decode
    # kernel against the general one (csrc/attention/cpu/flash_attn_decode.cpp).
    pb, ph, ps, pd = (1, 2, 32, 64) if quick else (1, 16, 128, 128)
    for dt in (torch.float32, bf16):
        all_cases.append(
            BenchCase("attention", "flash_attn fwd, short prompt", f"{pb}x{ph}x{ps}x{pd} causal", dt,
                      _attention_fwd(pb, ph, ps, pd, dt), cuda=False)
        )
    all_cases.append(
        BenchCase(
            "attention", "flash_attn_varlen fwd", f"{len(varlen_lengths)} seqs, {sum(varlen_lengths)} tok, 8x128",
            bf16, _attention_varlen(varlen_lengths, 8, 128, bf16),
        )
    )
    # Decode through flash_attn_func: one new token, and a few (speculative
    # decoding), against a contiguous cache. On CUDA both run in the paged
    # decode kernel, split over the keys; the GPU adds the paged bench's
    # shapes (one long context, and 64 sequences of 4k).
    dseqs, dctx = (2, 64) if quick else (16, 2048)
    for sq in (1, 4):
        all_cases.append(
            BenchCase("attention", f"flash_attn fwd, {sq} new token{'s' if sq > 1 else ''}",
                      f"{dseqs}x{dctx} ctx, 32/8 heads, d128", bf16,
                      _attention_decode(dseqs, sq, dctx, 32, 8, 128, bf16))
        )
    all_cases.append(
        BenchCase("attention", "flash_attn_with_kvcache, append + 1 new token", f"{dseqs}x{dctx} ctx, 32/8 heads, d128",
                  bf16, _kvcache_decode(dseqs, dctx, 32, 8, 128, bf16))
    )
    for gseqs, gctx in [(1, 512), (4, 256)] if quick else [(1, 32768), (64, 4096)]:
        all_cases.append(
            BenchCase("attention", "flash_attn fwd, 1 new token", f"{gseqs}x{gctx} ctx, 32/8 heads, d128", bf16,
                      _attention_decode(gseqs, 1, gctx, 32, 8, 128, bf16), cpu=False)
        )
    # GPU: the H200 shape (bf16, head_dim 128) against SDPA's own choice
    # of backend (flash / cuDNN / efficient), causal and not.
    gb, gh, gs = (1, 2, 256) if quick else (8, 16, 4096)
    for causal in (True, False):
        shape = f"{gb}x{gh}x{gs}x128" + (" causal" if causal else "")
        all_cases.append(BenchCase("attention", "flash_attn fwd", shape, bf16,
                                   _attention_fwd(gb, gh, gs, 128, bf16, causal), cpu=False))
        all_cases.append(BenchCase("attention", "flash_attn fwd+bwd", shape, bf16,
                                   _attention_fwd_bwd(gb, gh, gs, 128, bf16, causal), cpu=False))
    seqs, ctx, long_ctx = (2, 64, 256) if quick else (16, 2048, 32768)
    for dt in (bf16, torch.float32):
        for base in ("sdpa", "torchkiln contiguous"):
            all_cases.append(
                BenchCase(
                    "paged", f"paged_attention decode vs {base}", f"{seqs}x{ctx} ctx, 32/8 heads, d128, block 16", dt,
                    _paged_decode(seqs, 32, 8, ctx, 128, 16, dt, "sdpa" if base == "sdpa" else "flash"),
                    cuda=base == "sdpa" or dt == bf16,  # the CUDA flash kernels are bf16 / fp16 only
                )
            )
    all_cases.append(
        BenchCase(
            "paged", "paged_attention decode vs sdpa", f"1x{long_ctx} ctx, 32/8 heads, d128, block 16", bf16,
            _paged_decode(1, 32, 8, long_ctx, 128, 16, bf16, "sdpa"),
        )
    )
    # groups of 7 query heads (Qwen2 7B: 28 / 4): tiles of 4, padded
    all_cases.append(
        BenchCase(
            "paged", "paged_attention decode vs sdpa", f"{seqs}x{ctx} ctx, 28/4 heads, d128, block 16", bf16,
            _paged_decode(seqs, 28, 4, ctx, 128, 16, bf16, "sdpa"),
        )
    )
    # GPU: the H200 decode shape (target: 70% of copy bandwidth).
    gseqs, gctx = (4, 256) if quick else (64, 4096)
    all_cases.append(
        BenchCase(
            "paged", "paged_attention decode vs sdpa", f"{gseqs}x{gctx} ctx, 32/8 heads, d128, block 16", bf16,
            _paged_decode(gseqs, 32, 8, gctx, 128, 16, bf16, "sdpa"), cpu=False,
        )
    )
    quant_shapes = [(256, 512)] if quick else [(4096, 4096), (4096, 11008), (11008, 4096)]
    big_m = 8 if quick else 256
    for k, n in quant_shapes:
        shape = f"{k}->{n}"
        for scheme, base in (("int4", "aten"), ("int4", "dense"), ("int8", "aten"), ("int8", "dense"), ("nf4", "dense")):
            label = "aten int4pack" if (scheme, base) == ("int4", "aten") else (
                "aten int8pack" if base == "aten" else "dense bf16")
            all_cases.append(BenchCase("quant", f"{scheme} M=1 vs {label}", shape, bf16,
                                       _quant_matmul_case(1, k, n, scheme, base, bf16), cuda=False))
        # groups of 32 (GPTQ g32 checkpoints; llama.cpp's Q4_0 block)
        all_cases.append(BenchCase("quant", "int4 g32 M=1 vs aten int4pack", shape, bf16,
                                   _quant_matmul_case(1, k, n, "int4", "aten", bf16, int4_group=32), cuda=False))
        # a decode batch: 16 rows still take the kernels that decode in registers
        for scheme in ("int4", "int8", "nf4"):
            all_cases.append(BenchCase("quant", f"{scheme} M=16 vs dense bf16", shape, bf16,
                                       _quant_matmul_case(16, k, n, scheme, "dense", bf16), cuda=False))
        for scheme in ("int4", "int8", "w8a8"):
            all_cases.append(BenchCase("quant", f"{scheme} M={big_m} vs dense bf16", shape, bf16,
                                       _quant_matmul_case(big_m, k, n, scheme, "dense", bf16), cuda=False))
        # QLoRA's backward through a frozen nf4 layer: the input gradient
        all_cases.append(BenchCase("quant", f"nf4 M={big_m} grad @ W vs dense bf16", shape, bf16,
                                   _quant_grad_case(big_m, k, n, "nf4", bf16), cuda=False))
        # fp32 activations (the fp32 GEMM of weight_only_gemm.cpp)
        f32 = torch.float32
        all_cases.append(BenchCase("quant", f"int4 M={big_m} vs dense fp32", shape, f32,
                                   _quant_matmul_case(big_m, k, n, "int4", "dense", f32), cuda=False))
        all_cases.append(BenchCase("quant", f"nf4 M={big_m} grad @ W vs dense fp32", shape, f32,
                                   _quant_grad_case(big_m, k, n, "nf4", f32), cuda=False))
    # quantising a model's weights (load time), bf16 weights as checkpoints hold them
    qk, qn = quant_shapes[-1] if quick else (4096, 11008)
    for scheme in ("int4", "nf4"):
        all_cases.append(BenchCase("quant", f"quantize {scheme} vs pytorch", f"{qn}x{qk}", bf16,
                                   _quantize_case(qk, qn, scheme, bf16), cuda=False))
    # GPU: the H200 shape, int4 g128 against cuBLAS bf16 over decode
    # and prefill batch sizes (the aten int4 baseline is CPU-only).
    gk = 512 if quick else 8192
    for m in (1, 4, 8, 16, 64, 256):
        all_cases.append(BenchCase("quant", f"int4 M={m} vs dense bf16 (cuBLAS)", f"{gk}->{gk}", bf16,
                                   _quant_matmul_case(m, gk, gk, "int4", "dense", bf16), cpu=False))
    for scheme in ("int8", "nf4"):
        all_cases.append(BenchCase("quant", f"{scheme} M=1 vs dense bf16 (cuBLAS)", f"{gk}->{gk}", bf16,
                                   _quant_matmul_case(1, gk, gk, scheme, "dense", bf16), cpu=False))

    from .comm import pack_cases  # (comm imports this module)

    all_cases += pack_cases(quick)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return [c for c in all_cases if (family is None or c.family == family) and (c.cpu if device == "cpu" else c.cuda)]
