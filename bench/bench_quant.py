"""Benchmarks of the quant family: torchkiln vs eager PyTorch (see conftest.py)."""

import pytest

from conftest import family_cases, run


@pytest.mark.parametrize("case", family_cases("quant"))
def test_quant(benchmark, case, impl):
    run(benchmark, case, impl)
