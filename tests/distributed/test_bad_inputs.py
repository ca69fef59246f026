"""Clear errors from the distributed API (one in-process Gloo rank, plus a
2-rank case for sharding rules a group of one cannot break)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

import workers
from launcher import free_port, run_ranks, values
from torchkiln.distributed import ColumnParallelLinear, OverlappedDataParallel, RowParallelLinear, init_from_env


def test_needs_an_initialised_process_group(monkeypatch):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        OverlappedDataParallel(nn.Linear(4, 4))
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are not set"):
        init_from_env()


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_overlapped_data_parallel_bad_arguments(one_rank):
    with pytest.raises(ValueError, match="bucket sizes must be positive"):
        OverlappedDataParallel(nn.Linear(4, 4), bucket_cap_mb=0)
    with pytest.raises(TypeError, match="comm_dtype must be None"):
        OverlappedDataParallel(nn.Linear(4, 4), comm_dtype=torch.int32)
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        OverlappedDataParallel(frozen)
    with pytest.raises(TypeError, match="parameter weight must be float32, bfloat16 or float16"):
        OverlappedDataParallel(nn.Linear(4, 4).double())
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="parameter w must be contiguous"):
        OverlappedDataParallel(m)


def test_one_rank_still_trains(one_rank):
    # world size 1: averaging over one rank returns the local gradient
    model = workers.make_mlp()
    ref = workers.make_mlp()
    odp = OverlappedDataParallel(model, bucket_cap_mb=1e-6, comm_dtype=torch.float32)
    x, y = torch.randn(5, 10), torch.randn(5, 3)
    nn.functional.mse_loss(odp(x), y).backward()
    nn.functional.mse_loss(ref(x), y).backward()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_row_parallel_rejects_zero_chunks(one_rank):
    with pytest.raises(ValueError, match="overlap_chunks must be >= 1"):
        RowParallelLinear(8, 8, overlap_chunks=0)
    assert ColumnParallelLinear(8, 6)(torch.randn(2, 8)).shape == (2, 6)


def test_sharding_must_divide_the_group():
    for msg in values(run_ranks(workers.tp_bad_sizes, 2)):
        assert "ColumnParallelLinear: out_features (7) must be divisible by the group size (2)" in msg[0]
        assert "RowParallelLinear: in_features (5) must be divisible by the group size (2)" in msg[1]
