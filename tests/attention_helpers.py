"""Inputs and gradient checks shared by the attention and paged-cache tests
(CPU kernels, CUDA kernels and the emulated CUDA kernels)."""

from __future__ import annotations

import torch

import torchkiln
from reference import assert_within_rule
from torchkiln.ops.attention import attention_ref


def qkv(batch, sq, sk, heads, heads_k, d, dtype, device="cpu"):
    """Fresh q (batch, sq, heads, d) and k, v (batch, sk, heads_k, d)."""
    q = torch.randn(batch, sq, heads, d, device=device).to(dtype)
    k = torch.randn(batch, sk, heads_k, d, device=device).to(dtype)
    v = torch.randn(batch, sk, heads_k, d, device=device).to(dtype)
    return q, k, v


def grads(fn, conv, q, k, v, g, **kw):
    """(dq, dk, dv) of fn(conv(q), conv(k), conv(v)) for the output gradient conv(g)."""
    q, k, v = (conv(t).detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(conv(g))
    return q.grad, k.grad, v.grad


def check_grads(q, k, v, **kw):
    """torchkiln's gradients against fp64 under flash-attn's rule (3x plain PyTorch's error)."""
    g = torch.randn(q.shape, device=q.device).to(q.dtype)
    ours = grads(torchkiln.flash_attn_func, lambda t: t, q, k, v, g, **kw)
    ref = grads(attention_ref, lambda t: t.double(), q, k, v, g, **kw)
    low = grads(attention_ref, lambda t: t, q, k, v, g, **kw)
    for name, a, r, lo in zip(("dq", "dk", "dv"), ours, ref, low):
        assert a.dtype == q.dtype
        assert_within_rule(a, r, lo, factor=3.0, what=name)


def random_cache(seq_lens, block_size, kv_heads, d, dtype, spare=3, device="cpu"):
    """A paged cache whose blocks are handed to the sequences in shuffled
    order: (k_cache, v_cache, block_table int32, seq_lens int32). The table is
    a column slice of a wider one (rows padded with invalid ids, as a server
    keeps one table for its longest request), so its rows are strided."""
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(need) + spare
    k = torch.randn(num_blocks, block_size, kv_heads, d, device=device).to(dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, d, device=device).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    width = max(1, *need)  # a table has a column even when no sequence needs one
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for s, n in enumerate(need):
        for b in range(n):
            table[s, b] = perm.pop()
    wide = torch.full((len(seq_lens), width + 2), -7, dtype=torch.int32)
    wide[:, :width] = table
    return k, v, wide.to(device)[:, :width], torch.tensor(seq_lens, dtype=torch.int32, device=device)


def capture_cuda_graph(step):
    """Warms `step` up off the capturing stream (as torch.cuda.graph asks),
    then captures it: (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result
