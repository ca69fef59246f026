"""Benchmarks of paged decode attention vs contiguous baselines (see conftest.py)."""

import pytest

from conftest import family_cases, run


@pytest.mark.parametrize("case", family_cases("paged"))
def test_paged(benchmark, case, impl):
    run(benchmark, case, impl)
