"""Shared fixtures: CPU ISA forcing and device selection."""

from __future__ import annotations

import zlib

import pytest
import torch

import torchkiln
from torchkiln import _C

ISAS = ("avx512bf16", "avx512", "avx2", "scalar")
_ISA_RANK = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}


def isa_supported(isa: str) -> bool:
    return _ISA_RANK[isa] <= _ISA_RANK[_C.cpu_info()["detected_isa"]]


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and torchkiln.info()["build"]["cuda"]),
                reason="needs an NVIDIA GPU and a CUDA build of torchkiln",
            ),
        ],
    ),
]


# Marks for a test module that only makes sense on a GPU.
REQUIRES_CUDA = DEVICES[1].marks


@pytest.fixture(params=ISAS)
def cpu_isa(request):
    """Every CPU ISA, for tests of the CPU kernels alone (CUDA ones have their own cases)."""
    name = request.param
    if not isa_supported(name):
        pytest.skip(f"this CPU cannot run the {name} path")
    before = _C.cpu_info()["active_isa"]
    _C.set_cpu_isa(name)
    yield name
    _C.set_cpu_isa(before)


def pytest_generate_tests(metafunc):
    # `backend` = every CPU ISA plus CUDA: the cases most tests want.
    if "backend" in metafunc.fixturenames:
        params = [pytest.param(("cpu", isa), id=f"cpu-{isa}") for isa in ISAS]
        params.append(pytest.param(("cuda", None), id="cuda", marks=DEVICES[1].marks))
        metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def backend(request):
    """Yields the device string; on CPU the requested ISA is active meanwhile."""
    dev, name = request.param
    if dev == "cpu":
        if not isa_supported(name):
            pytest.skip(f"this CPU cannot run the {name} path")
        before = _C.cpu_info()["active_isa"]
        _C.set_cpu_isa(name)
        yield dev
        _C.set_cpu_isa(before)
    else:
        yield dev


@pytest.fixture(autouse=True)
def _seed(request):
    # Different data for every test case, reproducible from its id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
