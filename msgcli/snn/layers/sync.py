"""BatchNorm statistics over the processes of ``torch.distributed`` (gloo or NCCL): the statistics are
those of the union of the ranks' batches, whatever each rank holds."""

from __future__ import annotations

import torch
import torch.distributed as dist


def synchronised() -> bool:
    """Several processes share the default ``torch.distributed`` group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_stats(mean: torch.Tensor, var: torch.Tensor, count: int):
    """Mean and biased variance ``[T, C]`` over the union of every rank's batch, and its total count.

    One all-reduce of ``count * mean``, ``count * (var + mean^2)`` and ``count`` in float64, from
    each rank's own (numerically stable) statistics.
    """
    m, v = mean.double(), var.double()
    packed = torch.cat([(m * count).flatten(), ((v + m * m) * count).flatten(), m.new_tensor([count])])
    dist.all_reduce(packed)
    total = packed[-1]
    global_mean = packed[: m.numel()].view_as(m) / total
    global_var = (packed[m.numel(): -1].view_as(m) / total - global_mean * global_mean).clamp_(min=0)
    return global_mean.to(mean.dtype), global_var.to(var.dtype), total.to(mean.dtype)


def all_reduce_sums(sdy: torch.Tensor, sdyx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's sums ``[T, C]`` over every rank's batch: one all-reduce of both."""
    sums = torch.stack([sdy, sdyx])
    dist.all_reduce(sums)
    return sums[0], sums[1]
