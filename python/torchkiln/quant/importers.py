"""Import of published 4-bit checkpoint layouts (GPTQ v1, AWQ GEMM) into the
int4 scheme; the codes are repacked once into the kernel layout.

Both formats store W[n, k] = scale[g, n] * (q[k, n] - zero[g, n]) with
(in, out)-oriented int32 words of eight 4-bit codes:
* GPTQ: qweight (in/8, out), code of input k = 8i + j in bits 4j..4j+3 of
  row i; qzeros (groups, out/8) packed the same way along out and stored
  minus one; g_idx (in,) gives each input column's group (act-order
  checkpoints permute it).
* AWQ: qweight (in, out/8) packed along out; nibble j of word i holds output
  column 8i + [0, 2, 4, 6, 1, 3, 5, 7][j]; qzeros (groups, out/8) packed
  the same way (not offset); groups are consecutive input columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import layout
from .weight import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _check_int32(name: str, t: Tensor, fn: str) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != 2:
        raise TypeError(f"{fn}: {name} must be a 2-D int32 tensor, got "
                        f"{getattr(t, 'dtype', type(t))} with shape {tuple(getattr(t, 'shape', ()))}")


def _nibbles(words: Tensor) -> Tensor:
    """int32 (..., w) -> (..., w, 8) codes, nibble j = bits 4j..4j+3."""
    return ((words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 15).to(torch.uint8)


def _int4_weight(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, sym: bool,
                 k_perm: Tensor | None) -> QuantizedWeight:
    """codes (out, in) in stored column order; scales, zeros (out, groups),
    zeros whole numbers 0..16."""
    n, k = codes.shape
    return QuantizedWeight(
        "int4", k, n, group_size, sym, layout.pack_nibbles(codes),
        scales.to(torch.float32).contiguous(), zeros=zeros.to(torch.uint8).contiguous(), k_perm=k_perm,
    )


def from_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None = None, bits: int = 4,
              group_size: int = 128, sym: bool = False) -> QuantizedWeight:
    """A GPTQ (v1, "exllama" packing) linear weight as an int4 QuantizedWeight."""
    fn = "from_gptq"
    if bits != 4:
        raise NotImplementedError(f"{fn}: only bits=4 checkpoints are supported, got bits={bits}")
    _check_int32("qweight", qweight, fn)
    _check_int32("qzeros", qzeros, fn)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if group_size == -1:
        group_size = k
    if group_size <= 0 or k % group_size != 0 or group_size % 32 != 0:
        raise ValueError(f"{fn}: group_size must be a positive multiple of 32 dividing in_features ({k}), got {group_size}")
    groups = k // group_size
    if scales.dim() != 2 or tuple(scales.shape) != (groups, n):
        raise ValueError(f"{fn}: scales must be ({groups}, {n}), got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (groups, (n + 7) // 8):
        raise ValueError(f"{fn}: qzeros must be ({groups}, {(n + 7) // 8}), got {tuple(qzeros.shape)}")
    codes = _nibbles(qweight).permute(0, 2, 1).reshape(k, n)  # (in, out)
    zeros = _nibbles(qzeros).reshape(groups, -1)[:, :n] + 1  # stored minus one: 1..16
    k_perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if tuple(g_idx.shape) != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise ValueError(f"{fn}: g_idx must be ({k},) with values in [0, {groups}), got shape {tuple(g_idx.shape)}")
        if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group_size):
            # act-order: store columns sorted by group so each group is contiguous
            if not torch.all(torch.bincount(g_idx, minlength=groups) == group_size):
                raise ValueError(f"{fn}: every group in g_idx must have exactly group_size ({group_size}) columns")
            k_perm = torch.argsort(g_idx, stable=True)
            codes = codes[k_perm]
    return _int4_weight(codes.t(), scales.t(), zeros.t(), group_size, sym, k_perm)


def from_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> QuantizedWeight:
    """An AWQ (GEMM layout) linear weight as an int4 QuantizedWeight."""
    fn = "from_awq"
    _check_int32("qweight", qweight, fn)
    _check_int32("qzeros", qzeros, fn)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if group_size <= 0 or k % group_size != 0 or group_size % 32 != 0:
        raise ValueError(f"{fn}: group_size must be a positive multiple of 32 dividing in_features ({k}), got {group_size}")
    groups = k // group_size
    if scales.dim() != 2 or tuple(scales.shape) != (groups, n):
        raise ValueError(f"{fn}: scales must be ({groups}, {n}), got {tuple(scales.shape)}")
    if tuple(qzeros.shape) != (groups, n // 8):
        raise ValueError(f"{fn}: qzeros must be ({groups}, {n // 8}), got {tuple(qzeros.shape)}")
    order = torch.tensor(AWQ_ORDER)

    def unpack(words: Tensor) -> Tensor:  # (rows, out/8) -> (rows, out)
        nib = _nibbles(words)
        out = torch.empty_like(nib)
        out[..., order] = nib
        return out.reshape(words.shape[0], -1)

    return _int4_weight(unpack(qweight).t(), scales.t(), unpack(qzeros).t(), group_size, False, None)
