"""Distributed training on torch.distributed: overlapped data parallelism and
tensor-parallel linear layers."""

from .data_parallel import OverlappedDataParallel
from .env import init_from_env
from .tensor_parallel import ColumnParallelLinear, RowParallelLinear

__all__ = ["ColumnParallelLinear", "OverlappedDataParallel", "RowParallelLinear", "init_from_env"]
