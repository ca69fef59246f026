"""Timing primitives. CPU: wall clock per call; CUDA: events after a sync.
Ours and the baseline alternate call by call so machine noise hits both."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _time_once(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_pair(
    ours: Callable[[], object], baseline: Callable[[], object], device: str, warmup: int = 2, repeat: int = 10
) -> tuple[float, float]:
    """Median seconds per call of (ours, baseline), measured interleaved."""
    for _ in range(warmup):
        ours()
        baseline()
    if device == "cuda":
        torch.cuda.synchronize()
    t_ours, t_base = [], []
    for _ in range(repeat):
        t_ours.append(_time_once(ours, device))
        t_base.append(_time_once(baseline, device))
    return statistics.median(t_ours), statistics.median(t_base)


def copy_bandwidth_gbs(device: str, nbytes: int = 256 << 20, repeat: int = 10) -> float:
    """Device copy bandwidth in GB/s, counting the read and the write
    (the ceiling every memory-bound kernel is compared against)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    t, _ = time_pair(fn, fn, device, warmup=2, repeat=repeat)
    return 2 * nbytes / t / 1e9
