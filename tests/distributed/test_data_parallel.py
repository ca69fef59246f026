"""OverlappedDataParallel on 2 and 3 Gloo ranks against a single process and
torch DDP; every multi-rank test has a hard timeout."""

from __future__ import annotations

import pytest
import torch

import workers
from launcher import run_ranks, values
from torchkiln import _C


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("views", [True, False], ids=["views", "copies"])
@pytest.mark.parametrize("buckets", [(25, 1), (1e-6, 1e-6), (0.002, 0.0005)],
                         ids=["one-bucket", "bucket-per-param", "several"])
def test_gradients_match_single_process_and_ddp(world, views, buckets):
    for worst_single, worst_ddp, n_buckets in values(run_ranks(workers.grads_match, world, *buckets, views)):
        assert worst_single < 1e-6 and worst_ddp < 1e-6, (worst_single, worst_ddp)
        if buckets[0] < 1e-5:
            assert n_buckets == 8  # 4 linear layers, weight + bias each


@pytest.mark.parametrize("views", [True, False], ids=["views", "copies"])
def test_no_sync_accumulates(views):
    for worst in values(run_ranks(workers.no_sync_accumulation, 2, views)):
        assert worst < 1e-6


def test_find_unused_parameters():
    for res in values(run_ranks(workers.unused_parameters, 2, True)):
        assert "worst" in res and res["worst"] < 1e-6, res


def test_unused_parameters_without_flag_raise_on_every_rank():
    for res in values(run_ranks(workers.unused_parameters, 2, False, timeout_s=60)):
        assert "error" in res and "got no gradient" in res["error"] and "find_unused_parameters=True" in res["error"]


def test_activation_checkpointing():
    for worst in values(run_ranks(workers.checkpointed, 2)):
        assert worst < 1e-6


def test_bf16_compression_tracks_fp32():
    fp32 = values(run_ranks(workers.compressed_training, 2, None))[0]
    bf16 = values(run_ranks(workers.compressed_training, 2, torch.bfloat16))[0]
    assert fp32[-1] < 0.2 * fp32[0]  # it trains
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.01 * a, (a, b)


def test_failing_rank_does_not_hang_the_others():
    results = run_ranks(workers.rank_raises, 2, timeout_s=90, pg_timeout_s=10)
    assert "injected failure on rank 1" in results[1].get("error", "")
    assert "error" in results[0], "rank 0 finished although rank 1 never all-reduced"


# ---------------------------------------------------------------- bucket plan (no processes)
def test_bucket_plan_reverse_order_small_first_bucket():
    f32 = lambda n: (n, 4, 0, -1)  # noqa: E731
    plan = _C.plan_buckets([f32(100), f32(100), f32(1000), f32(10), f32(10)], 800, 80)
    assert plan[0] == [4, 3]  # the last parameters first; the first bucket closes at 80 bytes
    assert plan[1] == [2]
    assert plan[2] == [1, 0]
    assert sorted(i for b in plan for i in b) == list(range(5))


def test_bucket_plan_separates_dtypes_and_devices():
    plan = _C.plan_buckets([(10, 4, 0, -1), (10, 2, 1, -1), (10, 4, 0, 0), (10, 4, 0, -1)], 1 << 20, 1 << 20)
    for b in plan:
        assert len({(0 if i in (0, 3) else i) for i in b}) == 1
    assert sorted(i for b in plan for i in b) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="bucket sizes must be positive"):
        _C.plan_buckets([(10, 4, 0, -1)], 0, 1)
