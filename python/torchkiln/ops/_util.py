"""Helpers shared by the op wrappers."""

from __future__ import annotations

import torch
from torch import Tensor


def needs_grad(*tensors: Tensor | None) -> bool:
    """True when autograd would record an op on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for low-precision inputs; the input dtype itself when it is wider
    (so the references can run in fp64)."""
    return torch.promote_types(t.dtype, torch.float32)
