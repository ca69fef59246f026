"""Runs one benchmark case's torchkiln side three times, for a profiler to
catch one launch, e.g. on a GPU machine:
  ncu --clock-control none -k regex:paged_decode_kernel --launch-skip 2 --launch-count 1 \\
      python3 scripts/run_bench_case.py paged "paged_attention decode vs sdpa" \\
      "64x4096 ctx, 32/8 heads, d128, block 16"
(family, op name and shape exactly as `torchkiln bench --device cuda` prints them)."""
import sys

import torch

from torchkiln.bench import cases_for

fam, name, shape = sys.argv[1:4]
device = "cuda" if torch.cuda.is_available() else "cpu"
case = next((c for c in cases_for(fam, device=device) if c.name == name and c.shape == shape), None)
if case is None:
    sys.exit(f"run_bench_case.py: no {device} case {name!r} of shape {shape!r} in family {fam!r} "
             "(`torchkiln bench --family FAMILY` lists them)")
prep = case.setup(device)
for _ in range(3):
    prep.ours()
if device == "cuda":
    torch.cuda.synchronize()
print("ran", fam, name, shape)
