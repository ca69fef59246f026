"""QuantizedWeight: the packed tensors of one quantised linear weight, plus
safetensors save / load."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

SCHEMES = ("int8", "int4", "nf4", "w8a8")

# Tensor fields, in the order they are saved.
_TENSOR_FIELDS = ("qweight", "scales", "zeros", "weight_sums", "k_perm", "absmax_q", "absmax_scales", "absmax_offset")


def _zeros_from_v1(zeros: Tensor) -> Tensor:
    """Version 1 files stored int4 zero points as fp32; they are whole numbers
    0..16 (quantize's 0..15, GPTQ's 1..16), held as uint8 since version 2."""
    if not bool(((zeros == zeros.round()) & (zeros >= 0) & (zeros <= 255)).all()):
        raise ValueError("quantised weight file: int4 zeros must be whole numbers in [0, 255]")
    return zeros.to(torch.uint8)


@dataclass
class QuantizedWeight:
    """A weight W (out_features, in_features) in one of the schemes:

    * ``int8``: qweight (out, in) int8, scales (out, 1) fp32; W = scale * q.
    * ``int4``: qweight (out, ceil(in/64)*32) uint8 in the nibble layout of
      :mod:`torchkiln.quant.layout`; scales (out, in/group) fp32, zeros
      the same shape in uint8 (zero points are whole numbers);
      W = scale * (q - zero).
    * ``nf4``: same nibble layout; scales = absmax per block (out, in/group);
      W = absmax * NF4[q]. With double quantisation the absmax values are
      stored as int8 codes (``absmax_q``) with one fp32 scale per 256 of them
      (``absmax_scales``) around their mean (``absmax_offset``), and
      ``scales`` is their fp32 decoding.
    * ``w8a8``: qweight int8 panels (out16/16, in4/4, 16, 4), scales (out,)
      fp32, weight_sums (out16,) int32; activations are quantised per row at
      run time.

    ``k_perm`` (int64, (in,)), when set, is the column order of the stored
    codes (GPTQ act-order): stored column j is input feature k_perm[j].
    """

    scheme: str
    in_features: int
    out_features: int
    group_size: int
    symmetric: bool
    qweight: Tensor
    scales: Tensor
    zeros: Optional[Tensor] = None
    weight_sums: Optional[Tensor] = None
    k_perm: Optional[Tensor] = None
    absmax_q: Optional[Tensor] = None
    absmax_scales: Optional[Tensor] = None
    absmax_offset: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"QuantizedWeight: scheme must be one of {SCHEMES}, got {self.scheme!r}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that define the weight (what save() writes)."""
        out = {}
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            if t is None or (name == "scales" and self.double_quant):
                continue  # double-quantised scales are rebuilt from absmax_*
            out[name] = t
        return out

    def nbytes(self) -> int:
        """Bytes of the stored form (what save() writes, without the header)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def metadata(self) -> dict[str, str]:
        return {
            "format": "torchkiln.quantized_weight",
            "version": "2",
            "scheme": self.scheme,
            "in_features": str(self.in_features),
            "out_features": str(self.out_features),
            "group_size": str(self.group_size),
            "symmetric": json.dumps(self.symmetric),
        }

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in _TENSOR_FIELDS:
            if moved[name] is not None:
                moved[name] = moved[name].to(device)
        return QuantizedWeight(**moved)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict[str, str]) -> "QuantizedWeight":
        if metadata.get("format") != "torchkiln.quantized_weight":
            raise ValueError("not a torchkiln quantised weight (metadata 'format' missing or different)")
        fields = {name: tensors.get(name) for name in _TENSOR_FIELDS}
        if fields["zeros"] is not None and fields["zeros"].is_floating_point():
            fields["zeros"] = _zeros_from_v1(fields["zeros"])
        if fields["scales"] is None:
            if fields["absmax_q"] is None:
                raise ValueError("quantised weight file has neither 'scales' nor 'absmax_q'")
            from .quantize import decode_double_quant

            groups = int(metadata["in_features"]) // int(metadata["group_size"])
            fields["scales"] = decode_double_quant(
                fields["absmax_q"], fields["absmax_scales"], fields["absmax_offset"], int(metadata["out_features"]), groups
            )
        return cls(
            scheme=metadata["scheme"],
            in_features=int(metadata["in_features"]),
            out_features=int(metadata["out_features"]),
            group_size=int(metadata["group_size"]),
            symmetric=json.loads(metadata["symmetric"]),
            **fields,
        )

    def save(self, path: str) -> None:
        """Writes a safetensors file (tensors + metadata)."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.tensors().items()}, path, metadata=self.metadata())

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> "QuantizedWeight":
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls.from_tensors(tensors, metadata)
