"""``torchkiln`` command line: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for section, values in data.items():
            if isinstance(values, dict):
                print(f"{section}:")
                for k, v in values.items():
                    print(f"  {k}: {v}")
            else:
                print(f"{section}: {values}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import cases_for, run_cases
    from .bench.runner import format_row, format_table, write_json, write_plot
    from .info import info

    if args.device == "cuda" and not torch.cuda.is_available():
        print("torchkiln bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    from .bench.timing import keep_freed_memory_mapped

    steady_malloc = args.device == "cpu" and not args.system_malloc and keep_freed_memory_mapped()
    cases = cases_for(args.family, quick=args.quick, device=args.device)
    errors: list[str] = []
    progress = (lambda r: print(format_row(r), flush=True)) if args.progress else None
    results = run_cases(cases, device=args.device, repeat=args.repeat, warmup=args.warmup,
                        on_result=progress, errors=errors)
    print(format_table(results))
    for e in errors:
        print(f"FAILED: {e}", file=sys.stderr)
    if args.device == "cpu":
        print("allocator: " + ("glibc heap kept (no page faults on reuse; --system-malloc to disable)"
                               if steady_malloc else "system default"))
    overlap = None
    if args.device == "cpu" and args.family in (None, "comm"):
        from .bench.comm import format_overlap, overlap_benchmark

        # 20 interleaved steps each: with 8, one run in several read 1.14x
        # DDP where runs of 16 read 0.90-0.92x (shared, noisy 2-core host).
        overlap = overlap_benchmark(quick=args.quick, steps=2 if args.quick else 20)
        print(format_overlap(overlap))
    if args.json:
        meta = {"info": info(), "quick": args.quick, "repeat": args.repeat, "steady_state_malloc": steady_malloc,
                "comm_overlap": overlap}
        write_json(results, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchkiln", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_info = sub.add_parser("info", help="build and CPU facts")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(fn=_cmd_info)

    from .bench.cases import FAMILIES

    p_bench = sub.add_parser("bench", help="time every kernel against its eager PyTorch baseline")
    p_bench.add_argument("--family", choices=list(FAMILIES), help="only this kernel family")
    p_bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p_bench.add_argument("--json", metavar="PATH", help="write results as JSON")
    p_bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the ratios")
    p_bench.add_argument("--repeat", type=int, default=10, help="timed calls per implementation (median)")
    p_bench.add_argument("--warmup", type=int, default=2)
    p_bench.add_argument("--progress", action="store_true", help="print each row as soon as it is measured")
    p_bench.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    p_bench.add_argument(
        "--system-malloc", action="store_true",
        help="keep glibc's default of unmapping big frees (every call then page-faults its outputs)",
    )
    p_bench.set_defaults(fn=_cmd_bench)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
