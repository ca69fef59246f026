"""Tensor-parallel linear layers (Megatron-style) on torch.distributed.

ColumnParallelLinear splits the output features over ranks (each rank holds
``out / world`` rows of W); RowParallelLinear splits the input features and
all-reduces the partial products. A Column -> Row pair (an MLP) needs one
all-reduce in forward and one in backward. RowParallelLinear can split its
rows of x into ``overlap_chunks`` pieces so chunk i's all-reduce runs while
chunk i+1 is multiplied.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _sharded_group(layer: str, what: str, features: int, pg) -> tuple:
    """(group, world, rank) after checking that ``features`` splits evenly."""
    group = pg if pg is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if features % world:
        raise ValueError(f"{layer}: {what} ({features}) must be divisible by the group size ({world})")
    return group, world, rank


class _CopyToParallel(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient in backward (x is
    replicated, each rank's gradient covers only its shard of the output)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(world, dim=-1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        parts = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=-1), None


class _RowParallelMatmul(torch.autograd.Function):
    """sum over ranks of x_local @ W_local^T, chunked over rows so each chunk's
    all-reduce overlaps the next chunk's matmul. Backward needs no
    communication: the output gradient is already replicated."""

    @staticmethod
    def forward(ctx, x, weight, group, chunks):
        ctx.save_for_backward(x, weight)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        step = max(1, math.ceil(rows.shape[0] / chunks))
        works = []
        for r0 in range(0, rows.shape[0], step):
            piece = out[r0 : r0 + step]
            torch.mm(rows[r0 : r0 + step], weight.t(), out=piece)
            works.append(dist.all_reduce(piece, group=group, async_op=True))
        for w in works:
            w.wait()
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None


def _shard_init(out_features: int, in_features: int, full: Tensor | None, dim: int, rank: int, world: int,
                **factory) -> Tensor:
    if full is not None:
        return full.detach().chunk(world, dim=dim)[rank].clone().contiguous()
    shape = [out_features, in_features]
    shape[dim] //= world
    w = torch.empty(*shape, **factory)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return w


class ColumnParallelLinear(nn.Module):
    """y = x @ W^T + b with W's rows (output features) split over ranks.
    Returns this rank's slice of y (``(..., out / world)``), or all of it with
    ``gather_output``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 process_group=None, device=None, dtype=None, _full_weight: Tensor | None = None,
                 _full_bias: Tensor | None = None):
        super().__init__()
        self.group, world, rank = _sharded_group("ColumnParallelLinear", "out_features", out_features, process_group)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(_shard_init(out_features, in_features, _full_weight, 0, rank, world, **factory))
        if bias:
            b = _full_bias.detach().chunk(world)[rank].clone() if _full_bias is not None else torch.zeros(
                out_features // world, **factory)
            self.bias = nn.Parameter(b)
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, gather_output: bool = False, process_group=None):
        return cls(linear.in_features, linear.out_features, linear.bias is not None, gather_output, process_group,
                   _full_weight=linear.weight, _full_bias=linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = _CopyToParallel.apply(x, self.group)
        y = nn.functional.linear(x, self.weight, self.bias)
        return _GatherLastDim.apply(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x @ W^T + b with W's columns (input features) split over ranks.
    x is this rank's slice (``input_is_parallel``, as produced by a
    ColumnParallelLinear) or the full input, which is then split. The partial
    products are all-reduced in ``overlap_chunks`` row chunks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 overlap_chunks: int = 1, process_group=None, device=None, dtype=None,
                 _full_weight: Tensor | None = None, _full_bias: Tensor | None = None):
        super().__init__()
        self.group, world, rank = _sharded_group("RowParallelLinear", "in_features", in_features, process_group)
        if overlap_chunks < 1:
            raise ValueError(f"RowParallelLinear: overlap_chunks must be >= 1, got {overlap_chunks}")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.overlap_chunks = input_is_parallel, overlap_chunks
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(_shard_init(out_features, in_features, _full_weight, 1, rank, world, **factory))
        if bias:
            b = _full_bias.detach().clone() if _full_bias is not None else torch.zeros(out_features, **factory)
            self.bias = nn.Parameter(b)  # replicated, added once after the reduction
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_is_parallel: bool = True, overlap_chunks: int = 1,
                    process_group=None):
        return cls(linear.in_features, linear.out_features, linear.bias is not None, input_is_parallel,
                   overlap_chunks, process_group, _full_weight=linear.weight, _full_bias=linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = _ScatterLastDim.apply(x, self.group)
        y = _RowParallelMatmul.apply(x, self.weight, self.group, self.overlap_chunks)
        return y + self.bias if self.bias is not None else y
