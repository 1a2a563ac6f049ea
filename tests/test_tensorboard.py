"""`--tensorboard` / `train.loggers`: every metrics.csv column as TensorBoard scalars, kept equal to the CSV on resume."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli.cli import app
from msgcli.config import ConfigError
from msgcli.engine.loggers import scalar_tag
from tests.conftest import tiny_cli_args

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def scalars(board_dir) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: (step, value) per tag, after its purge of events a restart replaced."""
    events = event_accumulator.EventAccumulator(str(board_dir), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_board_equals_csv(run) -> None:
    metrics = pd.read_csv(run / "metrics.csv")
    board = scalars(run / "tb")
    columns = [c for c in metrics.columns if c != "epoch"]
    assert sorted(board) == sorted(scalar_tag(c) for c in columns)
    for column in columns:
        expected = [(int(e), pytest.approx(v, rel=1e-6, nan_ok=True)) for e, v in zip(metrics["epoch"], metrics[column])]
        assert board[scalar_tag(column)] == expected, column


def test_every_metrics_column_becomes_a_scalar_and_resume_keeps_them_equal(tmp_path):
    out = tmp_path / "out"
    first = invoke("train", *tiny_cli_args(tmp_path), "--set", "train.epochs=1", "--out", out, "--quiet", "--tensorboard")
    assert first.exit_code == 0, first.output
    run = out / "digits-dvs"
    assert config_io.load(run / "config.yaml").train.loggers == ["csv", "tensorboard"]
    assert_board_equals_csv(run)
    board = scalars(run / "tb")
    assert {"train_loss", "test_acc", "lr", "epoch_seconds", "test_acc_t/3", "two_t/0", "fr/features.4.2"} <= set(board)

    # resume to 3 epochs without the flag: the saved config keeps logging, once per epoch, appended to the same run
    resumed = invoke("train", *tiny_cli_args(tmp_path), "--set", "train.epochs=3", "--out", out, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_board_equals_csv(run)
    assert [step for step, _ in scalars(run / "tb")["test_acc"]] == [1, 2, 3]


def test_loggers_are_checked_before_training(tmp_path, monkeypatch):
    cfg = config_io.RunConfig()
    assert cfg.train.loggers == ["csv"]
    assert config_io.apply_overrides(cfg, {"train.loggers": "[csv, tensorboard]"}).train.loggers == ["csv", "tensorboard"]
    with pytest.raises(ConfigError, match=r"train.loggers: must include csv \(always written\)"):
        config_io.apply_overrides(cfg, {"train.loggers": "tensorboard"})
    with pytest.raises(ConfigError, match="train.loggers: 'wandb' is not allowed; choose one of csv, tensorboard"):
        config_io.apply_overrides(cfg, {"train.loggers": "csv,wandb"})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if msgsnn[tensorboard] were not installed
    result = invoke("train", *tiny_cli_args(tmp_path), "--out", tmp_path / "out", "--quiet", "--tensorboard")
    assert result.exit_code == 1 and "an optional extra of msgsnn: pip install tensorboard" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
