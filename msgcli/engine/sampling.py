"""Sampling that makes every epoch reproducible from (seed, epoch), and resumable mid-epoch.

The sampler yields ``(index, sample_seed)`` pairs; :class:`SeededDataset` seeds the
augmentation RNGs with ``sample_seed`` around each item. A sample's augmentation
then depends only on its position in the epoch, not on which worker loads it or
on how many batches ran before a resume.
"""

from __future__ import annotations

import random
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from msgcli.data.registry import release_fork_server
from msgcli.engine.stops import STOP_SIGNALS


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class EpochSampler(Sampler):
    """Shuffled (or class-balanced, with ``weights``) indices for one epoch, sharded over ranks.

    Like DistributedSampler: each of ``world_size`` ranks takes every
    ``world_size``-th index of one shared permutation, padded to equal length.
    ``skip`` drops the first samples of this rank (a resume in mid-epoch).
    One sampler serves every epoch of a loader whose workers persist: :meth:`set_epoch`
    before each pass.
    """

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 weights: torch.Tensor | None = None, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.rank, self.world_size = n, seed, epoch, rank, world_size
        self.weights, self.skip = weights, skip
        self.per_rank = -(-n // world_size)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(self.per_rank - self.skip, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = epoch_generator(self.seed, self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights.double(), self.n, replacement=True, generator=g)
        else:
            order = torch.randperm(self.n, generator=g)
        total = self.per_rank * self.world_size
        order = torch.cat([order, order[: total - self.n]])  # pad so every rank gets the same count
        mine = order[self.rank :: self.world_size].tolist()
        seeds = torch.randint(0, 2**62, (total,), generator=g)[self.rank :: self.world_size].tolist()
        for pos in range(self.skip, len(mine)):
            yield mine[pos], seeds[pos]


class SeededDataset(Dataset):
    """Runs ``dataset[index]`` with the python, numpy and torch CPU RNGs seeded by the sample's seed.

    The caller's states are restored afterwards and the CUDA generators are never
    touched, so with ``num_workers=0`` the training RNG streams (MSG masks) are unaffected.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals (a Ctrl-C, or SLURM's signal, reaches
    every process of the group or job step) and keep serving batches while the main process finishes
    its step and saves; they exit when it closes the loader, or when it is gone."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    release_fork_server(worker_id)
