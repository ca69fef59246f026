"""torchkiln: native kernels for training, fine-tuning and serving LLMs from PyTorch.

Every op is a torch custom op (``torch.ops.torchkiln.*``) with CPU kernels
(AVX-512 / AVX2 / scalar, picked at run time), CUDA kernels for the layer ops
(RMSNorm, rotary, SwiGLU; attention and the paged cache are CPU-only so far),
a fake implementation for ``torch.compile`` and, where it applies, an autograd
formula. The functions below are the typed public entry points.
"""

from __future__ import annotations

from ._ext import _C
from .info import info
from .ops.activation import silu_and_mul
from .ops.attention import flash_attn_func, flash_attn_varlen_func
from .ops.norm import fused_add_rms_norm, rms_norm
from .ops.paged import paged_attention
from .ops.rotary import apply_rotary
from . import memory, nn

__version__ = "0.1.0"

__all__ = [
    "apply_rotary",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "fused_add_rms_norm",
    "info",
    "memory",
    "nn",
    "paged_attention",
    "rms_norm",
    "silu_and_mul",
    "__version__",
]
