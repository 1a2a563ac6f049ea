"""Shared fixtures: a tiny, fast configuration on the synthetic event dataset; loading repo scripts."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from msgcli import config as config_io

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a Ray started by a test reports nothing over the network

TINY = {
    "data.name": "synthetic", "data.size": 16, "data.num_workers": 0, "T": 4,
    "model.name": "vggsnn_tiny", "train.epochs": 2, "train.batch_size": 8, "train.limit_batches": 3,
    "train.threads": 1, "two.warmup_epochs": 0,
}


def pytest_collection_modifyitems(config, items):
    """``exhaustive`` tests run only with ``MSGSNN_EXHAUSTIVE=1``: each repeats, over every combination, a check
    that a covering subset of the combinations makes in every run (minutes of CPU the suite can spare)."""
    if os.environ.get("MSGSNN_EXHAUSTIVE", "0") not in ("0", ""):
        return
    skip = pytest.mark.skip(reason="exhaustive: set MSGSNN_EXHAUSTIVE=1 to run every combination")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)


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


@contextlib.contextmanager
def group_of_one():
    """A gloo process group of this process alone, made in memory: what makes this process a rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def tiny(tmp_path):
    return tiny_config(tmp_path)


@pytest.fixture
def isolated_registries():
    """Backbones, surrogates and datasets that a test (or a plugin it loads) registers are gone after it, so the
    registries hold only the built-in ones for every other test."""
    from msgcli import plugins
    from msgcli.data import registry as datasets
    from msgcli.snn import surrogate
    from msgcli.snn.models import registry as models

    tables = [models._MODELS, surrogate.SURROGATES, datasets._BUILDERS, datasets._CHECKS, plugins._loaded]
    saved = [table.copy() for table in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)


def load_script(relative_path: str):
    """Import a script of the repository that is not in a package (``.ci/smoke.py``, ``benchmarks/*.py``)."""
    path = Path(__file__).resolve().parent.parent / relative_path
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module
