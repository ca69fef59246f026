"""The CUDA attention and paged-decode kernels, run from their real source on
the host through tests/cuda_emulation/cuda_shim.h (fibers for threads, PTX
semantics for mma.sync / ldmatrix / shuffles), against the fp64 reference
under flash-attn's rule. This checks the kernels' indexing, fragment layouts,
masks, online softmax, split-KV combine and backward on machines without a
GPU; timing, occupancy and launch limits still need scripts/gpu_check.sh.

Needs g++ (C++20) and the CUDA headers (cuda_bf16.h); skips without them.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import assert_within_rule
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
    return next((c for c in candidates if (c / "cuda_bf16.h").exists()), None)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    include = _cuda_include()
    compiler = shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h) to build the kernel emulator")
    exe = tmp_path_factory.mktemp("emu") / "emulate_kernels"
    # -fno-strict-aliasing: CUDA code reinterprets vector registers freely
    # (nvcc's idiom); GCC's type-based alias analysis would miscompile that.
    cmd = [compiler, "-std=c++20", "-O2", "-fno-strict-aliasing", "-pthread", f"-I{ROOT / 'csrc'}", f"-I{HERE}", f"-I{include}",
           str(HERE / "emulate_kernels.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def run(emulator: Path, workdir: Path, config: dict, arrays: dict) -> dict:
    """Writes the case, runs the emulator, returns its float32 outputs by name."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config").write_text("\n".join(f"{k} {float(v)!r}" for k, v in config.items()))
    for name, t in arrays.items():
        t = t.contiguous()
        (t.float() if t.is_floating_point() else t.to(torch.int32)).numpy().tofile(workdir / f"{name}.bin")
    proc = subprocess.run([str(emulator), str(workdir)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        p.stem: torch.from_numpy(np.fromfile(p, dtype=np.float32))
        for p in workdir.glob("*.bin")
        if p.stem in ("out", "lse", "dq", "dk", "dv")
    }


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
    ],
    ids=["window", "softcap", "alibi", "scale"],
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


def shuffled_cache(lens, block_size, heads_k, d, dtype, spare=2):
    need = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(need) + spare
    k = torch.randn(num_blocks, block_size, heads_k, d).to(dtype)
    v = torch.randn(num_blocks, block_size, heads_k, d).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(lens), max(need), dtype=torch.int32)
    for s, n in enumerate(need):
        for b in range(n):
            table[s, b] = perm.pop()
    return k, v, table


def test_flash_chunked_prefill_through_block_table(emulator, tmp_path):
    shapes = [(0, 37), (50, 20), (129, 1)]  # (cached prefix, new tokens)
    lens = [p + n for p, n in shapes]
    new = [n for _, n in shapes]
    heads, heads_k, d, block = 4, 2, 64, 16
    k, v, table = shuffled_cache(lens, block, heads_k, d, torch.bfloat16)
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


DECODE = [  # (seq_lens, block_size, heads, heads_k, d, dtype, split_chunk, options)
    ([1, 17, 300], 16, 4, 2, 64, torch.bfloat16, 64, {}),  # 5 chunks for the long sequence
    ([40, 9], 1, 6, 1, 40, torch.float32, 512, {}),  # MQA, one chunk: the direct write
    ([77, 130], 32, 32, 2, 128, torch.float16, 64, {"softcap": 5.0}),  # 16 heads per kv head: two head groups
    ([200, 3], 16, 4, 2, 96, torch.bfloat16, 64, {"alibi": True, "window": 70}),  # window skips whole chunks
]


@pytest.mark.parametrize("lens,block,heads,heads_k,d,dtype,chunk,opts", DECODE, ids=str)
def test_paged_decode(emulator, tmp_path, lens, block, heads, heads_k, d, dtype, chunk, opts):
    k, v, table = shuffled_cache(lens, block, heads_k, d, dtype)
    q = (2 * torch.randn(len(lens), heads, d)).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    alibi = torch.rand(heads) if opts.get("alibi") else None
    window = opts.get("window", -1)
    cfg = dict(paged_decode=1, dtype=DTYPE_CODE[dtype], num_seqs=len(lens), heads=heads, heads_k=heads_k,
               head_dim=d, block_size=block, scale=1 / math.sqrt(d), softcap=opts.get("softcap", 0.0),
               window_left=window, alibi=int(alibi is not None), split_chunk=chunk)
    arrays = dict(q=q, k=k, v=v, block_table=table, seq_lens=seq_lens)
    if alibi is not None:
        arrays["alibi"] = alibi
    res = run(emulator, tmp_path, cfg, arrays)
    kw = dict(softcap=opts.get("softcap", 0.0), alibi_slopes=alibi, window_size=(window, -1))
    ref, ref_lse = paged_attention_ref(q.double(), k, v, table, seq_lens, **kw)
    low, _ = paged_attention_ref(q, k, v, table, seq_lens, **kw)
    assert_within_rule(res["out"].view(q.shape), ref, low)
    torch.testing.assert_close(res["lse"].view(len(lens), heads).double(), ref_lse, rtol=1e-4, atol=1e-3)
