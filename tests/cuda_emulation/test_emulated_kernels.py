"""Every CUDA kernel (csrc/*/cuda/*.cu), run from its real source on the host
through tests/cuda_emulation/cuda_shim.h (fibers for threads in a random
seeded schedule, TK_EMU_SEED; cp.async copies that land late; PTX semantics
for mma.sync / ldmatrix / shuffles; sm_90 launch limits) and called through
its public launcher, against the fp64 reference under flash-attn's rule (or
exactly, for data movement). This checks indexing, fragment layouts, masks,
reductions and launch configurations on machines without a GPU; timing and
hardware numerics still need scripts/gpu_check.sh.

Needs g++ (C++20) and the CUDA headers (cuda_bf16.h); skips without them.
TK_EMU_SANITIZE (e.g. address,undefined) adds the compilers' sanitizers.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import torchkiln
from attention_helpers import random_cache
from reference import assert_within_rule, fused_add_rms_norm_ref, rms_norm_ref, rotary_ref
from torchkiln.ops.activation import silu_and_mul_ref
from torchkiln.ops.attention import attention_ref
from torchkiln.ops.paged import paged_attention_ref

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _cuda_include() -> Path | None:
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for site in map(Path, sys.path):  # torch's CUDA wheels ship the toolkit headers too
        candidates += [site / "nvidia" / "cu13" / "include", site / "nvidia" / "cuda_runtime" / "include"]
    return next((c for c in candidates if (c / "cuda_bf16.h").exists()), None)


def _build_emulator(build: Path, include: Path, compiler: str) -> Path:
    """Compiles every .cu file as host C++ against the shim, plus the driver,
    into `build`; returns the executable."""
    # -fno-strict-aliasing: CUDA code reinterprets vector registers freely
    # (nvcc's idiom); GCC's type-based alias analysis would miscompile that.
    # TK_EMU_SANITIZE=address,undefined (CI's CUDA stage) builds the emulator
    # with sanitizers: every emulated access outside a host buffer, and every
    # misaligned vector load (uint4 / float4 keep their 16-byte alignment
    # here), then fails the test that made it.
    sanitize = [f"-fsanitize={os.environ['TK_EMU_SANITIZE']}"] if os.environ.get("TK_EMU_SANITIZE") else []
    flags = [compiler, "-std=c++20", "-O2", "-fno-strict-aliasing", "-DTORCHKILN_EMULATE_CUDA=1", *sanitize,
             f"-I{ROOT / 'csrc'}", f"-I{HERE}", f"-I{include}"]
    kernels = sorted((ROOT / "csrc").glob("*/cuda/*.cu"))
    jobs = [(flags + ["-x", "c++", "-include", "cuda_shim.h", "-c", str(f)], build / f"{f.parent.parent.name}_{f.stem}.o")
            for f in kernels]
    jobs += [(flags + ["-c", str(HERE / name)], build / f"{Path(name).stem}.o")
             for name in ("emu_runtime.cpp", "emulate_kernels.cpp")]

    def compile_one(job):
        cmd, obj = job
        return subprocess.run(cmd + ["-o", str(obj)], capture_output=True, text=True, timeout=900)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for proc in pool.map(compile_one, jobs):
            assert proc.returncode == 0, proc.stderr[-4000:]
    exe = build / "emulate_kernels"
    proc = subprocess.run([compiler, "-pthread", *sanitize, *(str(obj) for _, obj in jobs), "-o", str(exe)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> Path:
    """The emulator, built once per session. Under pytest-xdist (CI runs these
    tests on every core with -n) the workers share one build: the first to
    take the lock compiles, the others wait and reuse it."""
    include = _cuda_include()
    compiler = shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h) to build the kernel emulator")
    from filelock import FileLock  # a dependency of torch

    # Under xdist getbasetemp() is the worker's folder, its parent the run's.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    build = shared / "emu"
    with FileLock(str(shared / "emu.lock")):
        exe = build / "emulate_kernels"
        if not exe.exists():
            build.mkdir(exist_ok=True)
            _build_emulator(build, include, compiler)
    return exe


OUTPUTS = ("out", "lse", "dq", "dk", "dv", "sum", "dx", "dw", "dense", "bucket", "residual", "unpacked",
           "num_splits", "workspace", "guards_intact", "key_cache_written", "value_cache_written", "key_cache_copied", "value_cache_copied")


def run(emulator: Path, workdir: Path, config: dict, arrays: dict, sms: int = 132) -> dict:
    """Writes the case, runs the emulator, returns its float32 outputs by name.
    Floating inputs are written as float32, int64 / uint8 as they are, other
    integers as int32."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config").write_text("\n".join(f"{k} {float(v)!r}" for k, v in config.items()))
    for name, t in arrays.items():
        t = t.contiguous()
        if t.is_floating_point():
            t = t.float()
        elif t.dtype not in (torch.int64, torch.uint8):
            t = t.to(torch.int32)
        t.numpy().tofile(workdir / f"{name}.bin")
    env = dict(os.environ, TK_EMU_SMS=str(sms))
    env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")  # only read by sanitized builds
    env.setdefault("ASAN_OPTIONS", "detect_leaks=0")
    proc = subprocess.run([str(emulator), str(workdir)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {p.stem: torch.from_numpy(np.fromfile(p, dtype=np.float32)) for p in workdir.glob("*.bin")
            if p.stem in OUTPUTS}


def flash_config(q, k, *, varlen, causal=False, window=(-1, -1), softcap=0.0, scale=None, alibi=None,
                 backward=True, block_size=0, **extra):
    d = q.shape[-1]
    left, right = (window[0], 0) if causal else window
    return dict(
        dtype=DTYPE_CODE[q.dtype], head_dim=d, heads=q.shape[-2], heads_k=k.shape[-2], varlen=int(varlen),
        block_size=block_size, backward=int(backward), scale=scale if scale is not None else 1 / math.sqrt(d),
        softcap=softcap, window_left=left, window_right=right, alibi=int(alibi is not None), paged_decode=0, **extra,
    )


def grads64(q, k, v, dout, **kw):
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = attention_ref(q, k, v, **kw)
    out.backward(dout.double())
    return q.grad, k.grad, v.grad


def grads_lowp(q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = attention_ref(q, k, v, **kw)
    out.backward(dout)
    return q.grad, k.grad, v.grad


FIXED = [  # (batch, sq, sk, heads, heads_k, d, dtype, causal)
    (1, 130, 150, 4, 2, 64, torch.bfloat16, True),
    (2, 1, 239, 3, 1, 128, torch.float16, False),
    (1, 113, 203, 2, 2, 96, torch.bfloat16, True),
    (1, 70, 50, 4, 2, 256, torch.float16, True),  # the first 20 queries see no key
]


@pytest.mark.parametrize("batch,sq,sk,heads,heads_k,d,dtype,causal", FIXED, ids=str)
def test_flash_forward_backward(emulator, tmp_path, batch, sq, sk, heads, heads_k, d, dtype, causal):
    q = torch.randn(batch, sq, heads, d).to(dtype)
    k = torch.randn(batch, sk, heads_k, d).to(dtype)
    v = torch.randn(batch, sk, heads_k, d).to(dtype)
    dout = torch.randn(batch, sq, heads, d).to(dtype)
    cfg = flash_config(q, k, varlen=False, causal=causal, batch=batch, seqlen_q=sq, seqlen_k=sk)
    res = run(emulator, tmp_path, cfg, dict(q=q, k=k, v=v, dout=dout))
    kw = dict(causal=causal)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), **kw)
    low, _ = attention_ref(q, k, v, **kw)
    assert_within_rule(res["out"].view(q.shape), ref, low, what="out")
    lse = res["lse"].view(batch, heads, sq)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == math.inf).all()
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], rtol=1e-4, atol=1e-3)
    for name, r, lo, t in zip(("dq", "dk", "dv"), grads64(q, k, v, dout, **kw), grads_lowp(q, k, v, dout, **kw),
                              (q, k, v)):
        assert_within_rule(res[name].view(t.shape), r, lo.double(), factor=3.0, what=name)


