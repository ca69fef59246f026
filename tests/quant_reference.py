"""Independent references for the quantisation schemes and the published
GPTQ / AWQ packings, written from their descriptions (loops over groups,
plain fp32 formulas) rather than from the package's vectorised code."""

from __future__ import annotations

import torch
from torch import Tensor

NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def _nonzero(s: Tensor) -> Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def dequant_int8(w: Tensor) -> Tensor:
    out = torch.empty_like(w)
    for n in range(w.shape[0]):
        s = w[n].abs().max() / 127
        q = torch.clamp(torch.round(w[n] / _nonzero(s)), -127, 127)
        out[n] = q * s
    return out


def dequant_int4(w: Tensor, group: int, symmetric: bool) -> Tensor:
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], group):
        blk = w[:, g0 : g0 + group]
        if symmetric:
            s = blk.abs().amax(1, keepdim=True) / 7
            z = torch.full_like(s, 8.0)
            q = torch.clamp(torch.round(blk / _nonzero(s)), -8, 7) + 8
        else:
            lo = torch.clamp(blk.amin(1, keepdim=True), max=0)
            hi = torch.clamp(blk.amax(1, keepdim=True), min=0)
            s = _nonzero((hi - lo) / 15)
            z = torch.clamp(torch.round(-lo / s), 0, 15)
            q = torch.clamp(torch.round(blk / s) + z, 0, 15)
        out[:, g0 : g0 + group] = (q - z) * s
    return out


def dequant_nf4(w: Tensor, block: int) -> Tensor:
    cb = torch.tensor(NF4)
    mid = (cb[1:] + cb[:-1]) / 2
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], block):
        blk = w[:, g0 : g0 + block]
        absmax = blk.abs().amax(1, keepdim=True)
        normed = blk / _nonzero(absmax)
        q = (normed.unsqueeze(-1) > mid).sum(-1)  # count of midpoints strictly below: nearest, ties low
        out[:, g0 : g0 + block] = absmax * cb[q]
    return out


# ---------------------------------------------------------------- published packings
def pack_gptq(codes_kn: Tensor, zeros_gn: Tensor) -> tuple[Tensor, Tensor]:
    """codes (in, out) 0..15, zeros (groups, out) 1..16 -> GPTQ v1 qweight
    (in/8, out) and qzeros (groups, out/8) int32 (zeros stored minus one)."""
    k, n = codes_kn.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(k // 8):
        for j in range(8):
            qweight[i] |= codes_kn[8 * i + j].to(torch.int64) << (4 * j)
    g = zeros_gn.shape[0]
    qzeros = torch.zeros(g, n // 8, dtype=torch.int64)
    for i in range(n // 8):
        for j in range(8):
            qzeros[:, i] |= (zeros_gn[:, 8 * i + j].to(torch.int64) - 1) << (4 * j)
    to32 = lambda t: (t - ((t >> 31) & 1) * (1 << 32)).to(torch.int32)  # noqa: E731  (two's complement)
    return to32(qweight), to32(qzeros)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq(codes_kn: Tensor, zeros_gn: Tensor) -> tuple[Tensor, Tensor]:
    """codes (in, out), zeros (groups, out) -> AWQ qweight (in, out/8), qzeros (groups, out/8)."""

    def pack(t: Tensor) -> Tensor:
        rows, n = t.shape
        out = torch.zeros(rows, n // 8, dtype=torch.int64)
        for i in range(n // 8):
            for j in range(8):
                out[:, i] |= t[:, 8 * i + AWQ_ORDER[j]].to(torch.int64) << (4 * j)
        return (out - ((out >> 31) & 1) * (1 << 32)).to(torch.int32)

    return pack(codes_kn), pack(zeros_gn)
