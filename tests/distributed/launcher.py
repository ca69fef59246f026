"""Run a function on N local ranks (Gloo over loopback) with a hard timeout:
a hang fails the test instead of blocking CI, and no process outlives it."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, out_dir, pg_timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(pg_timeout_s + 20, exit=False, file=sys.stderr)  # where a hang sits
    result = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        result["value"] = fn(rank, world, *args)
    except BaseException as e:  # reported to the parent, which decides
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world: int, *args, timeout_s: float = 90.0, pg_timeout_s: float = 30.0) -> list[dict]:
    """Returns each rank's {"value": ...} or {"error": ..., "traceback": ...}.
    Raises TimeoutError (after killing every rank) past timeout_s."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args, out_dir, pg_timeout_s), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not all(not p.is_alive() for p in ctx.processes):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks still running after {timeout_s} s (hang?)")
                time.sleep(0.05)
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(5)
        results = []
        for r in range(world):
            path = os.path.join(out_dir, f"rank{r}.pt")
            results.append(torch.load(path) if os.path.exists(path) else {"error": "no result (process died)"})
        return results


def values(results: list[dict]) -> list:
    """The ranks' return values; fails with the first rank's traceback otherwise."""
    for r, res in enumerate(results):
        if "error" in res:
            raise AssertionError(f"rank {r} failed: {res.get('traceback', res['error'])}")
    return [res["value"] for res in results]