@pytest.mark.parametrize(
    "kw",
    [
        dict(window_size=(32, 16)),
        dict(softcap=5.0, causal=True),
        dict(alibi=True, window_size=(40, -1)),
        dict(softmax_scale=0.05, causal=True, window_size=(20, -1)),
        dict(window_size=(2**40 + 5, 2**33)),  # beyond 32 bits: unbounded, not wrapped
        dict(softmax_scale=-0.08, causal=True),  # the forward's max must follow the scaled scores
    ],
    ids=["window", "softcap", "alibi", "scale", "huge_window", "negative_scale"],
)
def test_flash_options(emulator, tmp_path, kw):
    batch, sq, sk, heads, heads_k, d = 2, 97, 150, 4, 2, 64
    q = (3 * torch.randn(batch, sq, heads, d)).bfloat16()
    k, v = (torch.randn(batch, sk, heads_k, d).bfloat16() for _ in range(2))
    dout = torch.randn(batch, sq, heads, d).bfloat16()
    kw = dict(kw)
    alibi = torch.rand(batch, heads) if kw.pop("alibi", False) else None
    ref_kw = dict(kw, alibi_slopes=alibi)
    cfg = flash_config(q, k, varlen=False, causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                       softcap=kw.get("softcap", 0.0), scale=kw.get("softmax_scale"), alibi=alibi, batch=batch,
                       seqlen_q=sq, seqlen_k=sk)
    arrays = dict(q=q, k=k, v=v, dout=dout)
    if alibi is not None:
        arrays["alibi"] = alibi
    res = run(emulator, tmp_path, cfg, arrays)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), **ref_kw)
    low, _ = attention_ref(q, k, v, **ref_kw)
    assert_within_rule(res["out"].view(q.shape), ref, low, what="out")
    for name, r, lo, t in zip(("dq", "dk", "dv"), grads64(q, k, v, dout, **ref_kw),
                              grads_lowp(q, k, v, dout, **ref_kw), (q, k, v)):
        assert_within_rule(res[name].view(t.shape), r, lo.double(), factor=3.0, what=name)


def test_flash_running_max_moves_late(emulator, tmp_path):
    # Keys that grow along the sequence: the forward's running max keeps
    # rising tile after tile (by more than its slack of 2^8), so O is rescaled
    # in later tiles too, not only at the first.
    batch, sq, sk, heads, d = 1, 70, 400, 2, 64
    q = (2 * torch.randn(batch, sq, heads, d)).bfloat16()
    grow = torch.linspace(0.2, 6.0, sk).view(1, sk, 1, 1)
    k = (torch.randn(batch, sk, heads, d) * grow).bfloat16()
    v = torch.randn(batch, sk, heads, d).bfloat16()
    dout = torch.randn(batch, sq, heads, d).bfloat16()
    cfg = flash_config(q, k, varlen=False, batch=batch, seqlen_q=sq, seqlen_k=sk)
    res = run(emulator, tmp_path, cfg, dict(q=q, k=k, v=v, dout=dout))
    ref, lse_ref = attention_ref(q.double(), k.double(), v.double())
    low, _ = attention_ref(q, k, v)
    assert_within_rule(res["out"].view(q.shape), ref, low, what="out")
    assert torch.allclose(res["lse"].double().view(lse_ref.shape), lse_ref, rtol=0, atol=1e-3)


def _cu(lens):
    return torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)


