"""QuantLinear: nn.Linear with a frozen quantised weight, and quantize_model."""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import Tensor, nn

from ..ops.quant import quant_matmul
from ..quant.quantize import quantize
from ..quant.weight import _TENSOR_FIELDS, QuantizedWeight


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W stored quantised (buffers, so state_dict and .to()
    carry it); the weight is frozen, gradients flow to x and the bias."""

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None = None):
        super().__init__()
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self._meta = {
            "scheme": qweight.scheme,
            "in_features": qweight.in_features,
            "out_features": qweight.out_features,
            "group_size": qweight.group_size,
            "symmetric": qweight.symmetric,
        }
        for name in _TENSOR_FIELDS:
            self.register_buffer(name, getattr(qweight, name))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self._spec: QuantizedWeight | None = None

    @property
    def qweight_spec(self) -> QuantizedWeight:
        """The weight as a QuantizedWeight over this module's buffers (rebuilt
        whenever a buffer was replaced: .to(), load_state_dict(assign=True))."""
        spec = self._spec
        if spec is None or any(getattr(spec, name) is not self._buffers[name] for name in _TENSOR_FIELDS):
            spec = self._spec = QuantizedWeight(**self._meta, **{name: self._buffers[name] for name in _TENSOR_FIELDS})
        return spec

    def _apply(self, fn, *args, **kwargs):
        # The quantised buffers follow device moves only: a dtype change such
        # as model.to(torch.bfloat16) must not touch codes or fp32 scales.
        quant = {name: self._buffers.pop(name) for name in _TENSOR_FIELDS}
        try:
            super()._apply(fn, *args, **kwargs)
            device = fn(torch.empty(0, device=quant["qweight"].device)).device
        finally:
            self._buffers.update(quant)
        for name, t in quant.items():
            if t is None:
                continue
            # fn moved a meta probe off the meta device, so this is to_empty()
            # (.to() raises on meta data): fresh storage, filled by load_state_dict.
            if t.is_meta and device.type != "meta":
                self._buffers[name] = torch.empty_like(t, device=device)
            else:
                self._buffers[name] = t.to(device)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, group_size: int | None = None, symmetric: bool = False,
                    double_quant: bool = False) -> "QuantLinear":
        qw = quantize(linear.weight, scheme, group_size=group_size, symmetric=symmetric, double_quant=double_quant)
        return cls(qw, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        return quant_matmul(x, self.qweight_spec, bias)

    def extra_repr(self) -> str:
        m = self._meta
        return (f"in_features={m['in_features']}, out_features={m['out_features']}, scheme={m['scheme']}, "
                f"group_size={m['group_size']}, bias={self.bias is not None}")


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None, symmetric: bool = False,
                   skip: Iterable[str] = ("lm_head",), double_quant: bool = False) -> nn.Module:
    """Replaces every nn.Linear of ``model`` in place by a QuantLinear, except
    those whose qualified name (or its last part) matches a pattern in
    ``skip`` (fnmatch syntax, e.g. ``"lm_head"``, ``"*.gate"``). Returns model."""
    patterns = list(skip)
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        short = name.rsplit(".", 1)[-1]
        if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(short, p) for p in patterns):
            continue
        targets.append(name)
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        with torch.no_grad():
            setattr(parent, attr, QuantLinear.from_linear(linear, scheme, group_size, symmetric, double_quant))
    return model
