"""Process-group setup for ``torchrun``: gloo on CPU, NCCL on CUDA; a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

Result = TypeVar("Result")


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        from msgsnn.engine.errors import UserError

        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistContext(rank, world, device)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum in place over processes (a no-op for one process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def main_first(ctx: DistContext, fn: Callable[[], Result], *, others: bool = True) -> Result | None:
    """Run ``fn`` on rank 0, then (``others``) on the other ranks, e.g. so rank 0 alone fills a cache.

    If rank 0 fails, it raises as usual and every other rank raises :class:`PeerFailed`
    with the same exit code instead of waiting at a barrier for a peer that is gone.
    """
    if not ctx.enabled:
        return fn()
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as err:
            dist.broadcast_object_list([(f"{type(err).__name__}: {err}", getattr(err, "exit_code", 1))], src=0)
            raise
        dist.broadcast_object_list([None], src=0)
        return result
    outcome = [None]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        from msgsnn.engine.errors import PeerFailed

        message, code = outcome[0]
        raise PeerFailed(f"rank 0 stopped: {message}", code)
    return fn() if others else None


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
