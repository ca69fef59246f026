"""Benchmarks of the norm family: torchkiln vs eager PyTorch (see conftest.py)."""

import pytest

from conftest import family_cases, run


@pytest.mark.parametrize("case", family_cases("norm"))
def test_norm(benchmark, case, impl):
    run(benchmark, case, impl)
