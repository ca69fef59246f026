"""``torchkiln.info()``: what this build is and which CPU path runs."""

from __future__ import annotations

from typing import Any

import torch

from ._ext import _C


def info() -> dict[str, Any]:
    """Build facts (torch version, CUDA, archs, compiler) and run-time CPU facts
    (ISA detected and in use, thread count), plus whether a GPU is visible."""
    return {
        "build": dict(_C.build_info()),
        "cpu": dict(_C.cpu_info()),
        "torch_runtime": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
