"""pytest-benchmark suites over the same cases as `torchkiln bench`.

TORCHKILN_BENCH_DEVICE=cpu|cuda picks the device; TORCHKILN_BENCH_QUICK=1
shrinks shapes for a smoke run. Each case is timed twice, torchkiln and the
eager baseline, in one benchmark group so the report puts them side by side.
"""

from __future__ import annotations

import os

import pytest
import torch

from torchkiln.bench import cases_for

DEVICE = os.environ.get("TORCHKILN_BENCH_DEVICE", "cpu")
QUICK = os.environ.get("TORCHKILN_BENCH_QUICK", "0") == "1"


def family_cases(family: str):
    return [pytest.param(c, id=f"{c.name}-{c.shape}") for c in cases_for(family, quick=QUICK, device=DEVICE)]


@pytest.fixture(params=["torchkiln", "baseline"])
def impl(request):
    return request.param


def run(benchmark, case, impl):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("TORCHKILN_BENCH_DEVICE=cuda but no GPU")
    prepared = case.setup(DEVICE)
    fn = prepared.ours if impl == "torchkiln" else prepared.baseline
    if DEVICE == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.group = f"{case.name} {case.shape}"
    benchmark.extra_info["min_bytes"] = prepared.min_bytes
    benchmark.pedantic(fn, rounds=3 if QUICK else 10, warmup_rounds=1)
