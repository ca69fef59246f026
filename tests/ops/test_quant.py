"""Quantised matmul: quantise / dequantise against independent references,
the kernels against fp64 matmuls on every CPU ISA, gradients, opcheck, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch

import torchkiln
from quant_reference import dequant_int4, dequant_int8, dequant_nf4
from conftest import isa_supported
from reference import poison_allocator
from torchkiln._ext import _C
from torchkiln.ops.quant import quantize_rows_ref

ops = torch.ops.torchkiln

# (scheme, group_size, symmetric)
SCHEMES = [
    ("int8", None, True),
    ("int4", 128, False),
    ("int4", 64, True),
    ("int4", 32, False),
    ("nf4", 64, True),
    ("nf4", 128, True),
    ("w8a8", None, True),
]
SCHEME_IDS = [f"{s}-g{g}-{'sym' if sym else 'asym'}" for s, g, sym in SCHEMES]
TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _in_features(scheme: str, group: int | None) -> list[int]:
    # odd sizes the scheme allows: 4-bit needs a multiple of the group (g32:
    # 96 and 288 end on half a 64-column chunk, 704 on a whole one); 22
    # groups are more than one 16-group vector of the int4 zero-point sums;
    # 2500 spans three of the 1024-column x groups of int8's VNNI loop, the
    # last one partial
    if scheme in ("int4", "nf4"):
        return [group * 3, 2 * 128 + (group if group % 64 else 0), group * 22]
    return [203, 256, 2500]


def _ref_matmul(x: torch.Tensor, qw, bias=None) -> torch.Tensor:
    w = torchkiln.dequantize(qw).double()
    xr = quantize_rows_ref(x).double() if qw.scheme == "w8a8" else x.double()
    out = xr @ w.T
    return out + bias.double() if bias is not None else out


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("scheme,group,sym", SCHEMES, ids=SCHEME_IDS)
def test_dequantize_matches_reference_bit_for_bit(cpu_isa, scheme, group, sym):
    k = 5 * (group or 64)  # group 32: a k of 32 mod 64 ends in half a chunk
    w = torch.randn(37, k) * torch.rand(37, 1) * 3
    w[3] = 0  # an all-zero row: scale 0 must give zeros, not nan
    qw = torchkiln.quantize(w, scheme, group_size=group, symmetric=sym)
    if scheme in ("int8", "w8a8"):
        ref = dequant_int8(w)
    elif scheme == "int4":
        ref = dequant_int4(w, group, sym)
    else:
        ref = dequant_nf4(w, group)
    dense = torchkiln.dequantize(qw)
    assert dense.dtype == torch.float32 and dense.shape == w.shape
    assert torch.equal(dense, ref)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(torchkiln.dequantize(qw, dtype), ref.to(dtype)), dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme,group,sym", SCHEMES, ids=SCHEME_IDS)
def test_quantize_in_row_blocks_matches_whole(scheme, group, sym, dtype, monkeypatch):
    """The PyTorch quantisers (CPU weights the C++ op does not take, such as
    fp64) and w8a8's panel packing work through blocks of rows; 37 x 4096 in
    blocks of 16 rows (one panel) must give what one block gives, bit for bit."""
    quantize_module = importlib.import_module("torchkiln.quant.quantize")
    w = torch.randn(37, 4096, dtype=dtype) * torch.rand(37, 1, dtype=dtype)
    w[20] = 0
    whole = torchkiln.quantize(w, scheme, group_size=group, symmetric=sym)
    monkeypatch.setattr(quantize_module, "_BLOCK_WEIGHTS", 16 * 4096)
    blocked = torchkiln.quantize(w, scheme, group_size=group, symmetric=sym)
    for name in ("qweight", "scales", "zeros", "weight_sums"):
        a, b = getattr(whole, name), getattr(blocked, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and torch.equal(a, b), name
    w[30, 7] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        torchkiln.quantize(w, scheme, group_size=group, symmetric=sym)


def _special_rows(w: torch.Tensor) -> torch.Tensor:
    w[3] = 0  # scale 0 divides as 1
    w[5, : w.shape[1] // 2] = 0
    w[6] = w[6].abs()  # no negative value: the int4 range still includes 0
    w[7] = -w[7].abs()
    w[8, 1] = -0.0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_op_matches_pytorch_quantisers(cpu_isa, dtype):
    """quant_quantize (C++, what quantize() runs for CPU weights) against the
    PyTorch functions that define each scheme: codes, scales and zeros equal
    bit for bit, on every ISA, including int8 tails (k = 203) and nf4 values
    exactly on a midpoint between two codes (ties go to the lower code)."""
    qmod = importlib.import_module("torchkiln.quant.quantize")
    layout = importlib.import_module("torchkiln.quant.layout")
    cases = [("int4", 32, False, 160), ("int4", 32, True, 160), ("int4", 128, False, 640), ("int4", 64, True, 640),
             ("nf4", 64, True, 640), ("nf4", 128, True, 256), ("int8", None, True, 203), ("int8", None, True, 1024)]
    for fmt, group, sym, k in cases:
        w = _special_rows((torch.randn(41, k) * torch.rand(41, 1) * 3).to(dtype))
        if fmt == "nf4":
            mids = torch.tensor(qmod._NF4_MIDPOINTS)
            w[9, :15], w[9, 15] = mids.to(dtype), 1.0  # absmax 1: normed values are the midpoints
            w[10, :15], w[10, 15] = -mids.to(dtype), 1.0
        gs = group or k
        q, scales, zeros = torch.ops.torchkiln.quant_quantize(w, fmt, gs, sym)
        wf = w.float()
        if fmt == "int4":
            rq, rs, rz = qmod.int4_codes(wf, gs, sym)
            assert torch.equal(zeros, rz), (fmt, group, sym, k)
        elif fmt == "nf4":
            rq, rs = qmod.nf4_codes(wf, gs)
            assert zeros.numel() == 0
        else:
            rq, rs = qmod.int8_codes(wf)
        if fmt != "int8":
            rq = layout.pack_nibbles(rq)
        assert torch.equal(q, rq) and torch.equal(scales, rs), (fmt, group, sym, k)


def test_quantize_op_bad_inputs():
    op = torch.ops.torchkiln.quant_quantize
    w = torch.randn(8, 128)
    with pytest.raises(ValueError, match="group_size"):
        op(w, "int4", 48, False)
    with pytest.raises(ValueError, match="group_size"):
        op(w, "int8", 64, True)
    with pytest.raises(ValueError, match="format"):
        op(w, "int3", 32, False)
    with pytest.raises(TypeError, match="weight"):
        op(w.to(torch.int32), "int4", 32, False)
    with pytest.raises(ValueError, match="weight"):
        op(torch.randn(128), "int4", 32, False)
    with pytest.raises(ValueError, match="weight"):
        op(torch.empty(0, 128), "int4", 32, False)
    with pytest.raises(ValueError, match="group_size"):
        op(w, "nf4", 0, False)
    for bad in (float("inf"), float("nan")):
        v = w.clone()
        v[5, 77] = bad
        for fmt, gs in (("int4", 32), ("nf4", 64), ("int8", 128)):
            with pytest.raises(ValueError, match="inf or nan"):
                op(v, fmt, gs, False)


def test_int4_g128_error_on_gaussian_weights():
    w = torch.randn(256, 4096)
    for sym in (False, True):
        qw = torchkiln.quantize(w, "int4", group_size=128, symmetric=sym)
        err = torchkiln.dequantize(qw) - w
        scale = qw.scales.repeat_interleave(128, dim=1)
        # round to nearest: half a step, one step where the zero point rounding
        # pushes the largest code out of range (asymmetric) or at the +side clip
        # (symmetric, range [-8s, 7s] with s = max|w| / 7)
        assert (err.abs() <= scale * (1 + 1e-6)).all()
        rel_rms = (err.norm() / w.norm()).item()
        assert rel_rms < (0.11 if not sym else 0.13), rel_rms
        # uniform rounding noise: rms error close to scale / sqrt(12)
        expected = (scale.pow(2).mean() / 12).sqrt().item()
        assert 0.8 * expected < err.pow(2).mean().sqrt().item() < 1.25 * expected


def test_nf4_double_quant():
    w = torch.randn(64, 512)
    plain = torchkiln.quantize(w, "nf4")
    dq = torchkiln.quantize(w, "nf4", double_quant=True)
    assert dq.double_quant and dq.absmax_q.dtype == torch.int8
    assert torch.equal(dq.qweight, plain.qweight)  # codes from the exact absmax
    assert (dq.scales - plain.scales).abs().max() <= dq.absmax_scales.max() / 2 * (1 + 1e-6)
    assert dq.nbytes() < plain.nbytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scheme,group,sym", SCHEMES, ids=SCHEME_IDS)
def test_quant_matmul_matches_fp64(cpu_isa, scheme, group, sym, dtype):
    bias_flag = scheme in ("int4", "w8a8")
    for k in _in_features(scheme, group):
        n = 37 if k < 300 else 113
        w = torch.randn(n, k)
        qw = torchkiln.quantize(w, scheme, group_size=group, symmetric=sym)
        bias = torch.randn(n).to(dtype) if bias_flag else None
        # On AVX512_BF16 bf16 x is decoded in registers up to 28 rows (4-bit)
        # and 40 (int8), more go through the bf16 GEMM (int4 g32 from 11 rows);
        # fp16 / fp32 x up to 12 (int4 g32), 16 (int4), 24 (nf4) and 64
        # (int8; fp16 256), more through the fp32 GEMM; on plain AVX-512 up
        # to 12, 28, 16 and 96 (GEMM_AFTER_ROWS).
        for m in (1, 3, 16, 17, 28, 29, 40, 41, 65, 256):
            if cpu_isa == "scalar" and m == 256 and k > 300:
                continue  # the scalar path covers the same code at m=33
            x = torch.randn(m, k).to(dtype)
            poison_allocator(torch.empty(m, n, dtype=dtype))
            out = torchkiln.quant_matmul(x, qw, bias)
            assert out.shape == (m, n) and out.dtype == dtype
            assert torch.isfinite(out).all()
            ref = _ref_matmul(x, qw, bias)
            err = _rel_err(out, ref)
            assert err <= TOL[dtype], f"k={k} m={m}: relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scheme,group", [("int4", 128), ("int4", 64), ("int4", 32), ("nf4", 64), ("nf4", 128), ("int8", None)])
def test_quant_matmul_activation_outliers(cpu_isa, scheme, group, dtype):
    # LLM activations carry a few channels hundreds of times larger than the
    # rest. On AVX2 (int4, nf4), AVX-512 without AVX512_BF16 (int4, 1-2
    # rows of x) and every AVX level (int8, from 5 rows of x; AVX2 from 3),
    # 16-bit x is multiplied as int16 per group only when no element
    # dwarfs its group; these groups must take the exact loops and
    # stay within the tolerance (and so must moderate outliers, which stay
    # on the int16 path).
    # The outlier channels' weights are zero (exactly, after quantisation),
    # so the outputs are the other channels' sums: the error of x's rounding
    # is not hidden behind the outliers' products.
    k, n = 1024, 96
    w = torch.randn(n, k)
    w[:, [7, 300]] = 0.0
    qw = torchkiln.quantize(w, scheme, group_size=group, symmetric=True)
    assert (torchkiln.dequantize(qw)[:, [7, 300]] == 0).all()
    for outlier in (20.0, 2000.0):
        x = torch.randn(5, k)
        x[:, 7] *= outlier
        x[:, 300] *= -outlier
        x = x.to(dtype)
        for m in (1, 2, 5):
            err = _rel_err(torchkiln.quant_matmul(x[:m], qw), _ref_matmul(x[:m], qw, None))
            assert err <= TOL[dtype], f"outlier {outlier} m={m}: relative error {err:.2e}"


@pytest.fixture(params=[True, False], ids=["gemm_fp32", "gemm_16bit"])
def gemm_choice(request):
    """Both precisions of the CPU dense path for 16-bit x, whichever this
    machine's measurement picks (csrc/common/cpu_gemm_choice.h)."""
    for dtype in ("bfloat16", "float16"):
        _C.override_cpu_gemm_choice(dtype, request.param)
    yield request.param
    for dtype in ("bfloat16", "float16"):
        _C.override_cpu_gemm_choice(dtype, None)


