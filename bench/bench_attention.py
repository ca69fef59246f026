"""Benchmarks of the attention family: torchkiln vs torch SDPA (see conftest.py)."""

import pytest

from conftest import family_cases, run


@pytest.mark.parametrize("case", family_cases("attention"))
def test_attention(benchmark, case, impl):
    run(benchmark, case, impl)
