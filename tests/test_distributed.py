"""Two CPU processes over gloo on loopback: identical TWO factors and parameters, one set of files."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from msgsnn import config as config_io
from msgsnn.engine import distributed
from msgsnn.engine.train import train
from tests.conftest import tiny_cli_args, tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, dump: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = train(config_io.from_dict(cfg_dict), out, progress=False)
    torch.save({"model": result.model.state_dict(), "factors": result.two.factors}, f"{dump}/rank{rank}.pt")
    distributed.teardown(distributed.DistContext(rank, world, torch.device("cpu")))


@pytest.mark.slow
def test_two_ranks_hold_identical_factors_and_parameters(tmp_path):
    cfg = tiny_config(tmp_path, train__epochs=2, two__warmup_epochs=0)
    mp.spawn(_worker, args=(2, free_port(), config_io.to_dict(cfg), str(tmp_path / "out"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["factors"], ranks[1]["factors"])
    assert not torch.equal(ranks[0]["factors"], torch.ones(4, dtype=ranks[0]["factors"].dtype))  # TWO did update
    for name, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][name]), name
    runs = list((tmp_path / "out").iterdir())
    assert sorted(p.name for p in runs) == ["digits-dvs", "runs.csv"]
    assert len(list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))) == 1


@pytest.mark.slow
def test_torchrun_runs_the_cli_under_ddp(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "msgsnn", "train", *tiny_cli_args(tmp_path), "--quiet", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = (tmp_path / "out" / "digits-dvs" / "metrics.csv").read_text().strip().splitlines()
    assert len(metrics) == 1 + 2  # header + one row per epoch, written once
    assert len(list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))) == 1


@pytest.mark.slow
def test_under_torchrun_a_missing_dataset_stops_every_rank_with_one_line(tmp_path):
    """Rank 0 finds the data missing; the other rank must not wait at a barrier or print a second error."""
    args = [a.replace("data.name=synthetic", "data.name=cifar10dvs") for a in tiny_cli_args(tmp_path)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "msgsnn", "train", *args, "--quiet", "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    output = done.stdout + done.stderr
    assert done.returncode != 0
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: cifar10dvs:") and "CIFAR10DVS.zip" in errors[0], output
    assert "exitcode  : 2" in output  # every rank exited with the CLI's code for missing data
