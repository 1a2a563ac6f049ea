"""The training engine end to end on the tiny synthetic dataset."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from msgcli.data import build_datasets
from msgcli.engine import checkpoint
from msgcli.engine import train as train_module
from msgcli.engine.build import trained_model
from msgcli.errors import DatasetMissing, NonFiniteLoss, RunExists, UserError
from msgcli.engine.train import lr_at, train
from tests.conftest import tiny_cli_args, tiny_config

NONDETERMINISTIC_COLUMNS = ["epoch_seconds"]


def test_a_run_writes_config_metrics_checkpoints_and_summary(tmp_path):
    cfg = tiny_config(tmp_path)
    result = train(cfg, tmp_path / "out", progress=False)
    run = result.run.path
    assert run == tmp_path / "out" / "digits-dvs"
    for name in ("config.yaml", "metrics.csv", "train.log", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).exists(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    expected = {"lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds",
                *(f"test_acc_t{t}" for t in range(4)), *(f"two_t{t}" for t in range(4))}
    assert expected <= set(metrics.columns)
    rates = [c for c in metrics.columns if c.startswith("fr/")]
    assert len(rates) == 3  # vggsnn_tiny has three spiking layers
    assert metrics[rates].ge(0).all().all() and metrics[rates].le(1).all().all()
    assert metrics["test_acc"].between(0, 100).all()
    # TWO with warm-up 0: the factors of epoch 2 are the update made from epoch 1's counts
    assert list(metrics.loc[0, [f"two_t{t}" for t in range(4)]]) == [1.0] * 4
    ck = checkpoint.load(run / "checkpoints" / "last.pt")
    assert torch.allclose(ck["two"]["factors"].float(), result.two.factors.float().cpu())
    assert {"model", "optimizer", "two", "ranks", "epoch", "config", "model_args"} <= set(ck)
    assert "scheduler" not in ck  # the lr is computed from the epoch, never read back
    # the network is rebuilt from the saved constructor arguments, not from the weights' shapes
    assert ck["model_args"] | {"name": "vggsnn_tiny", "in_channels": 2, "num_classes": 4, "T": 4} == ck["model_args"]
    rebuilt, _ = trained_model(run / "checkpoints" / "last.pt", cfg)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), result.model.state_dict().values()))
    assert len(ck["ranks"]) == 1 and {"rng", "sums", "two_correct", "two_seen"} <= set(ck["ranks"][0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    assert summary["best_test_acc"] == pytest.approx(metrics["test_acc"].max())
    rows = list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))
    assert len(rows) == 1 and rows[0]["name"] == "digits-dvs"


def test_release_lr_schedule_is_cosine_to_1e5_of_the_scaled_lr(tmp_path):
    cfg = tiny_config(tmp_path, train__epochs=10, train__batch_size=64)
    base = 0.05 * 64 / 1024
    assert lr_at(0, cfg, 1) == pytest.approx(base)
    assert lr_at(5, cfg, 1) == pytest.approx(base * 1e-5 + (base - base * 1e-5) * 0.5)
    assert lr_at(10, cfg, 1) == pytest.approx(base * 1e-5)


def test_release_warmup_starts_near_zero_and_reaches_the_lr_at_its_end(tmp_path):
    """The release's warm-up: lr * (epoch / W * (1 - 1e-6) + 1e-6) below epoch W, then the cosine from the full lr."""
    cfg = tiny_config(tmp_path, train__epochs=10, train__batch_size=64, optim__warmup_epochs=4)
    base = 0.05 * 64 / 1024
    assert lr_at(0, cfg, 1) == pytest.approx(base * 1e-6)
    assert lr_at(1, cfg, 1) == pytest.approx(base * (0.25 * (1 - 1e-6) + 1e-6))
    assert lr_at(4, cfg, 1) == pytest.approx(base)
    assert lr_at(7, cfg, 1) == pytest.approx(base * 1e-5 + (base - base * 1e-5) * 0.5)  # cosine over the 6 epochs after it


