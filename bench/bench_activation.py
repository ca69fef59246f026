"""Benchmarks of the activation family: torchkiln vs eager PyTorch (see conftest.py)."""

import pytest

from conftest import family_cases, run


@pytest.mark.parametrize("case", family_cases("activation"))
def test_activation(benchmark, case, impl):
    run(benchmark, case, impl)
