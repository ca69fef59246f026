"""Quantised weights: schemes, packing, published-format import, save / load.

``quantize(w, scheme)`` -> :class:`QuantizedWeight`; ``quant_matmul(x, qw)``
multiplies without materialising W; ``dequantize(qw)`` returns it dense.
"""

from ..ops.quant import quant_matmul
from .importers import from_awq, from_gptq
from .quantize import NF4_CODEBOOK, dequantize, quantize, unpack_codes
from .weight import SCHEMES, QuantizedWeight

__all__ = [
    "NF4_CODEBOOK",
    "QuantizedWeight",
    "SCHEMES",
    "dequantize",
    "from_awq",
    "from_gptq",
    "quant_matmul",
    "quantize",
    "unpack_codes",
]
