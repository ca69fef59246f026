"""Model layers built on torchkiln ops, shaped like Hugging Face's Llama modules."""

from .layers import RMSNorm, RotaryEmbedding, SwiGLU
from .quant_linear import QuantLinear, quantize_model

__all__ = ["QuantLinear", "RMSNorm", "RotaryEmbedding", "SwiGLU", "quantize_model"]
