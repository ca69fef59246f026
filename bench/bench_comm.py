"""Benchmarks of the comm family: torchkiln vs eager PyTorch (see conftest.py)."""

import pytest

from conftest import family_cases, run


@pytest.mark.parametrize("case", family_cases("comm"))
def test_comm(benchmark, case, impl):
    run(benchmark, case, impl)
