"""Process groups under ``torchrun`` or ``srun``: gloo on CPU, NCCL on CUDA; a no-op for one process.

Who this process is in its job comes from the launcher's environment (:func:`msgcli.engine.launch.detect_launch`).

No collective ever waits on slow preparation (building a dataset, rendering a frame cache, listing a
network filesystem): while rank 0 prepares, the other ranks poll a key of the group's store, without a
time limit (:func:`on_main`, :func:`main_first`). ``train.dist_timeout`` therefore bounds only the
collectives of training, where every rank does the same work.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from msgcli.data.registry import worker_server
from msgcli.engine.launch import detect_launch
from msgcli.engine.stops import STOP_SIGNALS
from msgcli.errors import PeerFailed, UserError

Result = TypeVar("Result")

JOIN_SECONDS = 600.0  # at least this long for every process of a job to start and meet (nodes start apart)
DEPART_SECONDS = 30.0  # at most this long rank 0 keeps the store up for ranks still reading their last outcome
POLL_SECONDS = 0.2

@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # setup() created the process group, so teardown() destroys it
    store: Any = None  # the group's key-value store: where ranks wait for rank 0 outside any collective
    launcher: str = ""
    namespace: str = "msgsnn"  # this attempt's keys in the store (torchrun may restart a job on the same store)
    meetings: int = 0  # on_main / main_first calls so far: the same sequence on every rank names their keys

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str, timeout_s: float = 1800.0, workers: int = 0) -> DistContext:
    """Join the job's process group (torchrun or srun, see :func:`detect_launch`) and pick this rank's device.

    ``timeout_s`` (``train.dist_timeout``) bounds every collective; the processes get at least
    ``JOIN_SECONDS`` to start and meet. A rank whose loaders will have ``workers`` processes starts the fork
    server that forks them (:func:`msgcli.data.registry.worker_server`) at once, deaf to the stop signals.
    """
    launch = detect_launch()
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    # a task that sees only its own GPU (srun --gpus-per-task) uses device 0; one that sees the node's, its local rank's
    device = torch.device(f"cuda:{launch.local_rank % torch.cuda.device_count()}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    ctx = DistContext(launch.rank, launch.world_size, device, launcher=launch.launcher, namespace=f"msgsnn/{attempt}")
    if not ctx.enabled:
        return ctx
    if dist.is_initialized():  # the caller's group: use it, leave it to its owner
        ctx.store = dist.distributed_c10d._get_default_store()
        return _with_worker_server(ctx, workers)
    url = "env://" if launch.launcher == "torchrun" else f"tcp://{launch.address}:{launch.port}"
    join_s = max(timeout_s, JOIN_SECONDS)
    try:
        store, _, _ = next(dist.rendezvous(url, rank=launch.rank, world_size=launch.world_size,
                                           timeout=timedelta(seconds=join_s)))
        ctx.store = store
        _join(ctx, join_s)
    except (RuntimeError, ValueError) as err:  # DistStoreError, a refused or unresolvable address
        raise UserError(f"rank {launch.rank} of {launch.world_size} ({launch.launcher}) could not meet the others at "
                        f"{url}: {str(err).splitlines()[0]}; did every task start (srun -n {launch.world_size})?") from None
    store.set_timeout(timedelta(seconds=timeout_s))
    import_compiler_first()
    dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.PrefixStore("default_pg", store),
                            rank=launch.rank, world_size=launch.world_size, timeout=timedelta(seconds=timeout_s))
    ctx.owns_group = True
    return _with_worker_server(ctx, workers)


def _with_worker_server(ctx: DistContext, workers: int) -> DistContext:
    if workers:
        worker_server(deferred_signals=STOP_SIGNALS)
    return ctx


def import_compiler_first() -> None:
    """Import torch's compiler (``torch._dynamo``) before a process group exists; call it before
    ``init_process_group``.

    Imported later (the first call of one of msgsnn's torch operators imports it), it keeps references to
    the default group that ``destroy_process_group`` does not drop, so gloo's worker threads outlive the
    group; one still releasing its last collective's tensors while the interpreter shuts down aborts the
    process ("terminate called without an active exception", torch 2.14.1: about one two-rank run in ten
    with the C kernels), a failed exit after the run's results are written.
    """
    import torch._dynamo  # noqa: F401


def _join(ctx: DistContext, seconds: float) -> None:
    """Wait until every process has reached the store, so that the group's timed set-up starts together."""
    key, deadline = f"{ctx.namespace}/joined", time.monotonic() + seconds
    ctx.store.add(key, 1)
    while (joined := ctx.store.add(key, 0)) < ctx.world_size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{joined} of {ctx.world_size} processes arrived within {seconds:.0f} s")
        time.sleep(POLL_SECONDS)


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


def error_for_rank(ctx: DistContext, error: UserError) -> UserError:
    """The error this rank raises when every rank stops together: ``error`` on rank 0, which prints it, and
    on the other ranks a :class:`PeerFailed` with its exit code, so that one line is printed."""
    return error if ctx.is_main else PeerFailed(str(error), error.exit_code)


def _outcome(fn: Callable[[], Result]) -> tuple[tuple, BaseException | None]:
    """``("ok", value)`` or ``("failed", message, exit code)`` for the store, and the exception to re-raise."""
    try:
        return ("ok", fn()), None
    except BaseException as err:
        return ("failed", f"{type(err).__name__}: {err}", getattr(err, "exit_code", 1)), err


def _post(ctx: DistContext, key: str, outcome: tuple) -> None:
    ctx.store.set(key, pickle.dumps(outcome))


def _await(ctx: DistContext, key: str, waiting_for: str) -> tuple:
    """The outcome posted under ``key``, polled without a time limit (no collective, no watchdog)."""
    try:
        while not ctx.store.check([key]):
            time.sleep(POLL_SECONDS)
        return pickle.loads(ctx.store.get(key))
    except RuntimeError as err:  # the store went away with the rank that hosted it
        raise UserError(f"rank {ctx.rank} lost the job's store while it waited for {waiting_for}: "
                        f"{str(err).splitlines()[0]}") from None


def _raise_failed(outcome: tuple, who: str) -> None:
    if outcome[0] == "failed":
        raise PeerFailed(f"{who} stopped: {outcome[1]}", outcome[2])


def on_main(ctx: DistContext, fn: Callable[[], Result]) -> Result:
    """Run ``fn`` on rank 0 alone; every rank returns its (picklable) result, or raises when it failed.

    The other ranks wait outside any collective; if rank 0 fails, it raises as usual and every other rank
    raises :class:`PeerFailed` with the same exit code, so one line is printed.
    """
    if not ctx.enabled:
        return fn()
    ctx.meetings += 1
    key = f"{ctx.namespace}/{ctx.meetings}/0"
    if ctx.is_main:
        outcome, error = _outcome(fn)
        _post(ctx, key, outcome)
        if error is not None:
            raise error
        return outcome[1]
    outcome = _await(ctx, key, "rank 0")
    _raise_failed(outcome, "rank 0")
    return outcome[1]


def main_first(ctx: DistContext, fn: Callable[[], Result]) -> Result:
    """Run ``fn`` on rank 0, then on the other ranks (so that rank 0 alone fills a cache that they then read);
    returns when every rank has finished it. A rank that fails raises its error, the others :class:`PeerFailed`."""
    if not ctx.enabled:
        return fn()
    ctx.meetings += 1
    prefix = f"{ctx.namespace}/{ctx.meetings}"
    if ctx.is_main:
        outcome, error = _outcome(fn)
    else:
        first = _await(ctx, f"{prefix}/0", "rank 0")
        _raise_failed(first, "rank 0")
        outcome, error = _outcome(fn)
    _post(ctx, f"{prefix}/{ctx.rank}", outcome)
    if error is not None:
        raise error
    for rank in range(ctx.world_size):
        if rank != ctx.rank:
            _raise_failed(_await(ctx, f"{prefix}/{rank}", f"rank {rank}"), f"rank {rank}")
    return outcome[1]


def teardown(ctx: DistContext) -> None:
    """Destroy the process group that :func:`setup` created (one it found is left to its owner).

    Under ``srun`` rank 0 hosts the store: it waits (at most ``DEPART_SECONDS``) until the other ranks
    have left, so that none loses the store while it still reads rank 0's last outcome (for example
    "finished already", which rank 0 posts and then returns from at once).
    """
    if not ctx.owns_group:
        return
    _depart(ctx)
    if dist.is_initialized():
        dist.destroy_process_group()


def _depart(ctx: DistContext) -> None:
    key = f"{ctx.namespace}/departed"
    try:
        if not ctx.is_main:
            ctx.store.add(key, 1)
            return
        deadline = time.monotonic() + DEPART_SECONDS
        while ctx.store.add(key, 0) < ctx.world_size - 1 and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    except RuntimeError:  # the store is gone already (its host stopped): nothing left to wait for
        pass
