"""Quantisers (plain PyTorch, fp32 math: they define each scheme) and dequantize.

Rounding is torch.round (half to even) everywhere; a scale of 0 (an all-zero
row or group) is replaced by 1 in the division so the codes stay finite.
fp32 / bf16 / fp16 weights on the CPU go through the C++ op quant_quantize,
which computes the same formulas in the same fp32 operations (the same
codes, scales and zeros bit for bit; tests/ops/test_quant.py checks it):
11008 x 4096 on 2 cores, int4 0.03-0.04 s, nf4 0.05, int8 0.02-0.05, w8a8
0.07-0.12 (these functions: 0.12-0.27 s in row blocks, 0.39-0.81 s whole).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops import quant as _qops
from . import layout
from .weight import SCHEMES, QuantizedWeight

# QLoRA's NormalFloat4 code values (same constants as csrc/quant/quant_matmul.h).
NF4_CODEBOOK = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

DEFAULT_GROUP_SIZE = {"int4": 128, "nf4": 64}
DOUBLE_QUANT_BLOCK = 256


def _safe(scale: Tensor) -> Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"quantize: weight must be a 2-D tensor (out_features, in_features), got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.numel() == 0:
        raise ValueError(f"quantize: weight must not be empty, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"quantize: weight must be floating point, got {weight.dtype}")


def int8_codes(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per output row, symmetric: scale = max|w| / 127, q in [-127, 127]."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    q = torch.round(w / _safe(scale)).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_codes(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per group of ``group_size`` input columns. Asymmetric: the range
    [min(w, 0), max(w, 0)] in 15 steps with an integer zero point;
    symmetric: scale = max|w| / 7, zero point 8. Returns codes 0..15 (out, in)
    and scales (fp32), zeros (uint8: whole numbers 0..15) (out, in / group_size)."""
    n, k = w.shape
    wg = w.view(n, k // group_size, group_size)
    if symmetric:
        scale = wg.abs().amax(dim=-1) / 7
        zero = torch.full_like(scale, 8.0)
        q = torch.round(wg / _safe(scale)[..., None]).clamp(-8, 7) + 8
    else:
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        scale = _safe((hi - lo) / 15)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return q.to(torch.uint8).view(n, k), scale, zero.to(torch.uint8)


# Midpoints between neighbouring NF4 code values, as fp32 numbers.
_NF4_MIDPOINTS = ((NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2).tolist()


def nf4_codes(w: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Per block of ``block_size`` input columns: absmax, and the nearest NF4
    code of w / absmax (ties go to the lower code)."""
    n, k = w.shape
    wg = w.view(n, k // block_size, block_size)
    absmax = wg.abs().amax(dim=-1)
    normed = wg / _safe(absmax)[..., None]
    # The code is the number of midpoints below the value (a tie stays
    # below): torch.bucketize's answer, in 15 compares at 2.6x its speed.
    q = torch.zeros(normed.shape, dtype=torch.uint8, device=w.device)
    for m in _NF4_MIDPOINTS:
        q += normed > m
    return q.view(n, k), absmax


def encode_double_quant(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """absmax (any shape) -> int8 codes of (absmax - mean) in blocks of 256 with
    one fp32 scale each (max |.| / 127), and the mean."""
    flat = absmax.reshape(-1)
    offset = flat.mean()
    centered = flat - offset
    pad = (-flat.numel()) % DOUBLE_QUANT_BLOCK
    blocks = torch.cat([centered, centered.new_zeros(pad)]).view(-1, DOUBLE_QUANT_BLOCK)
    scale = blocks.abs().amax(dim=1) / 127
    q = torch.round(blocks / _safe(scale)[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(-1), scale, offset.reshape(1)


def decode_double_quant(q: Tensor, scale: Tensor, offset: Tensor, out_features: int, groups: int) -> Tensor:
    blocks = q.view(-1, DOUBLE_QUANT_BLOCK).to(torch.float32) * scale[:, None] + offset
    return blocks.reshape(-1)[: out_features * groups].view(out_features, groups).contiguous()


# CPU weights the C++ op does not take (fp64) are quantised by the functions
# above a block of about this many weights at a time: every scheme works per
# row (or per group within a row), and block-sized temporaries stay in cache
# rather than page-faulting through fresh memory, as did the whole-weight
# inf / nan check (11008 x 4096 fp32 on the 2-core Zen 4, best of 3: int4
# 0.46 -> 0.12-0.14 s, nf4 0.81 -> 0.26-0.27, int8 0.39 -> 0.10, w8a8 0.59 ->
# 0.18).
_BLOCK_WEIGHTS = 1 << 20


def _fp32_rows(weight: Tensor, start: int, stop: int) -> Tensor:
    rows = weight[start:stop].detach().to(torch.float32)
    # A meta weight (a model built on the meta device, to be filled by
    # load_state_dict) has no values to check; its result has the right shapes.
    if not rows.is_meta and not torch.isfinite(rows).all():
        raise ValueError("quantize: weight contains inf or nan")
    return rows


def _by_row_blocks(fn, weight: Tensor, *args, multiple: int = 1) -> tuple[Tensor, ...]:
    """fn(fp32 rows, *args) over blocks of weight's rows (each checked for
    inf / nan; a multiple of ``multiple`` rows but the last), its outputs
    joined along their first dimension."""
    n, k = weight.shape
    rows = n if weight.device.type != "cpu" else max(1, _BLOCK_WEIGHTS // k // multiple) * multiple
    if rows >= n:
        return fn(_fp32_rows(weight, 0, n), *args)
    parts = [fn(_fp32_rows(weight, i, i + rows), *args) for i in range(0, n, rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _int4_packed(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    q, scale, zero = int4_codes(w, group_size, symmetric)
    return layout.pack_nibbles(q), scale, zero


def _w8a8_packed(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, scale = int8_codes(w)
    return (*layout.pack_panels(q), scale)


def _native(weight: Tensor) -> bool:
    """Whether quantize_cpu (C++, the same formulas bit for bit) takes this weight."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _pack_panels_in_blocks(q: Tensor) -> tuple[Tensor, Tensor]:
    """layout.pack_panels over blocks of whole 16-row panels (only the last one padded)."""
    n, k = q.shape
    rows = max(1, _BLOCK_WEIGHTS // k // layout.PANEL_ROWS) * layout.PANEL_ROWS
    parts = [layout.pack_panels(q[i : i + rows]) for i in range(0, n, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _nf4_packed(w: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    q, absmax = nf4_codes(w, block_size)
    return layout.pack_nibbles(q), absmax


def quantize(
    weight: Tensor,
    scheme: str,
    group_size: int | None = None,
    symmetric: bool = False,
    double_quant: bool = False,
) -> QuantizedWeight:
    """Quantises a linear weight (out_features, in_features).

    scheme: ``"int8"`` (per output row, symmetric), ``"int4"`` (groups of
    32 / 64 / 128 ... input columns, default 128, asymmetric unless
    ``symmetric``), ``"nf4"`` (blocks of 64 by default, absmax scaling;
    ``double_quant`` stores the absmax values in 8 bits), ``"w8a8"`` (int8
    per output row; activations are quantised per row at matmul time).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: scheme must be one of {SCHEMES}, got {scheme!r}")
    _check_weight(weight)
    n, k = weight.shape
    if double_quant and scheme != "nf4":
        raise ValueError(f"quantize: double_quant applies to nf4 only, got scheme {scheme!r}")
    if scheme in ("int8", "w8a8"):
        if group_size not in (None, k):
            raise ValueError(f"quantize: {scheme} has one scale per output row; group_size must be None, got {group_size}")
        if scheme == "w8a8" and k > 65536:
            raise ValueError(f"quantize: w8a8 supports in_features up to 65536, got {k}")
        if _native(weight):
            q, scale, _ = _qops.quantize_cpu(weight, "int8", k, True)
            if scheme == "int8":
                return QuantizedWeight("int8", k, n, k, True, q, scale)
            panels, sums = _pack_panels_in_blocks(q)
        elif scheme == "int8":
            q, scale = _by_row_blocks(int8_codes, weight)
            return QuantizedWeight("int8", k, n, k, True, q.contiguous(), scale.contiguous())
        else:  # blocks of whole 16-row panels: only the last one is padded
            panels, sums, scale = _by_row_blocks(_w8a8_packed, weight, multiple=layout.PANEL_ROWS)
        return QuantizedWeight("w8a8", k, n, k, True, panels, scale.reshape(n).contiguous(), weight_sums=sums)
    gs = DEFAULT_GROUP_SIZE[scheme] if group_size is None else int(group_size)
    if gs <= 0 or gs % 32 != 0:
        raise ValueError(f"quantize: group_size must be a positive multiple of 32 for {scheme}, got {gs}")
    if k % gs != 0:
        raise ValueError(f"quantize: in_features ({k}) must be divisible by group_size ({gs}) for {scheme}")
    if scheme == "int4":
        if _native(weight):
            packed, scale, zero = _qops.quantize_cpu(weight, "int4", gs, symmetric)
        else:
            packed, scale, zero = _by_row_blocks(_int4_packed, weight, gs, symmetric)
        return QuantizedWeight("int4", k, n, gs, symmetric, packed, scale.contiguous(), zeros=zero.contiguous())
    if _native(weight):
        packed, absmax, _ = _qops.quantize_cpu(weight, "nf4", gs, True)
    else:
        packed, absmax = _by_row_blocks(_nf4_packed, weight, gs)
    qw = QuantizedWeight("nf4", k, n, gs, True, packed, absmax.contiguous())
    if double_quant:
        qw.absmax_q, qw.absmax_scales, qw.absmax_offset = encode_double_quant(absmax)
        qw.scales = decode_double_quant(qw.absmax_q, qw.absmax_scales, qw.absmax_offset, n, k // gs)
    return qw


def unpack_codes(qw: QuantizedWeight) -> Tensor:
    """The stored codes as (out, in): int8 for int8 / w8a8, uint8 0..15 for 4-bit
    (stored column order, i.e. before undoing k_perm)."""
    if qw.scheme == "int8":
        return qw.qweight
    if qw.scheme == "w8a8":
        return layout.unpack_panels(qw.qweight, qw.out_features, qw.in_features)
    return layout.unpack_nibbles(qw.qweight, qw.in_features)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense weight (out_features, in_features) in ``dtype``; each element
    is the scheme's fp32 formula rounded once."""
    if qw.scheme == "w8a8":
        dense = (unpack_codes(qw).to(torch.float32) * qw.scales[:, None]).to(dtype)
    else:
        dense = _qops.dequantize_packed(qw, dtype)
    if qw.k_perm is not None:
        dense = torch.empty_like(dense).index_copy_(1, qw.k_perm, dense)
    return dense
