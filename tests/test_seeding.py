"""Random streams: one seed builds the model, each rank then draws its own; augmentation seeds stay off them."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from msgcli.engine.sampling import SeededDataset
from msgcli.engine.seeding import seed_everything, seed_rank


@pytest.fixture(autouse=True)
def keep_this_process_streams():
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def draws() -> tuple:
    return torch.rand(8), np.random.random_sample(4), random.random()


def test_rank_streams_are_reproducible_distinct_and_not_another_seeds():
    seed_rank(42, 1)
    first = draws()
    seed_rank(42, 1)
    again = draws()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    others = []
    for seed, rank in ((42, 0), (43, 0), (41, 2)):  # seed + rank would give 43 for all three
        seed_rank(seed, rank)
        others.append(torch.rand(8))
    assert all(not torch.equal(first[0], other) for other in others)
    assert not torch.equal(others[1], others[2])


def test_rank_stream_is_the_whole_mt19937_state_from_the_seed_sequence():
    """torch's CPU stream continues exactly the MT19937 whose 624 key words SeedSequence(seed, spawn_key=(rank,))
    gives, so a 32-bit torch.manual_seed cannot produce it."""
    seed_rank(7, 3)
    got = torch.randint(0, 2**31, (4,))  # one 64-bit draw each, of which randint keeps the low 31 bits
    key = np.random.SeedSequence(7, spawn_key=(3,)).generate_state(624, np.uint32)
    mt = np.random.MT19937()
    mt.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": 624}}
    raw = mt.random_raw(8)
    assert got.tolist() == (raw[1::2] % 2**31).tolist()


def test_one_process_keeps_the_single_seeded_stream():
    seed_everything(5)
    a = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(a, torch.rand(4))


def test_seeded_dataset_restores_the_cpu_stream_and_never_reseeds_cuda(monkeypatch):
    torch.manual_seed(0)
    before = torch.get_rng_state()

    def forbidden(*args, **kwargs):
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)

    class Noise(torch.utils.data.Dataset):
        def __getitem__(self, index):
            return torch.rand(3), np.random.random_sample(), random.random()

    data = SeededDataset(Noise())
    item = data[(5, 123)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(item[0], data[(9, 123)][0])  # the sample's seed alone decides its draws
    assert not torch.equal(item[0], data[(5, 124)][0])
