"""A Llama-style block built from torchkiln ops under torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import torchkiln
from torchkiln.ops.rotary import rope_cos_sin


def block(x, residual, w_norm, w_gate_up, q_proj, cos, sin, positions):
    normed, residual = torchkiln.fused_add_rms_norm(x, residual, w_norm, 1e-6)
    q = (normed @ q_proj).view(*normed.shape[:-1], 4, 16)  # (B, S, H, D)
    q, _ = torchkiln.apply_rotary(q, None, cos, sin, positions)
    h = torchkiln.silu_and_mul(normed @ w_gate_up)
    return torchkiln.rms_norm(h + q.flatten(-2), w_norm), residual


def inputs(device, requires_grad):
    B, S, D = 2, 9, 64
    t = lambda *s: torch.randn(*s, device=device).requires_grad_(requires_grad)  # noqa: E731
    cos, sin = rope_cos_sin(16, 64, device=device)
    positions = torch.arange(S, device=device).expand(B, S).contiguous()
    return [t(B, S, D), t(B, S, D), t(D), t(D, 2 * D), t(D, D), cos, sin, positions]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_block_compiles_fullgraph(backend, requires_grad):
    torch._dynamo.reset()
    eager_in = inputs(backend, requires_grad)
    compiled_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in eager_in]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(requires_grad):
        out_e, res_e = block(*eager_in)
        out_c, res_c = compiled(*compiled_in)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(res_c, res_e)
    if requires_grad:
        (out_e.sum() + res_e.sum()).backward()
        (out_c.sum() + res_c.sum()).backward()
        for a, b in zip(eager_in[:5], compiled_in[:5]):
            torch.testing.assert_close(b.grad, a.grad)


def test_in_place_ops_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(x, residual, w, q, k, cos, sin, positions):
        out, residual = torchkiln.fused_add_rms_norm(x, residual, w)
        torchkiln.apply_rotary(q, k, cos, sin, positions, inplace=True)
        return out

    def make():
        g = torch.Generator(device=backend).manual_seed(1)
        r = lambda *s: torch.randn(*s, device=backend, generator=g)  # noqa: E731
        cos, sin = rope_cos_sin(32, 128, device=backend)
        return [r(5, 64), r(5, 64), r(64), r(5, 4, 32), r(5, 2, 32), cos, sin, torch.arange(5, device=backend)]

    eager_in, compiled_in = make(), make()
    with torch.no_grad():
        out_e = step(*eager_in)
        out_c = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_in)
    torch.testing.assert_close(out_c, out_e)
    for i in (1, 3, 4):  # residual, q, k were updated in place identically
        torch.testing.assert_close(compiled_in[i], eager_in[i])


def test_block_compiles_with_inductor():
    # The default backend: inductor generates code around the custom ops
    # (one ISA is enough here; the ops themselves are covered per ISA above).
    torch._dynamo.reset()
    eager_in = inputs("cpu", True)
    compiled_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in eager_in]
    out_e, res_e = block(*eager_in)
    out_c, res_c = torch.compile(block, fullgraph=True)(*compiled_in)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res_c, res_e, rtol=1e-5, atol=1e-5)
    (out_e.sum() + res_e.sum()).backward()
    (out_c.sum() + res_c.sum()).backward()
    for a, b in zip(eager_in[:5], compiled_in[:5]):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4)


def _graphs_with_ops(counter) -> int:
    # (dynamo may also hand the backend an empty graph of a helper frame)
    return sum(any(n.op == "call_function" for n in g.graph.nodes) for g in counter.graphs)


def _packed(lens, requires_grad):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    qkv = [torch.randn(sum(lens), 4, 32, requires_grad=requires_grad) for _ in range(3)]
    return (*qkv, cu, max(lens))


def test_varlen_compiles_once_for_every_batch():
    # A serving loop's packed batches change every step: total tokens, batch
    # size and max_seqlen (a SymInt in the schema, so it stays symbolic).
    # One graph must serve them all, forward and backward.
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def attend(q, k, v, cu, max_len):
        return torchkiln.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

    compiled = torch.compile(attend, fullgraph=True, dynamic=True, backend=counter)
    for lens in ([3, 5], [7, 2, 9], [2, 2, 2, 11], [13, 4, 4, 4, 6]):
        eager_in = _packed(lens, True)
        compiled_in = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in eager_in[:4]]
        out_e, out_c = attend(*eager_in), compiled(*compiled_in, eager_in[4])
        torch.testing.assert_close(out_c, out_e)
        out_e.sum().backward()
        out_c.sum().backward()
        for a, b in zip(eager_in[:3], compiled_in[:3]):
            torch.testing.assert_close(b.grad, a.grad)
    assert _graphs_with_ops(counter) == 1, f"recompiled: {_graphs_with_ops(counter)} graphs for 4 batches"


def test_decode_ops_compile_once_for_every_batch_size():
    # Decode batches of 3, 5, 7 sequences (1 specialises in dynamo, so it
    # is left out): one graph for quant_matmul and paged_attention.
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    qw = torchkiln.quantize(torch.randn(64, 128), "int4", group_size=64)
    k_cache, v_cache = torch.randn(20, 16, 2, 32), torch.randn(20, 16, 2, 32)

    def step(x, block_table, seq_lens):
        q = torchkiln.quant_matmul(x, qw).view(-1, 2, 32)
        return torchkiln.paged_attention(q, k_cache, v_cache, block_table, seq_lens)

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    for n in (3, 5, 7):
        args = (torch.randn(n, 128), torch.randint(0, 20, (n, 4), dtype=torch.int32),
                torch.randint(1, 64, (n,), dtype=torch.int32))
        torch.testing.assert_close(compiled(*args), step(*args))
    assert _graphs_with_ops(counter) == 1, f"recompiled: {_graphs_with_ops(counter)} graphs for 3 batch sizes"