def test_flash_varlen_with_empty_sequences(emulator, tmp_path):
    lens_q, lens_k = [3, 0, 70, 2, 1], [5, 6, 90, 0, 1]
    heads, heads_k, d = 4, 2, 128
    q = torch.randn(sum(lens_q), heads, d).half()
    k, v = (torch.randn(sum(lens_k), heads_k, d).half() for _ in range(2))
    dout = torch.randn(q.shape).half()
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    cfg = flash_config(q, k, varlen=True, causal=True, batch=len(lens_q), seqlen_q=max(lens_q),
                       seqlen_k=max(lens_k), total_q=q.shape[0], total_k=k.shape[0])
    res = run(emulator, tmp_path, cfg, dict(q=q, k=k, v=v, dout=dout, cu_q=cu_q, cu_k=cu_k))
    out, lse = res["out"].view(q.shape), res["lse"].view(heads, q.shape[0])
    dq, dk, dv = res["dq"].view(q.shape), res["dk"].view(k.shape), res["dv"].view(v.shape)
    for b in range(len(lens_q)):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        if lens_q[b] == 0:
            assert (dk[ks] == 0).all() and (dv[ks] == 0).all(), "keys no query reads get zero gradients"
            continue
        if lens_k[b] == 0:
            assert (out[qs] == 0).all() and (lse[:, qs] == math.inf).all() and (dq[qs] == 0).all()
            continue
        seq = (q[qs][None], k[ks][None], v[ks][None])
        ref, _ = attention_ref(*(t.double() for t in seq), causal=True)
        low, _ = attention_ref(*seq, causal=True)
        assert_within_rule(out[qs][None], ref, low, what=f"out of sequence {b}")
        g = dout[qs][None]
        for name, ours, r, lo in zip(("dq", "dk", "dv"), (dq[qs], dk[ks], dv[ks]), grads64(*seq, g, causal=True),
                                     grads_lowp(*seq, g, causal=True)):
            assert_within_rule(ours[None], r, lo.double(), factor=3.0, what=f"{name} of sequence {b}")


def test_flash_chunked_prefill_through_block_table(emulator, tmp_path):
    shapes = [(0, 37), (50, 20), (129, 1)]  # (cached prefix, new tokens)
    lens = [p + n for p, n in shapes]
    new = [n for _, n in shapes]
    heads, heads_k, d, block = 4, 2, 64, 16
    k, v, table, _ = random_cache(lens, block, heads_k, d, torch.bfloat16)
    q = torch.randn(sum(new), heads, d).bfloat16()
    cu_q, cu_k = _cu(new), _cu(lens)
    cfg = flash_config(q, k, varlen=True, causal=True, backward=False, block_size=block, batch=len(lens),
                       seqlen_q=max(new), seqlen_k=max(lens), total_q=q.shape[0], total_k=0)
    res = run(emulator, tmp_path, cfg, dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, block_table=table))
    out = res["out"].view(q.shape)
    for s in range(len(lens)):
        qs = slice(int(cu_q[s]), int(cu_q[s + 1]))
        kc = k[table[s].long()].flatten(0, 1)[: lens[s]][None]
        vc = v[table[s].long()].flatten(0, 1)[: lens[s]][None]
        ref, _ = attention_ref(q[qs][None].double(), kc.double(), vc.double(), causal=True)
        low, _ = attention_ref(q[qs][None], kc, vc, causal=True)
        assert_within_rule(out[qs][None], ref, low, what=f"sequence {s}")


FEW_QUERIES = [  # (batch, sq, sk, heads, heads_k, d, dtype, emulated SMs, options): flash_attn_func
    # Split over the keys, then combined. Forward only: emulating the backward
    # of 3 x 8 heads x 700 keys took 140 s under CI's sanitizers, and the
    # cases below run it from the decode kernel's out and lse.
    (3, 1, 700, 8, 2, 128, torch.bfloat16, 132, dict(causal=True, backward=False)),
    (2, 1, 301, 4, 4, 64, torch.float16, 132, dict(alibi=True, window_size=(100, 0), softcap=4.0)),
    (2, 1, 90, 16, 1, 96, torch.bfloat16, 1, dict(window_size=(-1, 3))),  # one SM: one chunk, written directly
    # Speculative decoding: rows x heads of a group are the kernel's query vectors.
    (2, 4, 500, 8, 2, 64, torch.bfloat16, 132, dict(causal=True)),  # 16 vectors: two blocks per kv head
    (3, 8, 300, 4, 4, 64, torch.float16, 132, dict(alibi=True, window_size=(7, 2), softcap=4.0)),  # MHA, 8 rows
    (2, 5, 3, 4, 2, 128, torch.bfloat16, 132, dict(causal=True)),  # more rows than keys: the first see none
]


@pytest.mark.parametrize("batch,sq,sk,heads,heads_k,d,dtype,sms,kw", FEW_QUERIES, ids=str)
def test_flash_few_queries_run_as_decode(emulator, tmp_path, batch, sq, sk, heads, heads_k, d, dtype, sms, kw):
    """A few queries per sequence go through the paged decode kernel with the
    keys in place, each row with its own causal limit, window and ALiBi
    distance; the flash backward then works from its out and lse."""
    q = (2 * torch.randn(batch, sq, heads, d)).to(dtype)
    k, v = (torch.randn(batch, sk, heads_k, d).to(dtype) for _ in range(2))
    dout = torch.randn(q.shape).to(dtype)
    kw = dict(kw)
    backward = kw.pop("backward", True)
    alibi = torch.rand(batch, heads) if kw.pop("alibi", False) else None  # per sequence
    ref_kw = dict(kw, alibi_slopes=alibi)
    cfg = flash_config(q, k, varlen=False, causal=kw.get("causal", False), window=kw.get("window_size", (-1, -1)),
                       softcap=kw.get("softcap", 0.0), alibi=alibi, backward=backward, batch=batch, seqlen_q=sq,
                       seqlen_k=sk)
    arrays = dict(q=q, k=k, v=v, dout=dout) | ({"alibi": alibi} if alibi is not None else {})
    res = run(emulator, tmp_path, cfg, arrays, sms=sms)
    # Split over the keys exactly when the GPU has room and there is more than one 64-key chunk.
    assert (res["workspace"].item() > 0) == (sms > 1 and sk > 64)
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), **ref_kw)
    low, _ = attention_ref(q, k, v, **ref_kw)
    assert_within_rule(res["out"].view(q.shape), ref, low, what="out")
    torch.testing.assert_close(res["lse"].view(batch, heads, sq).double(), ref_lse, rtol=1e-4, atol=1e-3)
    if not backward:
        assert not any(name in res for name in ("dq", "dk", "dv"))
        return
    for name, r, lo, t in zip(("dq", "dk", "dv"), grads64(q, k, v, dout, **ref_kw),
                              grads_lowp(q, k, v, dout, **ref_kw), (q, k, v)):
        assert_within_rule(res[name].view(t.shape), r, lo.double(), factor=3.0, what=name)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "block_table"])
