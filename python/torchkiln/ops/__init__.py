"""One module per kernel family: typed wrappers around ``torch.ops.torchkiln``,
their fake (meta) kernels, autograd formulas and eager ``*_ref`` baselines."""

from . import activation, attention, attention_packed, kvcache, norm, paged, quant, rotary

__all__ = ["activation", "attention", "attention_packed", "kvcache", "norm", "paged", "quant", "rotary"]
