"""Column + Row parallel MLP on 2 Gloo ranks equals the unsharded MLP."""

from __future__ import annotations

import pytest

import workers
from launcher import run_ranks, values


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("input_is_parallel", [True, False], ids=["parallel-input", "gathered"])
def test_column_row_mlp_matches_unsharded(chunks, input_is_parallel):
    for errs in values(run_ranks(workers.tensor_parallel_mlp, 2, chunks, input_is_parallel)):
        for name, err in errs.items():
            assert err < 1e-6, (name, err)