def test_flash_varlen_few_queries_run_as_decode(emulator, tmp_path, paged):
    """Packed batches of 0 to 3 queries per sequence, keys packed or paged,
    including a sequence without keys (zeros, lse +inf), one with more
    queries than keys, and one without a query (nothing of it is written)."""
    lens_q, lens_k = [1, 0, 3, 2, 1, 2], [600, 7, 2, 0, 129, 300]
    heads, heads_k, d, block = 6, 2, 64, 16
    dtype = torch.bfloat16
    q = torch.randn(sum(lens_q), heads, d).to(dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    if paged:
        k, v, table, _ = random_cache(lens_k, block, heads_k, d, dtype)
        seq_k = [k[table[s].long()].flatten(0, 1)[:n] for s, n in enumerate(lens_k)]
        seq_v = [v[table[s].long()].flatten(0, 1)[:n] for s, n in enumerate(lens_k)]
        extra, arrays = dict(block_size=block, total_k=0), dict(block_table=table)
    else:
        k, v = (torch.randn(sum(lens_k), heads_k, d).to(dtype) for _ in range(2))
        seq_k = [k[int(cu_k[s]):int(cu_k[s + 1])] for s in range(len(lens_k))]
        seq_v = [v[int(cu_k[s]):int(cu_k[s + 1])] for s in range(len(lens_k))]
        extra, arrays = dict(total_k=k.shape[0]), {}
    cfg = flash_config(q, k, varlen=True, causal=True, backward=False, batch=len(lens_q), seqlen_q=max(lens_q),
                       seqlen_k=max(lens_k), total_q=q.shape[0], **extra)
    res = run(emulator, tmp_path, cfg, dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, **arrays))
    assert res["workspace"].item() > 0
    out, lse = res["out"].view(q.shape), res["lse"].view(heads, q.shape[0])
    assert not out.isnan().any() and not lse.isnan().any(), "every query row written"
    for s in range(len(lens_q)):
        rows = slice(int(cu_q[s]), int(cu_q[s + 1]))
        if lens_q[s] == 0:
            continue
        if lens_k[s] == 0:
            assert (out[rows] == 0).all() and (lse[:, rows] == math.inf).all()
            continue
        seq = (q[rows][None], seq_k[s][None], seq_v[s][None])
        ref, ref_lse = attention_ref(*(t.double() for t in seq), causal=True)
        low, _ = attention_ref(*seq, causal=True)
        assert_within_rule(out[rows][None], ref, low, what=f"sequence {s}")
        torch.testing.assert_close(lse[:, rows].double(), ref_lse[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("paged", [False, True], ids=["packed", "block_table"])
@pytest.mark.parametrize("route,heads,heads_k", [("decode", 4, 2), ("flash", 16, 1)])
def test_flash_varlen_unchecked_offsets_stay_in_bounds(emulator, tmp_path, route, heads, heads_k, paged):
    """Under CUDA graph capture the glue can't read cu_seqlens or the block
    table, and plans for the caller's max_seqlen_q / max_seqlen_k: the kernels
    clamp what they read. A span stays inside the packed tokens (decreasing
    offsets: empty), a sequence stops at the maxima (and its table row), an
    id outside the cache reads block 0. NaN guards around every input and
    output show any access outside them. Both routes: a few queries per
    sequence (the decode kernel) and a wide GQA group (the flash kernels)."""
    d, block, max_q, max_k, dtype = 64, 16, 4, 100, torch.bfloat16
    total_q = 7
    cu_q = torch.tensor([0, 0, -3, 2, 100], dtype=torch.int32)  # as read: [0,0) [0,0) [0,2) [2,6) (cut at 4)
    cu_k = torch.tensor([0, 10, 5, 1000, 2000], dtype=torch.int32)
    q = torch.randn(total_q, heads, d).to(dtype)
    dout = torch.randn(q.shape).to(dtype)
    if paged:  # counts as read: 10, 0, 995 and 1000, both cut at 100
        k, v, table, _ = random_cache([10, 0, 100, 100], block, heads_k, d, dtype)
        table = table.contiguous()
        table[3, 0], table[3, 1] = -1, k.shape[0]  # just outside the cache, either side
        as_read = table.long()
        as_read[3, :2] = 0
        keys = {s: (k[as_read[s]].flatten(0, 1)[:max_k], v[as_read[s]].flatten(0, 1)[:max_k]) for s in (2, 3)}
        extra, arrays = dict(block_size=block, total_k=0, backward=0), dict(block_table=table)
    else:  # as read: [0,10) [10,10) [5,105) (cut at 100) [120,120)
        k, v = (torch.randn(120, heads_k, d).to(dtype) for _ in range(2))
        keys = {2: (k[5:105], v[5:105]), 3: (k[120:], v[120:])}
        extra, arrays = dict(total_k=k.shape[0], backward=1), dict(dout=dout)
    cfg = flash_config(q, k, varlen=True, causal=True, batch=4, seqlen_q=max_q, seqlen_k=max_k, total_q=total_q,
                       guard=2, **extra)
    res = run(emulator, tmp_path, cfg, dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, **arrays))
    assert res["guards_intact"].item() == 1.0, "a kernel wrote outside its tensors"
    assert (res["workspace"].item() > 0) == (route == "decode")  # split over the keys, then combined
    out, lse = res["out"].view(q.shape), res["lse"].view(heads, total_q)
    assert out[6].isnan().all(), "the row past max_seqlen_q is not written"
    for s, rows in ((2, slice(0, 2)), (3, slice(2, 6))):
        kc, vc = keys[s]
        if kc.shape[0] == 0:
            assert (out[rows] == 0).all() and (lse[:, rows] == math.inf).all()
            continue
        seq = (q[rows][None], kc[None], vc[None])
        ref, ref_lse = attention_ref(*(t.double() for t in seq), causal=True)
        low, _ = attention_ref(*seq, causal=True)
        assert_within_rule(out[rows][None], ref, low, what=f"sequence {s}")
        torch.testing.assert_close(lse[:, rows].double(), ref_lse[0], rtol=1e-4, atol=1e-3)
        if not paged:  # dq reads only its own sequence's keys; several sequences write some dk rows
            seq_dq = grads64(*seq, dout[rows][None], causal=True)[0]
            low_dq = grads_lowp(*seq, dout[rows][None], causal=True)[0]
            assert_within_rule(res["dq"].view(q.shape)[rows][None], seq_dq, low_dq.double(), factor=3.0,
                               what=f"dq of sequence {s}")
    if not paged:
        assert (res["dq"].view(q.shape)[2:6] == 0).all(), "no keys: zero dq"


DECODE = [  # (seq_lens, block_size, heads, heads_k, d, dtype, emulated SMs, options)
    ([1, 17, 300], 16, 4, 2, 64, torch.bfloat16, 132, {}),  # few blocks: 64-key chunks, 5 for the long one
    ([40, 9], 1, 6, 1, 40, torch.float32, 1, {}),  # MQA; one SM: a single chunk, written directly
    ([77, 130], 32, 32, 2, 128, torch.float16, 132, {"softcap": 5.0}),  # 16 heads per kv head: two head groups
    ([200, 3], 16, 4, 2, 96, torch.bfloat16, 132, {"alibi": True, "window": 70}),  # window skips whole chunks
    ([300, 5], 16, 4, 2, 64, torch.bfloat16, 132, {"window": 2**40 + 5}),  # beyond 32 bits: no window
    ([0, 90, 0], 16, 4, 2, 64, torch.bfloat16, 132, {}),  # length 0 (batch padding): zeros, lse +inf
]


@pytest.mark.parametrize("lens,block,heads,heads_k,d,dtype,sms,opts", DECODE, ids=str)
def test_paged_decode(emulator, tmp_path, lens, block, heads, heads_k, d, dtype, sms, opts):
    k, v, table, _ = random_cache(lens, block, heads_k, d, dtype)
    q = (2 * torch.randn(len(lens), heads, d)).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    alibi = torch.rand(heads) if opts.get("alibi") else None
    window = opts.get("window", -1)
    cfg = dict(paged_decode=1, dtype=DTYPE_CODE[dtype], num_seqs=len(lens), heads=heads, heads_k=heads_k,
               head_dim=d, block_size=block, scale=1 / math.sqrt(d), softcap=opts.get("softcap", 0.0),
               window_left=window, alibi=int(alibi is not None))
    arrays = dict(q=q, k=k, v=v, block_table=table, seq_lens=seq_lens)
    if alibi is not None:
        arrays["alibi"] = alibi
    res = run(emulator, tmp_path, cfg, arrays, sms=sms)
    assert (int(res["num_splits"]) == 1) == (sms == 1)
    kw = dict(softcap=opts.get("softcap", 0.0), alibi_slopes=alibi, window_size=(window, -1))
    ref, ref_lse = paged_attention_ref(q.double(), k, v, table, seq_lens, **kw)
    low, _ = paged_attention_ref(q, k, v, table, seq_lens, **kw)
    assert_within_rule(res["out"].view(q.shape), ref, low)
    torch.testing.assert_close(res["lse"].view(len(lens), heads).double(), ref_lse, rtol=1e-4, atol=1e-3)


def test_paged_decode_unchecked_values_stay_in_cache(emulator, tmp_path):
    """Under CUDA graph capture the glue can't read seq_lens and the table to
    check them, and plans for full table rows: the kernel itself keeps every
    read inside the cache (NaN guard blocks on both sides would show any
    other read). An id outside the cache reads block 0; a length stops at the
    end of its table row; a negative one means no keys."""
    lens, block, heads, heads_k, d = [40, 150, 200], 16, 4, 2, 64
    k, v, table, _ = random_cache(lens, block, heads_k, d, torch.bfloat16)
    table = table.contiguous()
    capacity = table.shape[1] * block  # 208
    table[1, 0], table[1, 1] = -1, k.shape[0]  # just outside the cache, either side
    seq_lens = torch.tensor([40, capacity + 100, -5], dtype=torch.int32)
    q = (2 * torch.randn(3, heads, d)).to(torch.bfloat16)
    cfg = dict(paged_decode=1, dtype=DTYPE_CODE[torch.bfloat16], num_seqs=3, heads=heads, heads_k=heads_k,
               head_dim=d, block_size=block, scale=1 / math.sqrt(d), softcap=0.0, window_left=-1, alibi=0,
               guard_blocks=2, max_seq_len=capacity)
    res = run(emulator, tmp_path, cfg, dict(q=q, k=k, v=v, block_table=table, seq_lens=seq_lens))
    assert int(res["num_splits"]) > 1  # sequence 0 leaves whole splits empty
    out = res["out"].view(q.shape)
    assert torch.isfinite(out).all()
    as_read = table.clone()
    as_read[1, :2] = 0
    for s, n in ((0, 40), (1, capacity)):
        args = (as_read[s:s + 1], torch.tensor([n], dtype=torch.int32))
        ref, _ = paged_attention_ref(q[s:s + 1].double(), k, v, *args)
        low, _ = paged_attention_ref(q[s:s + 1], k, v, *args)
        assert_within_rule(out[s:s + 1], ref, low, what=f"sequence {s}")
    assert (out[2] == 0).all()


# ----------------------------------------------------------------------------- the other families
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,hidden,fused", [(3, 7, False), (5, 1023, True), (700, 64, False), (9, 2056, True)])
def test_rms_norm(emulator, tmp_path, dtype, rows, hidden, fused):
    x = (2 * torch.randn(rows, hidden)).to(dtype)
    w = (1 + 0.5 * torch.randn(hidden)).to(dtype)
    res_in = torch.randn(rows, hidden).to(dtype)
    dy, gsum = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    cfg = {"op_rms_norm": 1, "dtype": DTYPE_CODE[dtype], "rows": rows, "hidden": hidden, "fused": int(fused),
           "backward": 1, "eps": 1e-6}
    arrays = dict(x=x, w=w, dy=dy)
    if fused:
        arrays.update(residual=res_in, grad_sum=gsum)
    out = run(emulator, tmp_path, cfg, arrays)

    def forward(x, w, r):
        return fused_add_rms_norm_ref(x, r, w, 1e-6) if fused else (rms_norm_ref(x, w, 1e-6), None)

    ref, ref_sum = forward(x.double(), w.double(), res_in.double())
    low, low_sum = forward(x, w, res_in)
    assert_within_rule(out["out"].view(rows, hidden), ref, low, what="out")
    if fused:
        assert torch.equal(out["sum"].view(rows, hidden), (x + res_in).float()), "the sum is x + residual rounded once"
    # Gradients through the normalised input s (x itself, or the stored sum).
    s = (x + res_in) if fused else x
    grads = []
    for conv in (torch.Tensor.double, lambda t: t.clone()):
        s_, w_ = conv(s).requires_grad_(), conv(w).requires_grad_()
        rms_norm_ref(s_, w_, 1e-6).backward(conv(dy))
        grads.append((s_.grad + (conv(gsum) if fused else 0), w_.grad))
    (ref_dx, ref_dw), (low_dx, low_dw) = grads
    assert_within_rule(out["dx"].view(rows, hidden), ref_dx, low_dx.double(), factor=3.0, what="dx")
    assert_within_rule(out["dw"].view(hidden), ref_dw, low_dw.double(), factor=3.0, atol=1e-4, what="dw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,d", [(1, 5), (7, 1000), (33, 8)])
def test_silu_and_mul(emulator, tmp_path, dtype, rows, d):
    x, dy = (3 * torch.randn(rows, 2 * d)).to(dtype), torch.randn(rows, d).to(dtype)
    out = run(emulator, tmp_path, {"op_silu": 1, "dtype": DTYPE_CODE[dtype], "rows": rows, "d": d, "backward": 1},
              dict(x=x, dy=dy))
    assert_within_rule(out["out"].view(rows, d), silu_and_mul_ref(x.double()), silu_and_mul_ref(x), what="out")
    grads = []
    for conv in (torch.Tensor.double, lambda t: t.clone()):
        x_ = conv(x).requires_grad_()
        silu_and_mul_ref(x_).backward(conv(dy))
        grads.append(x_.grad)
    assert_within_rule(out["dx"].view(rows, 2 * d), grads[0], grads[1].double(), factor=3.0, what="dx")


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("dtype,cs_fp32,rot", [(torch.bfloat16, True, 64), (torch.float16, False, 32),
                                               (torch.float32, True, 128)], ids=str)
def test_rotary(emulator, tmp_path, interleaved, dtype, cs_fp32, rot):
    batch, seq, heads, d, max_pos = 2, 37, 3, 128, 500
    x = torch.randn(batch, seq, heads, d).to(dtype)
    positions = torch.randint(0, max_pos, (batch, seq))
    angle = torch.randn(max_pos, rot // 2)
    cos, sin = angle.cos(), angle.sin()
    if not cs_fp32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    for inverse in (False, True):
        cfg = {"op_rotary": 1, "dtype": DTYPE_CODE[dtype], "cs_fp32": int(cs_fp32), "batch": batch, "seq": seq,
               "heads": heads, "head_dim": d, "rot_dim": rot, "max_position": max_pos,
               "interleaved": int(interleaved), "inverse": int(inverse)}
        out = run(emulator, tmp_path, cfg, dict(x=x, positions=positions, cos=cos, sin=sin))
        s = -sin if inverse else sin
        ref = rotary_ref(x.double(), cos.double(), s.double(), positions, interleaved)
        low = rotary_ref(x, cos, s, positions, interleaved)
        assert_within_rule(out["out"].view(x.shape), ref, low, what=f"inverse={inverse}")


QUANT = [  # (scheme, group, m, n, k, dtype, bias); m > 8: the tensor-core GEMM (16-bit x only)
    ("int8", None, 1, 37, 200, torch.bfloat16, True),  # k % 16 != 0: narrow loads, a short last packet
    ("int8", None, 2, 5, 2048, torch.float16, False),  # two 16-byte packets per lane and step
    ("int4", 128, 1, 6, 4224, torch.bfloat16, True),   # 132 packets a row: lanes 0-3 take a third
    ("nf4", 64, 5, 4, 2112, torch.float32, True),
    ("int4", 64, 3, 40, 256, torch.float16, False),
    ("int4", 32, 8, 9, 96, torch.float32, True),
    ("nf4", 64, 4, 17, 320, torch.bfloat16, False),
    ("int4", 128, 70, 130, 384, torch.bfloat16, True),
    ("int4", 32, 9, 67, 96, torch.float16, False),  # k = 96: half of the last 64-column chunk is padding
    ("int8", None, 33, 65, 200, torch.float16, True),
    ("nf4", 64, 130, 64, 128, torch.bfloat16, False),
]


@pytest.mark.parametrize("scheme,group,m,n,k,dtype,bias", QUANT, ids=str)
def test_weight_only_matmul(emulator, tmp_path, scheme, group, m, n, k, dtype, bias):
    qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=group)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    fmt = {"int8": 0, "int4": 1, "nf4": 2}[scheme]
    qweight = qw.qweight.view(torch.uint8) if qw.qweight.dtype == torch.int8 else qw.qweight
    arrays = dict(x=x, qweight=qweight, scales=qw.scales.float(), bias=b)
    if scheme == "int4":
        arrays["zeros"] = qw.zeros
    cfg = {"op_quant": 1, "dtype": DTYPE_CODE[dtype], "m": m, "n": n, "k": k, "format": fmt,
           "group_size": qw.group_size if scheme != "int8" else k, "bias": int(bias), "gemm": int(m > 8)}
    out = run(emulator, tmp_path, cfg, arrays)
    dense = torchkiln.dequantize(qw, dtype)
    assert torch.equal(out["dense"].view(n, k), dense.float()), "dequantised weight differs from the CPU's"
    w64 = torchkiln.dequantize(qw, torch.float32).double()
    ref = x.double() @ w64.T + (b.double() if bias else 0)
    got = out["out"].view(m, n).double()
    rel = (got - ref).norm() / ref.norm()
    if m > 8:  # the GEMM multiplies the weight rounded to x's dtype
        tol = 1e-3 if dtype == torch.float32 else 1e-2
    else:  # fp32 sums of the exact weights: the output's rounding (half an ulp) dominates
        tol = {torch.float32: 1e-5, torch.bfloat16: 2.5e-3, torch.float16: 6e-4}[dtype]
    assert rel <= tol, f"relative error {rel:.2e}"


@pytest.mark.parametrize("scheme,group,m,n,k,dtype", [
    ("int4", 64, 20, 72, 1088, torch.float16),   # 17 k steps: 4 splits of 5, 5, 5, 2
    ("int8", None, 12, 40, 1030, torch.bfloat16),  # rows and x not 16-byte aligned: narrow loads
    ("nf4", 64, 65, 9, 2048, torch.bfloat16),    # two m tiles
], ids=str)
def test_weight_only_gemm_split_k(emulator, tmp_path, scheme, group, m, n, k, dtype):
    qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=group)
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n).to(dtype)
    qweight = qw.qweight.view(torch.uint8) if qw.qweight.dtype == torch.int8 else qw.qweight
    arrays = dict(x=x, qweight=qweight, scales=qw.scales.float(), bias=b)
    if scheme == "int4":
        arrays["zeros"] = qw.zeros
    cfg = {"op_quant": 1, "dtype": DTYPE_CODE[dtype], "m": m, "n": n, "k": k,
           "format": {"int8": 0, "int4": 1, "nf4": 2}[scheme], "group_size": qw.group_size if scheme != "int8" else k,
           "bias": 1, "gemm": 1}
    # (The QUANT cases above, k <= 384, run unsplit.)
    split = run(emulator, tmp_path / "split", cfg, arrays)  # 132 SMs: k split over many blocks
    fewer = run(emulator, tmp_path / "fewer", cfg, arrays, sms=1)  # 1 SM: fewer, longer splits
    assert split["num_splits"].item() > 1
    # The GEMM multiplies x with the weight rounded to x's dtype, as dequantize gives it.
    ref = x.double() @ torchkiln.dequantize(qw, dtype).double().T + b.double()
    for name, res in (("split", split), ("fewer", fewer)):
        got = res["out"].view(m, n).double()
        rel = (got - ref).norm() / ref.norm()
        assert rel <= {torch.bfloat16: 2.5e-3, torch.float16: 6e-4}[dtype], f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("scheme,dtype", [("int4", torch.bfloat16), ("int8", torch.float16), ("nf4", torch.float32)])
