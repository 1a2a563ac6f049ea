"""The random streams of a run: one seed builds the same model everywhere, then each rank draws its own.

One process: ``seed_everything(seed)`` just before the model is built, and training
continues that one stream (MSG masks, ...). Several processes: every rank seeds the same
way, so all build identical weights, then :func:`seed_rank` gives each rank a stream of
its own for training. Augmentation is seeded per sample (``sampling.SeededDataset``) and
does not draw from these streams.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

_MT_WORDS = 624  # MT19937 state words
_TORCH_MT_OFFSET = 24  # torch.get_rng_state(): u64 seed, i32 left, i32 seeded, u64 next, then u64 state[624]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``train.deterministic``: torch uses only deterministic algorithms while the run lasts, raising on an
    operator that has none, and cuBLAS a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS
    starts; a value already set is kept). torch's previous settings come back afterwards."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = benchmark


def seed_rank(seed: int, rank: int) -> None:
    """Reseed python, numpy and torch (CPU and CUDA) with streams derived from ``(seed, rank)``.

    The derivation is numpy's ``SeedSequence(seed, spawn_key=(rank,))``, which hashes the seed
    and the rank into whole generator states: ranks never share a stream, and no rank replays
    the stream of another run's seed (as ``seed + rank`` would: rank 1 of seed 42 would be seed
    43). torch's CPU generator, which the MSG masks come from (CPU kernels, torch fallback, and
    the Triton kernel's key), receives all 624 words of its MT19937 state, since
    ``torch.manual_seed`` keeps only 32 bits of a seed.
    """
    words = np.random.SeedSequence(seed % 2**64, spawn_key=(rank,)).generate_state(_MT_WORDS + 8, np.uint32)
    mt_words, seed64, python_words, numpy_words = words[:_MT_WORDS], words[-8:-6], words[-6:-4], words[-4:]
    torch.manual_seed(int(seed64.view(np.uint64)[0]))  # CUDA generators, torch.initial_seed(); CPU below
    state = torch.get_rng_state()
    if state.numel() < _TORCH_MT_OFFSET + 8 * _MT_WORDS:
        raise RuntimeError(f"unexpected torch CPU generator state size {state.numel()}")
    state.numpy()[_TORCH_MT_OFFSET: _TORCH_MT_OFFSET + 8 * _MT_WORDS].view(np.uint64)[:] = mt_words
    torch.set_rng_state(state)  # manual_seed left the generator due to regenerate at its next draw
    random.seed(int.from_bytes(python_words.tobytes(), "little"))
    np.random.seed(numpy_words)
