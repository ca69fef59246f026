"""Helpers shared by the op wrappers."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor


def needs_grad(*tensors: Tensor | None) -> bool:
    """True when autograd would record an op on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call(op, *args):
    """op(*args) for an op whose autograd is registered in Python
    (register_autograd). When autograd has nothing to record (grad mode off,
    as under torch.no_grad in Hugging Face's generate, or no tensor argument
    requiring grad, as in a plain forward call of a frozen model) that layer
    would only redispatch below autograd, after about 3.5 us of Python a
    call; this goes there directly, as torch's own kernels do. Inference
    mode skips the layer by itself, and under torch.compile the plain call
    is what gets traced."""
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
    ):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp32 for low-precision inputs; the input dtype itself when it is wider
    (so the references can run in fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def register_fake(op: str, own_device: tuple[str, ...] = ()):
    """``torch.library.register_fake(op)`` that also applies the kernels'
    device rule: every tensor argument on one device, except those named in
    ``own_device`` (e.g. a CPU block_mapping).

    The fake is also the op's Meta kernel, and the dispatcher runs it whenever
    any argument is on the meta device: a model whose weights were left on
    meta would otherwise return the fake's uninitialised CPU / CUDA output.
    So a meta tensor next to a real one is an error even among own_device."""

    def decorate(fake):
        signature = inspect.signature(fake)
        name = op.split("::")[-1]

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            _check_devices(name, signature.bind(*args, **kwargs).arguments, own_device)
            return fake(*args, **kwargs)

        torch.library.register_fake(op)(checked)
        return fake

    return decorate


def _check_devices(op: str, arguments: dict, own_device: tuple[str, ...]) -> None:
    ref_name, ref = None, None
    tensors = []
    for name, value in arguments.items():
        for i, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if not isinstance(t, Tensor):
                continue
            label = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
            tensors.append((label, t))
            if name in own_device:
                continue
            if ref is None:
                ref_name, ref = label, t
            elif t.device != ref.device:
                raise RuntimeError(
                    f"{op}: {label} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
                )
    on_meta = [label for label, t in tensors if t.is_meta]
    if on_meta and len(on_meta) != len(tensors):
        real_label, real = next((label, t) for label, t in tensors if not t.is_meta)
        raise RuntimeError(
            f"{op}: {on_meta[0]} is on the meta device (it holds no data) but {real_label} is on {real.device}"
        )