def test_weight_only_gemv_unaligned_x(emulator, tmp_path, scheme, dtype):
    # x one element into its buffer: no 16-byte loads of x (nor of the weight).
    m, n, k = 3, 5, 1024
    qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=64 if scheme != "int8" else None)
    x = torch.randn(m, k).to(dtype)
    qweight = qw.qweight.view(torch.uint8) if qw.qweight.dtype == torch.int8 else qw.qweight
    arrays = dict(x=x, qweight=qweight, scales=qw.scales.float())
    if scheme == "int4":
        arrays["zeros"] = qw.zeros
    cfg = {"op_quant": 1, "dtype": DTYPE_CODE[dtype], "m": m, "n": n, "k": k,
           "format": {"int8": 0, "int4": 1, "nf4": 2}[scheme], "group_size": qw.group_size if scheme != "int8" else k,
           "bias": 0, "gemm": 0, "x_offset": 1}
    out = run(emulator, tmp_path, cfg, arrays)
    ref = x.double() @ torchkiln.dequantize(qw, torch.float32).double().T
    rel = (out["out"].view(m, n).double() - ref).norm() / ref.norm()
    assert rel <= {torch.float32: 1e-5, torch.bfloat16: 2.5e-3, torch.float16: 6e-4}[dtype], f"relative error {rel:.2e}"