def test_cpu_gemm_precision_choice_is_measured_once():
    """ATen's fp32 GEMM against its 16-bit one (the dense route's precision):
    measured once, then the same answer until overridden."""
    query, override = _C.cpu_gemm_prefers_fp32, _C.override_cpu_gemm_choice
    for dtype in ("bfloat16", "float16"):
        override(dtype, None)
        first = query(dtype)
        assert isinstance(first, bool) and query(dtype) == first
        override(dtype, not first)
        assert query(dtype) == (not first)
        override(dtype, None)
    with pytest.raises(ValueError, match="dtype"):
        query("float32")


def test_cpu_quant_gemm_choice_is_measured_once():
    """The quantised GEMM against ATen's GEMM on a dense weight, at every ISA
    level this CPU runs: measured (once) at AVX512_BF16, and at plain AVX-512
    for fp16 / fp32 x (which share one fp32 GEMM); below that always False,
    whatever a test forced, as no quantised GEMM exists there."""
    query, override = _C.cpu_quant_gemm_wins, _C.override_cpu_quant_gemm_choice
    before = _C.cpu_info()["active_isa"]
    try:
        for isa in ("scalar", "avx2", "avx512", "avx512bf16"):
            if not isa_supported(isa):
                continue
            _C.set_cpu_isa(isa)
            for dtype in ("bfloat16", "float32"):
                measured = isa == "avx512bf16" or (isa == "avx512" and dtype == "float32")
                override(dtype, None)
                first = query(dtype)
                assert isinstance(first, bool) and query(dtype) == first
                if not measured:
                    assert first is False
                    override(dtype, True)
                    assert query(dtype) is False, f"{isa} {dtype}"
                else:
                    override(dtype, not first)
                    assert query(dtype) == (not first)
                    if dtype == "float32":
                        assert query("float16") == (not first)
                override(dtype, None)
        with pytest.raises(ValueError, match="dtype"):
            query("int8")
    finally:
        _C.set_cpu_isa(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quant_matmul_many_rows_in_thread_tiles(scheme, threads, gemm_choice):
    # Many rows of x and enough output features that each thread dequantises
    # and multiplies its own tiles of weight rows (up to 4 MiB of dense weight
    # each: 256 fp32 rows of 4096 here, so 600 rows make four tiles, the last
    # one short), with and without bias, fp32 and 16-bit x (the latter in
    # fp32 or in its own dtype, gemm_choice). 64 rows: past the 4-bit
    # register-decode limits (GEMM_AFTER_ROWS); int8 takes 257, past AVX2's
    # 256 for 16-bit x (the int16 panels). AVX-512 CPUs would take
    # weight_only_gemm instead; the test tells them it loses (as measured on
    # AMX CPUs).
    k, n, m = 4096, 600, 257 if scheme == "int8" else 64
    qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=None if scheme == "int8" else 128)
    bias = torch.randn(n)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    for dtype in ("bfloat16", "float16", "float32"):
        _C.override_cpu_quant_gemm_choice(dtype, False)
    try:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(m, k).to(dtype)
            for b in (None, bias.to(dtype)):
                poison_allocator(torch.empty(m, n, dtype=dtype))
                out = torchkiln.quant_matmul(x, qw, b)
                err = _rel_err(out, _ref_matmul(x, qw, b))
                assert err <= TOL[dtype], f"{dtype} bias={b is not None}: relative error {err:.2e}"
    finally:
        torch.set_num_threads(previous)
        for dtype in ("bfloat16", "float16", "float32"):
            _C.override_cpu_quant_gemm_choice(dtype, None)


