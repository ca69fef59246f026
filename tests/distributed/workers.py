"""Rank functions for the distributed tests (importable by spawned ranks).
Each returns plain data the test asserts on."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from torchkiln.distributed import ColumnParallelLinear, OverlappedDataParallel, RowParallelLinear


def make_mlp(seed: int = 0, width: int = 24, depth: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i in range(depth):
        layers += [nn.Linear(width if i else 10, width), nn.Tanh()]
    layers.append(nn.Linear(width, 3))
    return nn.Sequential(*layers)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _batch(step: int, n: int = 12):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 10, generator=g), torch.randn(n, 3, generator=g)


def grads_match(rank, world, bucket_cap_mb, first_bucket_mb, views, steps=3):
    """ODP, DDP and a single process on the full batch, trained side by side
    with SGD: returns the worst relative gradient errors (ODP vs single,
    ODP vs DDP) and the bucket count."""
    single = make_mlp()
    odp = OverlappedDataParallel(copy.deepcopy(single), bucket_cap_mb=bucket_cap_mb,
                                 first_bucket_mb=first_bucket_mb, gradient_as_bucket_view=views)
    ddp = DDP(copy.deepcopy(single), bucket_cap_mb=bucket_cap_mb)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (single, odp, ddp)]
    worst_single = worst_ddp = 0.0
    for step in range(steps):
        x, y = _batch(step, 4 * world)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        for o in opts:
            o.zero_grad()
        nn.functional.mse_loss(single(x), y).backward()
        nn.functional.mse_loss(odp(xs), ys).backward()
        nn.functional.mse_loss(ddp(xs), ys).backward()
        for ps, po, pd in zip(single.parameters(), odp.module.parameters(), ddp.module.parameters()):
            worst_single = max(worst_single, _rel(po.grad, ps.grad))
            worst_ddp = max(worst_ddp, _rel(po.grad, pd.grad))
        for o in opts:
            o.step()
    return worst_single, worst_ddp, odp.num_buckets


def no_sync_accumulation(rank, world, views):
    single = make_mlp()
    odp = OverlappedDataParallel(copy.deepcopy(single), bucket_cap_mb=0.001, gradient_as_bucket_view=views)
    worst = 0.0
    for step in range(2):
        single.zero_grad(set_to_none=True)
        odp.zero_grad(set_to_none=True)
        micro = [_batch(10 * step + i, 2 * world) for i in range(3)]
        for i, (x, y) in enumerate(micro):
            nn.functional.mse_loss(single(x), y).backward()
            xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
            if i < 2:
                with odp.no_sync():
                    nn.functional.mse_loss(odp(xs), ys).backward()
            else:
                nn.functional.mse_loss(odp(xs), ys).backward()
        for ps, po in zip(single.parameters(), odp.module.parameters()):
            worst = max(worst, _rel(po.grad, ps.grad))
    return worst


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(10, 8)
        self.b = nn.Linear(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, use_b: bool):
        return self.head(torch.tanh(self.b(x) if use_b else self.a(x)))


def unused_parameters(rank, world, find_unused):
    """Rank 0 uses branch a, others branch b: with find_unused_parameters the
    gradients equal the average of the per-rank gradients; without, every rank
    raises a clear error."""
    model = Branchy()
    odp = OverlappedDataParallel(copy.deepcopy(model), bucket_cap_mb=0.001, find_unused_parameters=find_unused)
    x, y = _batch(0, 2 * world)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    try:
        nn.functional.mse_loss(odp(xs, use_b=rank > 0), ys).backward()
    except RuntimeError as e:
        return {"error": str(e)}
    # expected: average over ranks of each rank's local gradient (zeros for unused)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for r in range(world):
        m = copy.deepcopy(model)
        nn.functional.mse_loss(m(x.chunk(world)[r], use_b=r > 0), y.chunk(world)[r]).backward()
        for n, p in m.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad / world
    return {"worst": max(_rel(p.grad, expected[n]) for n, p in odp.module.named_parameters())}


def checkpointed(rank, world):
    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_mlp()

        def forward(self, x):
            return checkpoint(self.body, x, use_reentrant=False)

    single = Ckpt()
    odp = OverlappedDataParallel(copy.deepcopy(single), bucket_cap_mb=0.001)
    x, y = _batch(3, 2 * world)
    nn.functional.mse_loss(single(x), y).backward()
    nn.functional.mse_loss(odp(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
    return max(_rel(po.grad, ps.grad) for ps, po in zip(single.parameters(), odp.module.parameters()))


def compressed_training(rank, world, comm_dtype, steps=50):
    """Linear regression trained with ODP; returns the loss curve of the full batch."""
    torch.manual_seed(0)
    w_true = torch.randn(3, 32)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 3))
    odp = OverlappedDataParallel(model, bucket_cap_mb=0.01, comm_dtype=comm_dtype)
    opt = torch.optim.SGD(odp.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16 * world, 32, generator=g)
        y = x @ w_true.T
        loss = nn.functional.mse_loss(odp(x.chunk(world)[rank]), y.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(nn.functional.mse_loss(model(x), y).item())
    return losses


def rank_raises(rank, world):
    """Rank 1 raises in the middle of backward; rank 0 must get an error from
    the process group instead of hanging."""
    odp = OverlappedDataParallel(make_mlp(depth=4), bucket_cap_mb=0.001)
    x, y = _batch(0, 4)

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("injected failure on rank 1")

    out = odp(x)
    if rank == 1:
        out = Boom.apply(out)
    nn.functional.mse_loss(out, y).backward()
    return "finished"


def tensor_parallel_mlp(rank, world, chunks, input_is_parallel):
    torch.manual_seed(0)
    up, down = nn.Linear(16, 8 * world), nn.Linear(8 * world, 16)
    x = torch.randn(2, 5, 16)
    x_ref = x.clone().requires_grad_()
    ref = down(torch.relu(up(x_ref)))
    g = torch.randn_like(ref)
    ref.backward(g)

    col = ColumnParallelLinear.from_linear(up, gather_output=not input_is_parallel)
    row = RowParallelLinear.from_linear(down, input_is_parallel=input_is_parallel, overlap_chunks=chunks)
    xt = x.clone().requires_grad_()
    out = row(torch.relu(col(xt)))
    out.backward(g)
    # gather the sharded weight gradients to compare with the unsharded ones
    col_w = [torch.empty_like(col.weight.grad) for _ in range(world)]
    dist.all_gather(col_w, col.weight.grad)
    row_w = [torch.empty_like(row.weight.grad) for _ in range(world)]
    dist.all_gather(row_w, row.weight.grad.contiguous())
    return {
        "out": _rel(out.detach(), ref.detach()),
        "grad_x": _rel(xt.grad, x_ref.grad),
        "up_w": _rel(torch.cat(col_w, 0), up.weight.grad),
        "down_w": _rel(torch.cat(row_w, 1), down.weight.grad),
        "down_b": _rel(row.bias.grad, down.bias.grad),
    }


def tp_bad_sizes(rank, world):
    out = []
    for make in (lambda: ColumnParallelLinear(8, 7), lambda: RowParallelLinear(5, 8)):
        try:
            make()
            out.append("no error")
        except ValueError as e:
            out.append(str(e))
    return out