GEMV_4BIT = [  # (scheme, group, m, n, k, dtype, bias, sms, x_offset, symmetric)
    ("int4", 128, 1, 70, 4224, torch.bfloat16, True, 132, 0, False),  # n not a multiple of 16; k split many ways
    ("int4", 32, 3, 37, 96, torch.float16, False, 132, 0, False),     # half of the last chunk is padding; group = a half
    ("int4", 64, 8, 130, 1088, torch.bfloat16, True, 1, 0, True),     # 1 SM: few, long splits; symmetric codes
    ("int4", 96, 9, 16, 2112, torch.float16, True, 132, 0, False),    # group not a multiple of 64; two n8 tiles of x
    ("int4", 128, 16, 64, 4096, torch.bfloat16, False, 132, 0, False),
    ("int4", 1024, 2, 20, 2048, torch.bfloat16, True, 132, 0, False),  # a group spans 16 chunks
    ("int4", 32, 5, 9, 4096, torch.bfloat16, False, 4, 1, False),      # x not 16-byte aligned: element loads
    ("nf4", 64, 1, 70, 4224, torch.bfloat16, True, 132, 0, False),
    ("nf4", 128, 5, 37, 1152, torch.float16, False, 1, 0, False),
    ("nf4", 64, 12, 19, 2048, torch.bfloat16, True, 132, 1, False),    # two n8 tiles; x not 16-byte aligned
    ("nf4", 192, 16, 64, 1152, torch.float16, True, 132, 0, False),    # group of three chunks
]


