"""Shared fixtures: a tiny, fast configuration on the synthetic event dataset."""

from __future__ import annotations

import pytest

from msgsnn import config as config_io

TINY = {
    "data.name": "synthetic", "data.size": 16, "data.num_workers": 0, "T": 4,
    "model.name": "vggsnn_tiny", "train.epochs": 2, "train.batch_size": 8, "train.limit_batches": 3,
    "train.threads": 1, "two.warmup_epochs": 0,
}


def tiny_config(tmp_path, **overrides):
    """The digits-dvs preset shrunk to seconds on the synthetic dataset, caches under tmp_path."""
    values = dict(TINY, **{"data.root": str(tmp_path / "data"), "data.cache_dir": str(tmp_path / "cache")})
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return config_io.apply_overrides(config_io.load_preset("digits-dvs"), values)


def tiny_cli_args(tmp_path) -> list[str]:
    args = []
    for key, value in dict(TINY, **{"data.root": str(tmp_path / "data"), "data.cache_dir": str(tmp_path / "cache")}).items():
        args += ["--set", f"{key}={value}"]
    return args


@pytest.fixture
def tiny(tmp_path):
    return tiny_config(tmp_path)
