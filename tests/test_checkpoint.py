"""Checkpoints load with ``weights_only=True``: weights, plain data and the RNG states, nothing that runs code."""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import pytest
import torch

from msgcli.engine import checkpoint
from msgcli.errors import UserError


def test_a_checkpoint_with_every_random_state_round_trips(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    state = {"model": {"w": torch.arange(4.0)}, "rows": [{"epoch": 1, "test_acc": 50.0}], "config": {"name": None},
             "rng": checkpoint.rng_state(torch.device("cpu"))}
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.save(state, tmp_path / "last.pt")
    loaded = checkpoint.load(tmp_path / "last.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["rows"] == state["rows"]
    checkpoint.set_rng_state(loaded["rng"], torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


class _Payload:
    def __reduce__(self):
        return os.system, ("echo unpickled > /dev/null",)


@pytest.mark.parametrize("unsafe", [_Payload(), pathlib.PurePosixPath("/somewhere")])
def test_a_checkpoint_holding_anything_else_is_refused_with_its_name(tmp_path, unsafe):
    torch.save({"model": {}, "extra": unsafe}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match=r"cannot read checkpoint .*foreign.pt: it holds \S+(system|PurePosixPath)"):
        checkpoint.load(tmp_path / "foreign.pt")
