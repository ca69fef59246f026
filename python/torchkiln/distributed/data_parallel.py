"""OverlappedDataParallel: data-parallel training whose gradient all-reduce
runs bucket by bucket while backward is still computing.

The engine is C++ (csrc/comm/overlap_engine.cpp): buckets in reverse
parameter order with a small first bucket (csrc/comm/bucket_plan.cpp),
readiness counted from autograd post-accumulate-grad hooks, buckets launched
in a fixed order on every rank, fused pack/unpack kernels (cast, averaging,
error feedback), one wait when backward ends. Transport: the c10d process
group (Gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._ext import _C

_MIB = 1 << 20


# Ids must be the same on every rank (the bucket plan is computed locally).
_DTYPE_IDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _device_id(t: Tensor) -> int:
    return -1 if t.device.type == "cpu" else (t.device.index or 0)


class OverlappedDataParallel(nn.Module):
    """Wraps ``module`` for data-parallel training over ``process_group``
    (default: the world). After ``loss.backward()`` every parameter's ``.grad``
    holds the average over ranks, as with ``DistributedDataParallel``.

    Args:
        bucket_cap_mb: bucket size; ``first_bucket_mb`` for the first bucket
            (the last layers' gradients), so communication starts early.
        comm_dtype: e.g. ``torch.bfloat16`` to all-reduce in 16 bits; an fp32
            error-feedback residual per gradient element carries what the
            rounding dropped into the next step, so compression does not drift.
        gradient_as_bucket_view: ``.grad`` tensors are views into the flat
            buckets (no copy in or out; saves one gradient's memory).
        find_unused_parameters: parameters that get no gradient in a step
            count as zero; without it such a step raises (on every rank,
            before any hang).
        static_graph: accepted for DDP compatibility; the engine needs no
            graph analysis, so it changes nothing.
    """

    def __init__(
        self,
        module: nn.Module,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25,
        first_bucket_mb: float = 1,
        comm_dtype: torch.dtype | None = None,
        gradient_as_bucket_view: bool = True,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        broadcast_parameters: bool = True,
    ):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("OverlappedDataParallel: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group or torchkiln.distributed.init_from_env)")
        if bucket_cap_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError(f"OverlappedDataParallel: bucket sizes must be positive, got bucket_cap_mb="
                             f"{bucket_cap_mb}, first_bucket_mb={first_bucket_mb}")
        if comm_dtype is not None and comm_dtype not in _DTYPE_IDS:
            raise TypeError(f"OverlappedDataParallel: comm_dtype must be None, torch.float32, torch.bfloat16 or "
                            f"torch.float16, got {comm_dtype}")
        self.module = module
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("OverlappedDataParallel: the module has no parameters that require grad")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        for name, p in named:
            if not p.is_contiguous():
                raise ValueError(f"OverlappedDataParallel: parameter {name} must be contiguous")
            if p.dtype not in _DTYPE_IDS:
                raise TypeError(f"OverlappedDataParallel: parameter {name} must be float32, bfloat16 or float16, "
                                f"got {p.dtype}")
        if broadcast_parameters:
            with torch.no_grad():
                src = dist.get_global_rank(self.process_group, 0)
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t, src=src, group=self.process_group)
        specs = [(p.numel(), p.element_size(), _DTYPE_IDS[p.dtype], _device_id(p)) for p in self._params]
        self.bucket_indices: list[list[int]] = _C.plan_buckets(
            specs, int(bucket_cap_mb * _MIB), int(first_bucket_mb * _MIB))
        self._engine = _C.OverlapEngine(self._params, self.bucket_indices, self.process_group.group_name,
                                        comm_dtype, gradient_as_bucket_view)
        self._require_sync = True
        self._syncing = False  # this backward all-reduces
        self._finalize_queued = False
        self.last_backward_compute_end = 0.0
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(self._params)]

    # ------------------------------------------------------------------ hooks
    def _make_hook(self, index: int):
        def hook(param: Tensor) -> None:
            if not self._syncing:
                return
            if not self._finalize_queued:
                self._finalize_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            self._engine.mark_ready(index)

        return hook

    def _finalize(self) -> None:
        # Backward's own compute is over when this callback runs; what
        # communication is still in flight from here on was not hidden.
        self.last_backward_compute_end = time.monotonic()
        self._syncing = False
        self._finalize_queued = False
        unready = self._engine.finalize(self.find_unused_parameters)
        if unready:
            names = ", ".join(self._names[i] for i in unready[:10])
            more = f" (and {len(unready) - 10} more)" if len(unready) > 10 else ""
            raise RuntimeError(
                f"OverlappedDataParallel: parameters got no gradient in this backward pass: {names}{more}. "
                "Pass find_unused_parameters=True if some parameters are legitimately unused in a step."
            )

    # ------------------------------------------------------------------ API
    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and self._require_sync:
            self._engine.prepare()
            self._syncing = True
            self._finalize_queued = False
        else:
            self._syncing = False
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients of backward passes inside accumulate locally; the first
        backward after the block all-reduces the sum."""
        old = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = old

    def bucket_timeline(self) -> list[tuple[float, float, int]]:
        """(launch, finish, bytes) of each bucket in the last synchronising
        backward, seconds on a steady clock (for overlap measurements)."""
        return self._engine.timeline()

    @property
    def num_buckets(self) -> int:
        return self._engine.num_buckets
