"""Timing primitives. CPU: wall clock per call; CUDA: events after a sync.
Ours and the baseline alternate call by call so machine noise hits both."""

from __future__ import annotations

import ctypes
import statistics
import sys
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
    ours: Callable[[], object], baseline: Callable[[], object], device: str, warmup: int = 2, repeat: int = 10,
    budget_s: float = 30.0,
) -> tuple[float, float]:
    """Median seconds per call of (ours, baseline), measured interleaved.

    A pair whose calls take seconds gets fewer repeats (3, or 1 where one
    pair outlasts `budget_s`), so that timing it stays near the budget: on
    CPUs without native bf16 (AVX2), torch's bf16 GEMM takes a generic loop
    (on a Zen 3, one of the quant family's 256-row grad @ W products took
    97 s a call in bf16, 400x our kernel's time), and ten repeats would take
    a quarter hour."""
    for i in range(warmup):
        t0 = time.perf_counter()
        ours()
        baseline()
        if device == "cuda":
            torch.cuda.synchronize()
        pair_s = time.perf_counter() - t0
        if i == 0 and pair_s * warmup > budget_s:
            break  # the first call already warmed up a pair this slow
    if warmup > 0:
        repeat = min(repeat, 1 if pair_s > budget_s else max(3, int(budget_s / pair_s)))
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


def compute_peak(device: str) -> dict | None:
    """Measured arithmetic ceilings of the CPU with all of torch's threads
    busy (torchkiln._C.measure_compute_peak): fp32 FMA and bf16 dot-product
    GFLOP/s, 0 where the active ISA lacks the instruction. None on CUDA."""
    if device != "cpu":
        return None
    from .._ext import _C

    return dict(_C.measure_compute_peak(0.2))


def keep_freed_memory_mapped() -> bool:
    """Make glibc malloc serve large tensors from its heap and keep freed
    memory, as a long-running trainer or server with jemalloc/tcmalloc would.

    By default glibc mmaps every allocation above 32 MiB and unmaps it on
    free, so each call that allocates a big output pays a page fault per 4 KiB
    (the kernel zeroing fresh pages): on these machines that costs more than
    the op itself, for torchkiln and the eager baseline alike, and hides what
    the kernels do. Returns False where this is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    # mallopt takes a C int: 2 GiB - 1 is the largest trim threshold it can say.
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
