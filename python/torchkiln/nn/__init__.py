"""Model layers built on torchkiln ops, shaped like Hugging Face's Llama modules."""

from .layers import RMSNorm, RotaryEmbedding, SwiGLU

__all__ = ["RMSNorm", "RotaryEmbedding", "SwiGLU"]
