"""Benchmarks of the rope family: torchkiln vs eager PyTorch (see conftest.py)."""

import pytest

from conftest import family_cases, run


@pytest.mark.parametrize("case", family_cases("rope"))
def test_rope(benchmark, case, impl):
    run(benchmark, case, impl)