# Rows of x up to which quant_matmul decodes the weight in registers before
# the GEMM takes over (dense_rows_threshold in csrc/quant/quant_ops.cpp), by
# ISA level and x's dtype: (int8, int4 groups of 64 or more, int4 g32, nf4).
GEMM_AFTER_ROWS = {
    ("avx512bf16", torch.bfloat16): (40, 28, 10, 28),
    ("avx512bf16", torch.float32): (64, 16, 12, 24),
    ("avx512bf16", torch.float16): (256, 16, 12, 24),
    ("avx512", torch.float32): (96, 28, 12, 16),
    ("avx512", torch.float16): (96, 28, 12, 16),
}


def _rows_above(limit: int) -> tuple[int, ...]:
    # the first rows past limit whose last 48-row block of x holds 1, 16, 17,
    # 32, 33, 47 and 48 rows (one, two and three vectors, full and not)
    return tuple(limit + 1 + (r - limit - 1) % 48 for r in (1, 16, 17, 32, 33, 47, 48))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("scheme,group", [("int4", 128), ("int4", 32), ("nf4", 64), ("int8", None)])
@pytest.mark.parametrize("isa,dtype", list(GEMM_AFTER_ROWS), ids=lambda v: str(v).removeprefix("torch."))
def test_quant_matmul_cpu_gemm(scheme, group, threads, isa, dtype):
    """The many-rows GEMM (weight_only_gemm.cpp; bf16 dot products for bf16
    x on AVX512_BF16, fp32 FMAs for fp16 / fp32 x on any AVX-512, forced
    here to each level): x in blocks of 48 rows and a last block
    of 16, 32 or 48 (rows past m are padding), 8 weight rows a register tile
    (n = 45: a last tile of 5), 32-column stripes split between threads (n =
    200), packed x past one 8 MiB chunk (m = 1100 at k = 4096: the weight is
    decoded once per chunk), sums over k = 4096 longer than one 256-word
    register run, x rows with a stride and an odd element offset, bias or
    none. Each result is within twice the error of PyTorch's matmul in x's
    dtype on the weight dequantised to that dtype, against an fp64
    reference on the weight the kernel multiplies (bf16-rounded for bf16 x,
    fp32 otherwise)."""
    if not isa_supported(isa):
        pytest.skip(f"this CPU cannot run the {isa} path")
    int8_rows, int4_rows, int4_g32_rows, nf4_rows = GEMM_AFTER_ROWS[(isa, dtype)]
    limit = {"int8": int8_rows, "nf4": nf4_rows}.get(scheme, int4_g32_rows if group == 32 else int4_rows)
    small_ms = _rows_above(limit)
    threads_m = max(small_ms)  # rows for the stripes split between threads
    kernel_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    previous, before = torch.get_num_threads(), _C.cpu_info()["active_isa"]
    torch.set_num_threads(threads)
    _C.set_cpu_isa(isa)
    name = str(dtype).removeprefix("torch.")
    _C.override_cpu_quant_gemm_choice(name, True)  # whatever this CPU measured
    try:
        for k, n, ms in ((256, 45, small_ms), (512, 200, (threads_m,)), (4096, 40, (1100,))):
            qw = torchkiln.quantize(torch.randn(n, k) * 0.05, scheme, group_size=group)
            w_kernel = torchkiln.dequantize(qw, kernel_dtype).double()
            w_torch = torchkiln.dequantize(qw, dtype)
            for m in ms:
                base = torch.randn(m * (k + 6) + 1).to(dtype)
                x = base[1:].view(m, k + 6)[:, 3 : k + 3]  # row stride k + 6, odd offset
                for bias in (None, torch.randn(n).to(dtype)):
                    poison_allocator(torch.empty(m, n, dtype=dtype))
                    out = torchkiln.quant_matmul(x, qw, bias)
                    assert out.dtype == dtype
                    ref = x.double() @ w_kernel.T + (bias.double() if bias is not None else 0)
                    torch_out = torch.nn.functional.linear(x, w_torch, bias)
                    err = (out.double() - ref).abs().max().item()
                    bound = 2 * (torch_out.double() - ref).abs().max().item() + 1e-5
                    assert err <= bound, f"k={k} n={n} m={m} bias={bias is not None}: {err:.2e} > {bound:.2e}"
    finally:
        torch.set_num_threads(previous)
        _C.set_cpu_isa(before)
        _C.override_cpu_quant_gemm_choice(name, None)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
