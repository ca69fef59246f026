"""torchkiln: native kernels for training, fine-tuning and serving LLMs from PyTorch.

Every op is a torch custom op (``torch.ops.torchkiln.*``) with CPU kernels
(AVX-512 / AVX2 / scalar, picked at run time) and CUDA kernels (sm_80+),
a fake implementation for ``torch.compile`` and, where it applies, an autograd
formula. The functions below are the typed public entry points.
"""

from __future__ import annotations

from ._ext import _C
from .info import info
from .ops.activation import silu_and_mul
from .ops.attention import flash_attn_func, flash_attn_varlen_func
from .ops.attention_packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .ops.kvcache import flash_attn_with_kvcache
from .ops.norm import fused_add_rms_norm, rms_norm
from .ops.paged import paged_attention
from .ops.rotary import apply_rotary
from .quant import QuantizedWeight, dequantize, from_awq, from_gptq, quant_matmul, quantize
from .nn.quant_linear import quantize_model
from . import distributed, memory, nn, quant

__version__ = "0.1.0"

__all__ = [
    "QuantizedWeight",
    "apply_rotary",
    "dequantize",
    "distributed",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "from_awq",
    "from_gptq",
    "fused_add_rms_norm",
    "info",
    "memory",
    "nn",
    "paged_attention",
    "quant",
    "quant_matmul",
    "quantize",
    "quantize_model",
    "rms_norm",
    "silu_and_mul",
    "__version__",
]
