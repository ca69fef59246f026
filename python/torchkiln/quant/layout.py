"""Kernel weight layouts (the C++ side reads them; see csrc/quant/quant_matmul.h).

* 4-bit rows (int4, nf4): ``(out, ceil(in / 64) * 32)`` uint8. In each 64-column
  chunk of a row, byte ``j`` holds column ``j`` in its low nibble and column
  ``32 + j`` in its high nibble, so one unpack yields 32 consecutive columns
  per nibble. Padding columns hold code 0.
* W8A8 panels: ``(ceil(out / 16), ceil(in / 4), 16, 4)`` int8: 16 output rows
  per panel, each group of 4 input columns one 64-byte line. Padding is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

NIBBLE_CHUNK = 64
PANEL_ROWS = 16


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def pack_nibbles(codes: Tensor) -> Tensor:
    """codes (out, in) with values 0..15 -> packed (out, ceil(in / 64) * 32) uint8."""
    n, k = codes.shape
    kp = _round_up(k, NIBBLE_CHUNK)
    padded = torch.zeros(n, kp, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes.to(torch.uint8)
    halves = padded.view(n, kp // NIBBLE_CHUNK, 2, NIBBLE_CHUNK // 2)
    return (halves[:, :, 0, :] | (halves[:, :, 1, :] << 4)).reshape(n, kp // 2).contiguous()


def unpack_nibbles(packed: Tensor, in_features: int) -> Tensor:
    """Inverse of pack_nibbles: (out, in) uint8 codes."""
    n = packed.shape[0]
    chunks = packed.view(n, -1, NIBBLE_CHUNK // 2)
    both = torch.stack([chunks & 15, chunks >> 4], dim=2)  # (n, chunks, 2, 32)
    return both.reshape(n, -1)[:, :in_features]


def pack_panels(q: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes (out, in) -> (panels (out16 / 16, in4 / 4, 16, 4), weight_sums (out16,) int32).

    weight_sums[n] = 128 * sum_k q[n, k]: the kernel feeds x to the unsigned
    side of the int8 dot product as q_x + 128 and subtracts this.
    """
    n, k = q.shape
    n16, k4 = _round_up(n, PANEL_ROWS), _round_up(k, 4)
    padded = torch.zeros(n16, k4, dtype=torch.int8, device=q.device)
    padded[:n, :k] = q
    panels = padded.view(n16 // PANEL_ROWS, PANEL_ROWS, k4 // 4, 4).permute(0, 2, 1, 3).contiguous()
    sums = (padded.to(torch.int32).sum(dim=1) * 128).to(torch.int32)
    return panels, sums


def unpack_panels(panels: Tensor, out_features: int, in_features: int) -> Tensor:
    """Inverse of pack_panels: (out, in) int8 codes."""
    p, kq = panels.shape[:2]
    return panels.permute(0, 2, 1, 3).reshape(p * PANEL_ROWS, kq * 4)[:out_features, :in_features]