def test_quant_matmul_shapes(scheme):
    # leading dims, a non-contiguous x, fewer output rows than one register tile,
    # and no rows at all
    k = 128
    qw = torchkiln.quantize(torch.randn(3, k), scheme, group_size=None if scheme in ("int8", "w8a8") else 64)
    x = torch.randn(2, 5, k)
    out = torchkiln.quant_matmul(x, qw)
    assert out.shape == (2, 5, 3)
    torch.testing.assert_close(out.double(), _ref_matmul(x.reshape(-1, k), qw).view(2, 5, 3), rtol=1e-4, atol=1e-4)
    # any layout of x, as F.linear takes: transposed, rows that do not
    # flatten into one stride, one row broadcast over several
    for xt in (torch.randn(k, 6).t(), torch.randn(3, 4, k).transpose(0, 1), torch.randn(1, k).expand(5, k)):
        torch.testing.assert_close(torchkiln.quant_matmul(xt, qw), torchkiln.quant_matmul(xt.contiguous(), qw))
    assert torchkiln.quant_matmul(torch.randn(0, k), qw).shape == (0, 3)


def test_w8a8_per_row_quantisation_is_exact():
    # integer accumulation: the only error is the fp32 epilogue
    k, n = 512, 40
    qw = torchkiln.quantize(torch.randn(n, k), "w8a8")
    x = torch.randn(7, k) * torch.logspace(-3, 3, 7)[:, None]
    x[2] = 0  # all-zero row: scale 0, output = bias
    bias = torch.randn(n)
    out = torchkiln.quant_matmul(x, qw, bias)
    ref = _ref_matmul(x, qw, bias)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(out[2], bias)


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [45, 46, 64 * torch.get_num_threads() + 3], ids=["n45", "n46", "n_per_thread_tiles"])
def test_gradients(scheme, dtype, n, gemm_choice):
    # The last n gives the dense path a tile per pool thread: the GEMMs there
    # run on threads that must carry the caller's autograd state (else addmm
    # with out= raises on a bias that requires grad). On AVX-512 the input
    # gradient takes the GEMM of weight_only_gemm.cpp (bf16: AVX512_BF16 and
    # an even n).
    k = 192
    qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=64 if scheme in ("int4", "nf4") else None)
    w = torchkiln.dequantize(qw)
    for m in (2, 40):  # register-tile path and dense path
        x = torch.randn(3, m, k).to(dtype).requires_grad_()
        b = torch.randn(n).to(dtype).requires_grad_()
        g = torch.randn(3, m, n).to(dtype)
        torchkiln.quant_matmul(x, qw, b).backward(g)
        x64 = x.detach().double().requires_grad_()
        b64 = b.detach().double().requires_grad_()
        (x64 @ w.double().T + b64).backward(g.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert _rel_err(x.grad, x64.grad) < tol
        assert _rel_err(b.grad, b64.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scheme,group", [("int4", 128), ("int4", 32), ("nf4", 64), ("int8", None)])
def test_grad_input_matches_fp64(cpu_isa, scheme, group, dtype):
    """quant_matmul_weight_only_grad_input, grad @ W: on AVX-512 the GEMM
    that dequantises 128 columns of W at a time (slabs of 32 columns, tiles
    of 8; bf16 grad needs AVX512_BF16 and an even out_features, its words
    pairing two rows of W), else the dequantised W and ATen. Odd in_features (int8), a
    last slab and tile short of columns, odd out_features (bf16: the dense
    path), grad with leading dims and a row stride; the GEMM's error within
    twice PyTorch's matmul in grad's dtype (fp32 for fp16, whose CPU matmul
    PyTorch runs in fp32 anyway) on the weight dequantised to that dtype."""
    op = ops.quant_matmul_weight_only_grad_input
    for k, n, ms in ((3 * (group or 67), 46, (1, 17, 49)), (2 * 128 + (group or 75), 200, (100,)), (group or 128, 45, (5,))):
        qw = torchkiln.quantize(torch.randn(n, k) * 0.05, scheme, group_size=group)
        w = torchkiln.dequantize(qw).double()
        for m in ms:
            g = torch.randn(2, m, n + 3).to(dtype)[..., 1 : n + 1]  # rows with a stride
            poison_allocator(torch.empty(2 * m, k, dtype=dtype))
            out = op(g, qw.qweight, qw.scales, qw.zeros, qw.scheme, qw.group_size, k)
            assert out.shape == (2, m, k) and out.dtype == dtype
            ref = g.double() @ w
            err = _rel_err(out, ref)
            assert err <= TOL[dtype], f"k={k} n={n} m={m}: relative error {err:.2e}"
            gemm = cpu_isa == "avx512bf16" if dtype == torch.bfloat16 else cpu_isa.startswith("avx512")
            if gemm and (dtype != torch.bfloat16 or n % 2 == 0):
                wd = torchkiln.dequantize(qw, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
                ref_d = g.double() @ wd.double()
                torch_out = g @ wd if dtype != torch.float16 else (g.float() @ wd).to(dtype)
                bound = 2 * (torch_out.double() - ref_d).abs().max().item() + 1e-5
                assert (out.double() - ref_d).abs().max().item() <= bound, f"k={k} n={n} m={m}"


def test_grad_input_has_a_gradient():
    # grad @ W is linear in grad: its own gradient (double backward of
    # quant_matmul) is gg @ W.T, the forward op
    k, n = 128, 40
    qw = torchkiln.quantize(torch.randn(n, k), "int4", group_size=64)
    g = torch.randn(3, n, requires_grad=True)
    v = torch.randn(3, k)
    (ops.quant_matmul_weight_only_grad_input(g, qw.qweight, qw.scales, qw.zeros, "int4", 64, k) * v).sum().backward()
    assert _rel_err(g.grad, v.double() @ torchkiln.dequantize(qw).double().T) <= TOL[torch.float32]


def test_opcheck():
    k, n = 128, 40
    x = torch.randn(5, k)
    for scheme in ("int8", "int4", "nf4"):
        qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=None if scheme == "int8" else 64)
        args = (qw.qweight, qw.scales, qw.zeros)
        torch.library.opcheck(ops.quant_matmul_weight_only, (x, *args, None, scheme, qw.group_size))
        torch.library.opcheck(
            ops.quant_matmul_weight_only, (x.clone().requires_grad_(), *args, torch.randn(n), scheme, qw.group_size)
        )
        torch.library.opcheck(ops.quant_dequantize, (*args, scheme, qw.group_size, k, torch.bfloat16))
        for g in (torch.randn(5, n), torch.randn(2, 3, n, dtype=torch.bfloat16, requires_grad=True)):
            torch.library.opcheck(ops.quant_matmul_weight_only_grad_input, (g, *args, scheme, qw.group_size, k))
        torch.library.opcheck(ops.quant_quantize, (torch.randn(n, k, dtype=torch.bfloat16), scheme, qw.group_size, False))
    qw = torchkiln.quantize(torch.randn(n, k), "w8a8")
    torch.library.opcheck(ops.quant_matmul_w8a8, (x, qw.qweight, qw.scales, qw.weight_sums, None))
    torch.library.opcheck(
        ops.quant_matmul_w8a8, (x.clone().requires_grad_(), qw.qweight, qw.scales, qw.weight_sums, torch.randn(n))
    )


def test_compile_fullgraph():
    torch._dynamo.reset()
    qws = {s: torchkiln.quantize(torch.randn(24, 64), s, group_size=None if s in ("int8", "w8a8") else 64)
           for s in ("int8", "int4", "nf4", "w8a8")}

    def f(x):
        return sum(torchkiln.quant_matmul(x, qw).sum(-1) for qw in qws.values())

    x = torch.randn(3, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x2)
    ref = f(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)


def test_bad_inputs():
    w = torch.randn(16, 128)
    qw = torchkiln.quantize(w, "int4", group_size=64)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., 128\)"):
        torchkiln.quant_matmul(torch.randn(2, 64), qw)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        torchkiln.quant_matmul(torch.randn(2, 128).double(), qw)
    with pytest.raises(ValueError, match=r"bias must be \(16\)"):
        torchkiln.quant_matmul(torch.randn(2, 128), qw, torch.randn(15))
    with pytest.raises(TypeError, match="bias must have the same dtype as x"):
        torchkiln.quant_matmul(torch.randn(2, 128), qw, torch.randn(16).bfloat16())
    with pytest.raises(ValueError, match=r"in_features \(100\) must be divisible by group_size \(64\)"):
        torchkiln.quantize(torch.randn(4, 100), "int4", group_size=64)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        torchkiln.quantize(torch.randn(4, 96), "int4", group_size=48)
    with pytest.raises(ValueError, match="scheme must be one of"):
        torchkiln.quantize(w, "int3")
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        torchkiln.quantize(torch.randn(4, 4, 4), "int8")
    with pytest.raises(ValueError, match="must not be empty"):
        torchkiln.quantize(torch.randn(0, 64), "int8")
    with pytest.raises(ValueError, match="inf or nan"):
        torchkiln.quantize(torch.tensor([[1.0, float("nan")]]), "int8")
    with pytest.raises(ValueError, match="double_quant applies to nf4 only"):
        torchkiln.quantize(w, "int4", double_quant=True)
    # the op checks what a hand-built or corrupted weight gets wrong
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="zeros are required for format int4"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales, None, None, "int4", 64)
    with pytest.raises(ValueError, match="qweight must have 64 columns"):
        ops.quant_matmul_weight_only(x, qw.qweight[:, :32].contiguous(), qw.scales, qw.zeros, None, "int4", 64)
    with pytest.raises(TypeError, match="qweight must be uint8"):
        ops.quant_matmul_weight_only(x, qw.qweight.to(torch.int8), qw.scales, qw.zeros, None, "int4", 64)
    with pytest.raises(ValueError, match=r"scales must be \(16, 2\)"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales[:, :1].contiguous(), qw.zeros, None, "int4", 64)
    with pytest.raises(TypeError, match="scales must be float32"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales.half(), qw.zeros, None, "int4", 64)
    with pytest.raises(TypeError, match="zeros must be uint8"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales, qw.zeros.float(), None, "int4", 64)
    with pytest.raises(ValueError, match=r"zeros must be \(16, 2\)"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales, qw.zeros[:, :1].contiguous(), None, "int4", 64)
    with pytest.raises(ValueError, match="format must be 'int8', 'int4' or 'nf4'"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales, qw.zeros, None, "int5", 64)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales, qw.zeros, None, "int4", 0)
    with pytest.raises(ValueError, match="zeros must be None for format nf4"):
        ops.quant_matmul_weight_only(x, qw.qweight, qw.scales, qw.zeros, None, "nf4", 64)
    grad_input = ops.quant_matmul_weight_only_grad_input
    with pytest.raises(ValueError, match=r"grad must be \(\.\.\., 16\)"):
        grad_input(torch.randn(2, 15), qw.qweight, qw.scales, qw.zeros, "int4", 64, 128)
    with pytest.raises(TypeError, match="grad must be float32, bfloat16 or float16"):
        grad_input(torch.randn(2, 16).double(), qw.qweight, qw.scales, qw.zeros, "int4", 64, 128)
    with pytest.raises(ValueError, match="grad must have at least one dimension"):
        grad_input(torch.tensor(1.0), qw.qweight, qw.scales, qw.zeros, "int4", 64, 128)
    for dtype in (torch.float32, torch.bfloat16):  # no rows: an empty result on either path
        empty = grad_input(torch.randn(0, 16).to(dtype), qw.qweight, qw.scales, qw.zeros, "int4", 64, 128)
        assert empty.shape == (0, 128) and empty.dtype == dtype
    with pytest.raises(ValueError, match="zeros are required for format int4"):
        grad_input(torch.randn(2, 16), qw.qweight, qw.scales, None, "int4", 64, 128)
    with pytest.raises(ValueError, match="qweight must have 96 columns for 192 in_features"):
        grad_input(torch.randn(2, 16), qw.qweight, qw.scales, qw.zeros, "int4", 64, 192)
    q8 = torchkiln.quantize(w, "int8")
    with pytest.raises(ValueError, match="group_size must be in_features"):
        ops.quant_matmul_weight_only(x, q8.qweight, q8.scales, None, None, "int8", 64)
    w8 = torchkiln.quantize(w, "w8a8")
    with pytest.raises(ValueError, match="qweight must be the panel layout"):
        ops.quant_matmul_w8a8(torch.randn(2, 64), w8.qweight, w8.scales, w8.weight_sums, None)
    with pytest.raises(ValueError, match=r"weight_sums must be a contiguous \(16\) vector"):
        ops.quant_matmul_w8a8(x, w8.qweight, w8.scales, w8.weight_sums[:8], None)
    with pytest.raises(ValueError, match=r"in_features must be in \[1, 65536\]"):
        ops.quant_matmul_w8a8(torch.randn(1, 70000), w8.qweight, w8.scales, w8.weight_sums, None)
    with pytest.raises(ValueError, match="w8a8 supports in_features up to 65536"):
        torchkiln.quantize(torch.randn(1, 65540), "w8a8")


