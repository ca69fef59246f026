"""Microbenchmarks: every torchkiln kernel against its plain-PyTorch baseline
on the same inputs, in the same run (``torchkiln bench``; pytest-benchmark
suites in the repository's bench/ reuse these cases)."""

from .cases import FAMILIES, BenchCase, cases_for
from .runner import BenchResult, run_cases
from .timing import copy_bandwidth_gbs, time_pair

__all__ = ["FAMILIES", "BenchCase", "BenchResult", "cases_for", "copy_bandwidth_gbs", "run_cases", "time_pair"]
