"""Datasets by name: what a builder returns, the errors it raises, and where data lives.

Every dataset module registers a builder with :func:`register`; the CLI and the
engine only ever call :func:`build_datasets` with a :class:`~msgcli.config.RunConfig`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import pickle
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from msgcli.config import RunConfig
from msgcli.errors import ConfigError, UserError, did_you_mean

from .split import class_balanced_weights, split_per_class


@dataclass
class DatasetInfo:
    """What the model and the logs need to know about a dataset.

    ``sensor_size`` is tonic's ``(W, H, P)`` for events, ``(W, H, C)`` for images
    (``None`` when images differ in size); ``input_shape`` is one sample without the
    batch: ``(T, 2, size, size)`` for events, ``(C, H, W)`` for images.
    """

    name: str
    kind: str
    classes: list[str]
    in_channels: int
    sensor_size: tuple[int, int, int] | None
    input_shape: tuple[int, ...]
    n_train: int | None  # None when that split was not built
    n_test: int | None
    skipped: int = 0
    n_val: int = 0
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_classes = len(self.classes)


@dataclass
class DataBundle:
    """Train and test sets of ``(frames, label)`` plus optional class-balancing weights and a validation set.

    Each set has ``targets``, the label of every sample ``[N]``; a split that was not asked for
    (:func:`build_datasets`' ``splits``) is ``None``. ``sample_weights`` is ``None`` or a float tensor
    ``[n_train]`` for a ``WeightedRandomSampler``; the engine builds the samplers and loaders. ``train_plain`` is
    the training set without augmentation (as the test set is transformed), from which :func:`build_datasets`
    holds out ``val`` when ``data.val_fraction`` > 0; a builder that gives none has its validation samples
    drawn from ``train`` as it is.
    """

    train: Dataset | None
    test: Dataset | None
    info: DatasetInfo
    sample_weights: torch.Tensor | None = None
    val: Dataset | None = None
    train_plain: Dataset | None = None


class LabelledSubset(Subset):
    """The samples of ``dataset`` at ``indices``, with their ``targets``."""

    def __init__(self, dataset: Dataset, indices: np.ndarray) -> None:
        super().__init__(dataset, indices.tolist())
        self.targets = np.asarray(dataset.targets)[indices]


SPLITS = ("train", "test")
Builder = Callable[[RunConfig, bool, tuple[str, ...]], DataBundle]
Check = Callable[[RunConfig], None]
_BUILDERS: dict[str, Builder] = {}
_CHECKS: dict[str, Check] = {}


def register(name: str, builder: Builder, check: Check | None = None) -> None:
    """Make ``builder(cfg, progress, splits) -> DataBundle`` available as dataset ``name``; it builds (and
    renders) only the ``splits`` named, leaving the others ``None``. A second dataset of the same name
    replaces the first, with a warning.

    ``check(cfg)``, for data read from disk, raises :class:`DatasetMissing` from file tests
    alone, so a sweep can stop before it starts a single run.
    """
    if name in _BUILDERS:
        warnings.warn(f"register_dataset: '{name}' was already registered; the new one replaces it", RuntimeWarning,
                      stacklevel=3)
    _BUILDERS[name] = builder
    _CHECKS.pop(name, None)
    if check is not None:
        _CHECKS[name] = check


def list_datasets() -> list[str]:
    return sorted(_BUILDERS)


def resolve_root(root: str) -> Path:
    """The dataset root: ``root`` if given, else ``$MSGSNN_DATA``, else ``~/datasets``."""
    chosen = root or os.environ.get("MSGSNN_DATA") or "~/datasets"
    return Path(chosen).expanduser()


MAX_WORKERS = 16  # past this, more loader processes add memory, not throughput, at the paper's batch sizes


def _count(name: str) -> int:
    """A positive count from the environment (``SLURM_NTASKS_PER_NODE`` may read ``4(x2)``), else 0."""
    value = os.environ.get(name, "").split("(")[0]
    return int(value) if value.isdigit() else 0


def available_cpus() -> int:
    """The CPUs one training process may use: its SLURM task's ``--cpus-per-task``, else its CPU affinity;
    shared by the ranks torchrun started there (``LOCAL_WORLD_SIZE``), or by the node's srun tasks when
    they are not bound to CPUs of their own (the affinity is the whole machine)."""
    per_task = _count("SLURM_CPUS_PER_TASK")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = per_task or affinity
    sharing = _count("LOCAL_WORLD_SIZE")
    if not sharing and not per_task and affinity == os.cpu_count():
        sharing = _count("SLURM_NTASKS_PER_NODE")
    return max(1, cpus // max(sharing, 1))


def resolve_workers(num_workers: int | None) -> int:
    """``data.num_workers``, or when it is null (the default) one loader process per CPU this process may
    use, less one for the training loop itself, at most ``MAX_WORKERS``."""
    if num_workers is not None:
        return num_workers
    return min(max(available_cpus() - 1, 0), MAX_WORKERS)


def worker_processes(workers: int) -> dict[str, Any]:
    """A DataLoader's ``num_workers`` and, in a rank of a process group, its ``multiprocessing_context``.

    A rank's workers start from a fork server rather than as forks of the rank: the group's communication
    threads take Python's runtime lock for an instant each time they release a tensor, and a process forked
    in that instant hangs before it runs a line (CPython 3.11.7 and older, python/cpython#112275; later
    versions warn that forking a process with threads may deadlock). The server has no such threads; it
    imports the data modules once, so each worker it forks starts at once.
    """
    if workers == 0 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {"num_workers": workers}
    return {"num_workers": workers, "multiprocessing_context": worker_server()}


def worker_server(deferred_signals: tuple[int, ...] = ()) -> multiprocessing.context.BaseContext:
    """The fork server of :func:`worker_processes`, started now unless it runs already.

    ``deferred_signals`` stay blocked in it and in the workers it forks. A stop signal reaches every process of
    a job step or process group; the server must outlive it, as the workers do, or they exit (their parent is
    gone) while the rank finishes its step and saves.
    """
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload([__package__])
    multiprocessing.resource_tracker.ensure_running()  # first: starting, it unblocks SIGINT and SIGTERM here
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, deferred_signals)
    try:
        multiprocessing.forkserver.ensure_running()  # the server inherits this thread's blocked signals
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    return server


def release_fork_server(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` part: a worker closes its copy of the fork server's liveness pipe.

    The server runs until every copy is closed, and a worker runs while its parent, the server, does: with
    the copy kept, a rank killed before it closed its loaders (``kill -9``, the out-of-memory killer) would
    leave both running for good. Closed, the server ends with the rank and its workers follow.
    """
    server = multiprocessing.forkserver._forkserver
    if getattr(server, "_forkserver_alive_fd", None) is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None


def start_loading(loader: DataLoader) -> Iterator:
    """``iter(loader)``, which starts its workers. Workers a fork server starts (:func:`worker_processes`)
    receive the dataset pickled; one that cannot be is one line that says how to change it."""
    try:
        with warnings.catch_warnings():  # torch's own advice on the error below assumes a script of the user's
            warnings.filterwarnings("ignore", message="Got pickle error")
            return iter(loader)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        if "pickle" not in str(err):
            raise
        raise UserError(f"data: the dataset cannot be sent to the loader's worker processes, which the ranks of a "
                        f"process group start from a fork server ({err}); define its classes and functions at the top "
                        f"level of a module or plugin file, or load in the process itself with --workers 0") from None


def build_datasets(cfg: RunConfig, progress: bool = True, splits: tuple[str, ...] = SPLITS) -> DataBundle:
    """Build the train and test sets that ``cfg.data`` names, at ``cfg.T`` steps for events; only those in
    ``splits`` (``msgsnn eval`` builds ``("test",)`` and never renders the training frames).

    Raises :class:`DatasetMissing` when the files are not there (nothing is ever
    downloaded) and :class:`BadSample` for an unusable recording unless
    ``cfg.data.skip_bad_samples`` is set.
    """
    bundle = _builder(cfg.data.name)(cfg, progress, splits)
    if cfg.data.val_fraction > 0 and bundle.train is not None:
        bundle = hold_out_validation(bundle, cfg.data.val_fraction)
    if cfg.data.balanced_sampler and bundle.train is not None:
        bundle.sample_weights = class_balanced_weights(bundle.train.targets)
    return bundle


def hold_out_validation(bundle: DataBundle, fraction: float) -> DataBundle:
    """Per class, the last ``fraction`` of the training samples (in the training set's order) become the
    validation set, taken from the unaugmented ``train_plain``; the rest stay for training."""
    targets = np.asarray(bundle.train.targets)
    keep, held = split_per_class(range(len(targets)), targets, 1 - fraction)
    if len(held) == 0:
        raise ConfigError(f"data.val_fraction: {fraction} of {len(targets)} training samples holds out none per class; "
                          "raise it or set it to 0")
    if len(keep) == 0:
        raise ConfigError(f"data.val_fraction: {fraction} leaves no training sample; lower it")
    info = dataclasses.replace(bundle.info, n_train=len(keep), n_val=len(held))
    plain = bundle.train_plain if bundle.train_plain is not None else bundle.train
    return dataclasses.replace(bundle, train=LabelledSubset(bundle.train, keep), val=LabelledSubset(plain, held), info=info)


def check_datasets(cfg: RunConfig) -> None:
    """Raise :class:`DatasetMissing` now if ``cfg``'s dataset is not on disk; reads no sample."""
    _builder(cfg.data.name)
    if cfg.data.name in _CHECKS:
        _CHECKS[cfg.data.name](cfg)


def _builder(name: str) -> Builder:
    if name not in _BUILDERS:
        raise ConfigError(f"data.name: unknown dataset '{name}'{did_you_mean(name, _BUILDERS)}; available: {', '.join(list_datasets())}")
    return _BUILDERS[name]