@pytest.mark.parametrize("scheme,group,sym", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("device", [p for p in __import__("conftest").DEVICES if p.id == "cuda"])
def test_quant_matmul_cuda(device, scheme, group, sym, dtype):
    # int4 / nf4 with 16-bit x up to 16 rows: the tensor-core GEMV; int8 and
    # fp32 x up to 8 rows: the warp-per-row kernel; more rows: the tensor-core
    # GEMM (16-bit x) or dequantise + cuBLAS (fp32 x)
    k = 3 * (group or 64) + (0 if group else 5)
    n = 77
    qw = torchkiln.quantize(torch.randn(n, k), scheme, group_size=group, symmetric=sym)
    qw_gpu = qw.to(device)
    if scheme != "w8a8":
        assert torch.equal(torchkiln.dequantize(qw_gpu).cpu(), torchkiln.dequantize(qw))
    bias = torch.randn(n).to(dtype)
    for m in (1, 5, 8, 9, 16, 17, 64, 200):
        x = torch.randn(m, k).to(dtype)
        out = torchkiln.quant_matmul(x.to(device), qw_gpu, bias.to(device))
        assert out.device.type == "cuda" and out.dtype == dtype
        err = _rel_err(out.cpu(), _ref_matmul(x, qw, bias))
        assert err <= TOL[dtype], f"m={m}: relative error {err:.2e}"
    if scheme != "w8a8":  # the input gradient (dequantise + cuBLAS)
        g = torch.randn(3, n).to(dtype)
        grad = ops.quant_matmul_weight_only_grad_input(g.to(device), qw_gpu.qweight, qw_gpu.scales, qw_gpu.zeros,
                                                       scheme, qw.group_size, k)
        assert grad.device.type == "cuda" and grad.dtype == dtype
        assert _rel_err(grad.cpu(), g.double() @ torchkiln.dequantize(qw).double()) <= TOL[dtype]
    with pytest.raises(RuntimeError, match="must be on the same device as (x|qweight)"):
        torchkiln.quant_matmul(x.to(device), qw, bias.to(device))  # weight left on the CPU



@pytest.mark.parametrize("group", [32, 2048, 4096], ids=str)
@pytest.mark.parametrize("device", [p for p in __import__("conftest").DEVICES if p.id == "cuda"])
def test_int4_cuda_long_groups(device, group):
    # The int4 tensor-core GEMV stages whole groups of x in shared memory: a
    # group of 2048 fits for up to 8 rows, 4096 (one group a row) never does
    # and goes to the warp-per-row kernel or the GEMM. Every route must agree.
    k, n = 4096, 40
    qw = torchkiln.quantize(torch.randn(n, k), "int4", group_size=group)
    qw_gpu = qw.to(device)
    for m in (1, 8, 9, 16):
        x = torch.randn(m, k, dtype=torch.bfloat16) + 0.5  # a mean away from 0: the zero term matters
        out = torchkiln.quant_matmul(x.to(device), qw_gpu)
        err = _rel_err(out.cpu(), _ref_matmul(x, qw))
        assert err <= 2.5e-3, f"group={group} m={m}: relative error {err:.2e}"
