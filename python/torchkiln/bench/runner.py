"""Runs cases and formats results: table, JSON, PNG plot."""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .cases import BenchCase
from .timing import compute_peak, copy_bandwidth_gbs, time_pair


@dataclass
class BenchResult:
    family: str
    name: str
    shape: str
    dtype: str
    device: str
    ours_ms: float
    baseline_ms: float
    ratio: float  # baseline_ms / ours_ms: > 1 means torchkiln is faster
    ours_gbs: float  # compulsory bytes / our time
    copy_gbs: float  # measured copy bandwidth in the same run
    pct_of_copy: float
    ours_gflops: float | None = None  # compute-bound ops: useful FLOPs / our time
    baseline_gflops: float | None = None
    peak: dict | None = None  # measured CPU ceilings in the same run (bench.timing.compute_peak)


def run_cases(
    cases: list[BenchCase], device: str = "cpu", repeat: int = 10, warmup: int = 2,
    on_result: Callable[[BenchResult], None] | None = None, errors: list[str] | None = None,
) -> list[BenchResult]:
    """Times every case. `on_result` sees each row as soon as it is measured
    (a run cut short still shows what it got). With an `errors` list, a case
    that raises is recorded there and the run goes on; without one it raises."""
    copy = copy_bandwidth_gbs(device)
    peak = compute_peak(device)
    results = []
    for case in cases:
        try:
            result = _run_case(case, device, repeat, warmup, copy, peak)
        except Exception as exc:
            if errors is None:
                raise
            errors.append(f"{case.family} / {case.name} / {case.shape} / {case.dtype}: {type(exc).__name__}: {exc}")
            continue
        finally:
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def _run_case(case: BenchCase, device: str, repeat: int, warmup: int, copy: float, peak: dict | None
              ) -> BenchResult:
    prepared = case.setup(device)
    ours, base = time_pair(prepared.ours, prepared.baseline, device, warmup=warmup, repeat=repeat)
    gbs = prepared.min_bytes / ours / 1e9
    flops = prepared.flops
    return BenchResult(
        case.family, case.name, case.shape, str(case.dtype).removeprefix("torch."), device,
        ours * 1e3, base * 1e3, base / ours, gbs, copy, 100.0 * gbs / copy,
        flops / ours / 1e9 if flops else None, flops / base / 1e9 if flops else None, peak,
    )


def format_row(r: BenchResult) -> str:
    """One measured row on one line, for progress output."""
    speed = f"{r.ours_gflops:.0f} GFLOP/s (base {r.baseline_gflops:.0f})" if r.ours_gflops else (
        f"{r.ours_gbs:.1f} GB/s = {r.pct_of_copy:.0f}% copy")
    return (f"{r.family} | {r.name} | {r.shape} | {r.dtype} | {r.ours_ms:.3f} ms vs {r.baseline_ms:.3f} ms | "
            f"{r.ratio:.2f}x | {speed}")


def format_table(results: list[BenchResult]) -> str:
    head = ("family", "op", "shape", "dtype", "torchkiln ms", "baseline ms", "ratio", "GB/s", "% copy bw",
            "GFLOP/s (base)")
    rows = [
        (r.family, r.name, r.shape, r.dtype, f"{r.ours_ms:.3f}", f"{r.baseline_ms:.3f}", f"{r.ratio:.2f}x",
         "-" if r.ours_gflops else f"{r.ours_gbs:.1f}", "-" if r.ours_gflops else f"{r.pct_of_copy:.0f}%",
         f"{r.ours_gflops:.0f} ({r.baseline_gflops:.0f})" if r.ours_gflops else "-")
        for r in results
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [line(head), line("-" * w for w in widths), *map(line, rows)]
    if results:
        out.append(f"copy bandwidth ({results[0].device}, torch copy_, read + write): {results[0].copy_gbs:.1f} GB/s; "
                   "ratio = baseline / torchkiln (> 1 is faster)")
        if any(r.ours_gflops is None for r in results):
            out.append("GB/s counts each input read and output written once; kernels that stream their stores "
                       "past the cache can beat copy_, which also reads every destination line before writing it")
        peak = results[0].peak
        if peak and any(r.ours_gflops for r in results):
            dot = f", bf16 dot products {peak['bf16_dot_gflops']:.0f}" if peak["bf16_dot_gflops"] else ""
            fma = f"fp32 FMA {peak['fp32_fma_gflops']:.0f}" if peak["fp32_fma_gflops"] else "no vector FMA timed"
            out.append(f"compute ceiling (cpu, {peak['threads']} threads, {peak['isa']}, measured): {fma}{dot} GFLOP/s")
        if any(r.family == "attention" for r in results):
            out.append("attention: useful FLOPs (masked pairs not counted; backward = 2.5x forward); baseline = "
                       "torch SDPA (varlen: SDPA on the batch padded to the longest sequence)")
    return "\n".join(out)


def write_json(results: list[BenchResult], path: str | Path, meta: dict) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))


def write_plot(results: list[BenchResult], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.name}\n{r.shape}" for r in results]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results)), 4.5))
    bars = ax.bar(range(len(results)), [r.ratio for r in results], color="#c0504d")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(results)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speed-up vs eager PyTorch (x)")
    ax.set_title(f"torchkiln vs eager PyTorch ({results[0].device})" if results else "torchkiln")
    for bar, r in zip(bars, results):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r.ratio:.2f}x", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
