"""torchrun-style initialisation."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialises the default process group from RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT (as set by torchrun); backend defaults to NCCL
    when CUDA is available, else Gloo. LOCAL_RANK, when set, selects the CUDA
    device. Returns (rank, world_size); a no-op when already initialised."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_from_env: environment variables {', '.join(missing)} are not set "
                           "(launch with torchrun, or set them)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world
