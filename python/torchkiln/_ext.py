"""Loads the compiled extension ``torchkiln._C`` after checking the torch it needs.

A C++ extension only works with the exact torch it was compiled against; any
other version fails deep inside the dynamic loader with "undefined symbol".
The build records its torch version in ``_build_config.py``, so a mismatch is
reported here instead, with both versions and the rebuild command.
"""

from __future__ import annotations

import torch

from . import _build_config

REBUILD_HINT = "pip install --no-build-isolation --force-reinstall --no-deps <torchkiln source dir>"


def _check_torch_version() -> None:
    built, running = _build_config.TORCH_VERSION, torch.__version__
    if built != running:
        raise ImportError(
            f"torchkiln was built against torch {built} but torch {running} is installed. "
            f"Rebuild torchkiln against the installed torch: {REBUILD_HINT}"
        )


_check_torch_version()

from . import _C  # noqa: E402  (registers torch.ops.torchkiln.* as a side effect)

__all__ = ["_C"]
