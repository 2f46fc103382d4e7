"""Variable-size collectives along dim 0 (ranks may hold different numbers of rows), with and without autograd.

``gather_rows`` is what the engine and the checkpoint export use; ``all_gather_dim0`` / ``reduce_scatter_dim0``
are the plain (no-grad) primitives the catalog-parallel loss builds its own autograd on. Gloo and NCCL both
want equal-size buffers, so unequal ranks are padded to the largest size (no copy when all sizes are equal).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_sizes", "all_gather_dim0", "reduce_scatter_dim0", "gather_rows"]

# torch 2.13 renamed the single-tensor collectives (the old names warn); torch 2.11 has only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_sizes(n: int, device, group) -> list[int]:
    """Every rank's row count, in rank order (one small all-gather)."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def all_gather_dim0(x: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenate every rank's ``x`` [sizes[rank], ...] along dim 0, in rank order (``x`` itself on one rank)."""
    if len(sizes) == 1:
        return x
    top = max(sizes)
    if x.shape[0] == top and all(s == top for s in sizes):
        out = x.new_empty((top * len(sizes), *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=group)
        return out
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def reduce_scatter_dim0(x: Tensor, sizes: list[int], group) -> Tensor:
    """``x`` [sum(sizes), ...] summed over ranks; rank r keeps rows [sum(sizes[:r]), sum(sizes[:r+1]))
    (``x`` itself on one rank)."""
    if len(sizes) == 1:
        return x
    rank, top = dist.get_rank(group), max(sizes)
    if all(s == top for s in sizes):
        out = x.new_empty((top, *x.shape[1:]))
        _reduce_scatter_single(out, x.contiguous(), group=group)
        return out
    padded = x.new_zeros((len(sizes), top, *x.shape[1:]))
    lo = 0
    for r, n in enumerate(sizes):
        padded[r, :n] = x[lo:lo + n]
        lo += n
    out = x.new_empty((top, *x.shape[1:]))
    _reduce_scatter_single(out, padded.reshape(len(sizes) * top, *x.shape[1:]), group=group)
    return out[:sizes[rank]]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 with a gradient. ``replicated=True``: the downstream loss is identical on every
    rank, so the incoming gradient is already complete on every rank and the rank keeps its own slice;
    ``replicated=False``: ranks computed different things from the gathered rows, their gradients are summed
    (reduce-scatter) into each rank's slice."""

    @staticmethod
    def forward(ctx, x, group, replicated):
        sizes = gather_sizes(x.shape[0], x.device, group)
        rank = dist.get_rank(group)
        ctx.lo, ctx.hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        ctx.sizes, ctx.group, ctx.replicated = sizes, group, replicated
        return all_gather_dim0(x.detach(), sizes, group)

    @staticmethod
    def backward(ctx, g):
        if not ctx.replicated:
            return reduce_scatter_dim0(g, ctx.sizes, ctx.group), None, None
        return g[ctx.lo:ctx.hi], None, None


def gather_rows(x: Tensor, group: dist.ProcessGroup | None = None, replicated: bool = True) -> Tensor:
    """Every rank's ``x`` [n_r, ...] concatenated in rank order; differentiable for float ``x`` (see
    ``_GatherRows`` for ``replicated``); integer tensors are gathered without autograd."""
    if x.is_floating_point() and x.requires_grad:
        return _GatherRows.apply(x, group, replicated)
    return all_gather_dim0(x, gather_sizes(x.shape[0], x.device, group), group)
