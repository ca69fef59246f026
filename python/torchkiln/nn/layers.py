"""Drop-in layers for Llama-style models.

- ``RMSNorm``: same parameters and state-dict keys as ``LlamaRMSNorm``.
- ``RotaryEmbedding``: owns fp32 cos/sin tables and applies them to q/k.
- ``SwiGLU``: ``LlamaMLP`` with gate and up projections merged into one matmul
  (``gate_up_proj``); loads Hugging Face ``gate_proj``/``up_proj`` weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.activation import silu_and_mul
from ..ops.norm import fused_add_rms_norm, rms_norm
from ..ops.rotary import apply_rotary, rope_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: x (..., hidden_size) -> same shape.

    ``forward(x, residual)`` fuses the pre-norm residual add and returns
    ``(normed, x + residual)`` (the sum is written into ``residual`` in place
    when no gradient is needed; see :func:`torchkiln.fused_add_rms_norm`).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if residual is None:
            return rms_norm(x, self.weight, self.variance_epsilon)
        return fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class RotaryEmbedding(nn.Module):
    """RoPE for q (…, seq, heads, head_dim) / k (…, seq, kv_heads, head_dim).

    head_dim: per-head size; rotary_dim (default head_dim) is the rotated
    prefix; interleaved selects GPT-J pairs instead of GPT-NeoX/Llama halves.
    ``forward(q, k, positions)`` returns the rotated (q, k); positions is
    (tokens,) or (batch, seq), int64.
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
        self.head_dim, self.rotary_dim, self.interleaved = head_dim, rotary_dim, interleaved
        self.max_position_embeddings, self.base = max_position_embeddings, base
        cos, sin = rope_cos_sin(rotary_dim, max_position_embeddings, base, device=device)
        self.register_buffer("cos", cos, persistent=False)  # (max_position, rotary_dim / 2), fp32
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self, q: Tensor, k: Tensor | None, positions: Tensor, inplace: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        return apply_rotary(q, k, self.cos, self.sin, positions, self.interleaved, inplace=inplace)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, max_position={self.max_position_embeddings}, "
            f"base={self.base}, interleaved={self.interleaved}"
        )


class SwiGLU(nn.Module):
    """Llama MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, x (..., hidden_size).

    The gate and up projections are one (2 * intermediate_size, hidden_size)
    weight, gate rows first, so one matmul feeds :func:`torchkiln.silu_and_mul`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, device=device, dtype=dtype)
        self._register_load_state_dict_pre_hook(self._merge_hf_projections)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))

    @staticmethod
    def _merge_hf_projections(state_dict, prefix, *args) -> None:
        # Hugging Face checkpoints store gate_proj and up_proj separately.
        for kind in ("weight", "bias"):
            gate, up = f"{prefix}gate_proj.{kind}", f"{prefix}up_proj.{kind}"
            if gate in state_dict and up in state_dict:
                state_dict[f"{prefix}gate_up_proj.{kind}"] = torch.cat([state_dict.pop(gate), state_dict.pop(up)], 0)