@pytest.mark.parametrize("scheme,group,m,n,k,dtype,bias,sms,x_offset,symmetric", GEMV_4BIT, ids=str)
def test_gemv_4bit_tensor_cores(emulator, tmp_path, scheme, group, m, n, k, dtype, bias, sms, x_offset, symmetric):
    kw = dict(symmetric=symmetric) if scheme == "int4" else {}
    qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=group, **kw)
    x = (torch.randn(m, k) + 0.5).to(dtype)  # a mean away from 0: int4's zero term (zero * sum x) matters
    b = torch.randn(n).to(dtype)
    arrays = dict(x=x, qweight=qw.qweight, scales=qw.scales.float(), bias=b)
    if scheme == "int4":
        arrays["zeros"] = qw.zeros
    cfg = {"op_quant": 1, "dtype": DTYPE_CODE[dtype], "m": m, "n": n, "k": k, "format": {"int4": 1, "nf4": 2}[scheme],
           "group_size": group, "bias": int(bias), "gemm": 0, "gemv_4bit": 1, "x_offset": x_offset}
    out = run(emulator, tmp_path, cfg, arrays, sms=sms)
    if k >= 2048 and sms > 1:
        assert out["num_splits"].item() > 1, "the case was meant to split k"
    w = torchkiln.dequantize(qw, torch.float32).double()
    if scheme == "nf4":  # the kernel multiplies the codebook rounded to x's dtype, then the absmax
        absmax = qw.scales.double().repeat_interleave(group, dim=1)
        w = (w / absmax).to(dtype).double() * absmax
    ref = x.double() @ w.T + (b.double() if bias else 0)
    got = out["out"].view(m, n).double()
    rel = (got - ref).norm() / ref.norm()
    # fp32 sums of the weights: the output's rounding (half an ulp) dominates
    assert rel <= {torch.bfloat16: 2.5e-3, torch.float16: 6e-4}[dtype], f"relative error {rel:.2e}"