def test_training_drops_the_last_partial_batch(tmp_path, monkeypatch):
    """As the release's loaders (drop_last=True): 116 training clips in batches of 8 are 14 steps, never a 15th of 4."""
    batches = []
    real_loss = train_module.compute_loss

    def counting(logits, targets, two, cfg):
        batches.append(len(targets))
        return real_loss(logits, targets, two, cfg)

    monkeypatch.setattr(train_module, "compute_loss", counting)
    cfg = tiny_config(tmp_path, train__epochs=1, train__limit_batches=0)
    result = train(cfg, tmp_path / "out", progress=False)
    n_train = len(build_datasets(cfg).train)
    assert batches == [8] * (n_train // 8) and n_train % 8 > 0
    assert result.summary["status"] == "finished"
    with pytest.raises(UserError, match="train.batch_size: 512 is more than the .* training samples"):
        train(tiny_config(tmp_path, train__epochs=1, train__batch_size=512), tmp_path / "out2", progress=False)


def test_an_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    cfg = tiny_config(tmp_path, train__epochs=1)
    train(cfg, tmp_path / "out", progress=False)
    with pytest.raises(RunExists, match="--resume.*--overwrite"):
        train(cfg, tmp_path / "out", progress=False)
    train(cfg, tmp_path / "out", overwrite=True, progress=False)


def test_a_run_that_stopped_before_its_first_epoch_is_reused(tmp_path, monkeypatch):
    """A missing dataset leaves config.yaml and train.log only: the same command works once the data is there."""
    cfg = tiny_config(tmp_path, train__epochs=1)
    monkeypatch.setattr(train_module, "build_datasets", lambda *a, **k: (_ for _ in ()).throw(DatasetMissing("gone")))
    with pytest.raises(DatasetMissing):
        train(cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / cfg.name / "config.yaml").exists()
    with pytest.raises(UserError, match="no finished epoch to resume"):
        train(cfg, tmp_path / "out", resume=True, progress=False)
    monkeypatch.undo()
    assert train(cfg, tmp_path / "out", progress=False).summary["status"] == "finished"


def test_an_unwritable_output_directory_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to output directory"):
        train(tiny_config(tmp_path), blocker, progress=False)


def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_loss = train_module.compute_loss
    calls = {"n": 0}

    def poisoned(logits, targets, two, cfg):
        calls["n"] += 1
        loss = real_loss(logits, targets, two, cfg)
        return loss * float("nan") if calls["n"] > 3 else loss  # epoch 2, batch 1

    monkeypatch.setattr(train_module, "compute_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="epoch 2, batch 1"):
        train(tiny_config(tmp_path), tmp_path / "out", progress=False)
    run = tmp_path / "out" / "digits-dvs"
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert len(pd.read_csv(run / "metrics.csv")) == 1
    assert not (run / "summary.json").exists()


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = train(tiny_config(tmp_path, train__amp="bf16", train__epochs=1), tmp_path / "out", progress=False)
    assert result.summary["status"] == "finished"


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.Popen([sys.executable, "-m", "msgcli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_metrics_of_an_uninterrupted_run(tmp_path):
    args = tiny_cli_args(tmp_path) + ["--set", "train.epochs=5", "--set", "train.limit_batches=0", "--quiet", "--out", str(tmp_path / "out")]
    reference = _cli(*args, "--name", "straight")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    victim = _cli(*args, "--name", "killed")
    metrics = tmp_path / "out" / "killed" / "metrics.csv"
    deadline = time.time() + 240
    while not metrics.exists() and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGTERM)
    output = victim.communicate(timeout=120)[0]
    assert victim.returncode == 130, output
    assert "--resume" in output
    assert not (tmp_path / "out" / "killed" / "summary.json").exists()

    assert len(pd.read_csv(metrics)) < 5
    resumed = _cli(*args, "--name", "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    straight = pd.read_csv(tmp_path / "out" / "straight" / "metrics.csv").drop(columns=NONDETERMINISTIC_COLUMNS)
    again = pd.read_csv(metrics).drop(columns=NONDETERMINISTIC_COLUMNS)
    pd.testing.assert_frame_equal(straight, again)
