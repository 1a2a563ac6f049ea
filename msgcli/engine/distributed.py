"""Process-group setup for ``torchrun``: gloo on CPU, NCCL on CUDA; a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from msgcli.errors import PeerFailed, UserError

Result = TypeVar("Result")


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it

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
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistContext(rank, world, device, owns_group)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum in place over processes (a no-op for one process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(obj: Any, ctx: DistContext) -> list[Any] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not ctx.enabled:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered if ctx.is_main else None


def stop_everywhere(ctx: DistContext, error: UserError) -> UserError:
    """The error to raise when every rank stops together: ``error`` on rank 0, which prints it, and on
    the other ranks a :class:`PeerFailed` with its exit code, so that one line is printed."""
    return error if ctx.is_main else PeerFailed(str(error), error.exit_code)


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
        message, code = outcome[0]
        raise PeerFailed(f"rank 0 stopped: {message}", code)
    return fn() if others else None


def teardown(ctx: DistContext) -> None:
    """Destroy the process group that :func:`setup` created (one it found is left to its owner)."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