@pytest.mark.parametrize("seg_dtype,bucket_dtype,residual", [
    (torch.float32, torch.float32, False), (torch.float32, torch.bfloat16, True), (torch.bfloat16, torch.float32, False),
], ids=str)
def test_bucket_pack_unpack(emulator, tmp_path, seg_dtype, bucket_dtype, residual):
    numels = torch.tensor([5, 0, 1000, 37, 3000], dtype=torch.int64)
    offsets = torch.tensor([0, 8, 8, 1008, 1048], dtype=torch.int64)  # gaps between segments stay untouched
    grads = torch.randn(int(numels.sum())).to(seg_dtype)
    res_in = torch.randn(4048) * 1e-3
    cfg = {"op_pack": 1, "segment_dtype": DTYPE_CODE[seg_dtype], "bucket_dtype": DTYPE_CODE[bucket_dtype],
           "bucket_numel": 4048, "scale": 0.5, "residual": int(residual), "null_segment": 3}
    out = run(emulator, tmp_path, cfg, dict(numels=numels, offsets=offsets, grads=grads, residual=res_in))
    bucket = out["bucket"]
    at = 0
    for i, (n, off) in enumerate(zip(numels.tolist(), offsets.tolist())):
        src = torch.zeros(n) if i == 3 else grads[at : at + n].float()  # segment 3 has no gradient
        want = src * 0.5 + (res_in[off : off + n] if residual else 0)
        packed = want.to(bucket_dtype)
        assert torch.equal(bucket[off : off + n], packed.float()), f"segment {i}"
        if residual:
            assert torch.equal(out["residual"][off : off + n], want - packed.float()), f"residual of segment {i}"
        assert torch.equal(out["unpacked"][at : at + n], packed.to(seg_dtype).float()), f"unpacked segment {i}"
        at += n
    assert torch.isnan(bucket[5:8]).all(), "a gap between segments was written"


@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.bfloat16, 24), (torch.float16, 64)], ids=str)
def test_reshape_and_cache_and_copy_blocks(emulator, tmp_path, dtype, d):
    # copy_blocks moves 16-byte words when a block's size allows, 2-byte words otherwise.
    blocks, bs, heads_k, tokens = 6, 4, 2, 9
    key, value = (torch.randn(tokens, heads_k, d).to(dtype) for _ in range(2))
    kc, vc = (torch.randn(blocks, bs, heads_k, d).to(dtype) for _ in range(2))
    # -1: padding, skipped. 24 (just past the cache) and 10**6: only possible
    # unchecked, under CUDA graph capture; the kernel skips them too.
    slots = torch.tensor([5, -1, 0, 23, 9, -1, 12, 24, 10**6], dtype=torch.int64)
    mapping = torch.tensor([[1, 4], [5, 2]], dtype=torch.int64)
    cfg = {"op_cache": 1, "dtype": DTYPE_CODE[dtype], "tokens": tokens, "heads_k": heads_k, "head_dim": d,
           "block_size": bs}
    out = run(emulator, tmp_path, cfg, dict(key=key, value=value, key_cache=kc, value_cache=vc, slots=slots,
                                            mapping=mapping))
    def inner(name):  # the cache between its two NaN guard blocks, which must stay NaN
        written = out[name].view(blocks + 2, bs, heads_k, d)
        assert torch.isnan(written[0]).all() and torch.isnan(written[-1]).all(), f"{name}: written outside the cache"
        return written[1:-1]

    for name, new, cache in (("key", key, kc), ("value", value, vc)):
        want = cache.clone().view(blocks * bs, heads_k, d)
        for t, slot in enumerate(slots.tolist()):
            if 0 <= slot < blocks * bs:
                want[slot] = new[t]
        want = want.view(blocks, bs, heads_k, d)
        assert torch.equal(inner(f"{name}_cache_written"), want.float()), name
        want[4], want[2] = want[1].clone(), want[5].clone()
        assert torch.equal(inner(f"{name}_cache_copied"), want.float()), f"{name} after copy_blocks"


@pytest.mark.parametrize("m,n,k,dtype,bias,sms", [
    (1, 37, 203, torch.bfloat16, True, 132),   # 7 k steps: one block's k loop
    (70, 130, 256, torch.float32, False, 132),  # 2 k splits
    (9, 16, 3, torch.float16, True, 132),
    (5, 40, 1030, torch.bfloat16, True, 132),   # 33 k steps in 7 splits (the last of 3) ...
    (5, 40, 1030, torch.bfloat16, True, 1),     # ... or in 4 (planned for 1 SM)
], ids=str)
def test_w8a8(emulator, tmp_path, m, n, k, dtype, bias, sms):
    qw = torchkiln.quantize(torch.randn(n, k), "w8a8")
    x = (3 * torch.randn(m, k)).to(dtype)
    x[0, :] = 0  # an all-zero row: scale 0
    b = torch.randn(n).to(dtype)
    cfg = {"op_w8a8": 1, "dtype": DTYPE_CODE[dtype], "m": m, "n": n, "k": k, "bias": int(bias)}
    out = run(emulator, tmp_path, cfg, dict(x=x, qweight=qw.qweight.view(torch.uint8), scales=qw.scales, bias=b),
              sms=sms)
    assert (out["num_splits"].item() > 1) == (k > 256 or m == 70)
    # Same int8 codes, exact int32 sums (in any split) and the same epilogue as the CPU kernel.
    cpu = torchkiln.quant_matmul(x, qw, b if bias else None)
    assert torch.equal(out["out"].view(m, n), cpu.float())
