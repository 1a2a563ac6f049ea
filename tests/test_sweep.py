"""`msgsnn sweep`: planning, parallel train processes, sweep.csv, skip/resume, failures, Ray."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pandas as pd
import pytest
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli.cli import app
from msgcli.config import ConfigError
from msgcli.engine import sweep as sweeps
from msgcli.errors import UserError
from msgcli.engine.results import RunDirectory
from tests.conftest import tiny_cli_args, tiny_config
from tests.launch import clean_environment
from tests.test_data import write_cifar10dvs
from tests.test_plugins import write_plugin


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_ranges_include_the_stop_without_float_drift():
    assert sweeps.parse_values("k", "0.1:0.9") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert sweeps.parse_values("k", "0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sweeps.parse_values("k", "0.3:0.3") == [0.3]
    assert sweeps.parse_values("k", "0,0.3, 0.5,0.3") == ["0", "0.3", "0.5"]
    for bad in ("0.9:0.1", "0:1:0", "a:b", "0:1:0.1:2", "0,,1"):
        with pytest.raises(ConfigError, match="k"):
            sweeps.parse_values("k", bad)


def test_plan_names_points_by_swept_keys_and_seed_and_validates_them(tmp_path):
    base = tiny_config(tmp_path)
    plan = sweeps.plan_sweep(base, {"model.neuron.mask_p": [0.0, 0.5], "two.enabled": ["true", "false"]}, 2, tmp_path)
    assert plan.name == "digits-dvs-mask_p-two" and plan.directory == tmp_path / plan.name
    assert len(plan.points) == 8
    first = plan.points[0]
    assert first.name == "mask_p=0_two=true_seed=42" == first.config.name
    assert first.values == {"model.neuron.mask_p": 0.0, "two.enabled": True, "train.seed": 42}
    assert plan.points[-1].config.train.seed == 43 and plan.points[-1].config.two.enabled is False
    with pytest.raises(ConfigError, match="did you mean 'model.neuron.mask_p'"):
        sweeps.plan_sweep(base, {"model.neuron.maskp": [0.1]}, 1, tmp_path)
    with pytest.raises(ConfigError, match="outside the allowed range"):
        sweeps.plan_sweep(base, {"model.neuron.mask_p": [0.5, 1.5]}, 1, tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        sweeps.plan_sweep(base, {"train.seed": ["1", "2"]}, 2, tmp_path)


def test_a_second_coordinator_is_kept_out_of_a_running_sweep(tmp_path):
    plan = sweeps.plan_sweep(tiny_config(tmp_path), {}, 1, tmp_path, name="locked")
    plan.directory.mkdir()
    with open(plan.directory / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another msgsnn sweep is running"):
            sweeps.run_sweep(plan, echo=lambda line: None)


def test_sweep_runs_points_in_parallel_records_failures_skips_finished_and_resumes(tmp_path):
    args = ["sweep", "--out", tmp_path, "--name", "demo", "--mask-p", "0.5", "--jobs", "2", *tiny_cli_args(tmp_path)]
    # cifar10dvs is only partly extracted, which the up-front file check cannot see: that point fails, the sweep goes on
    write_cifar10dvs(tmp_path / "data", {"airplane": 2})
    result = invoke(*args, "--grid", "data.name=synthetic,cifar10dvs")
    assert result.exit_code != 0 and "1 of 2 runs did not finish" in result.output, result.output
    sweep = tmp_path / "sweeps" / "demo"
    table = pd.read_csv(sweep / "sweep.csv", keep_default_na=False).set_index("data.name")
    assert list(table.columns) == ["run", "model.neuron.mask_p", "seed", "status", "best_test_acc", "final_test_acc",
                                   "epochs", "seconds", "error"]
    assert table.loc["cifar10dvs", "status"] == "failed" and "only 2 *.aedat4 files" in table.loc["cifar10dvs", "error"]
    done = table.loc["synthetic"]
    assert done["status"] == "finished" and done["error"] == ""
    run = sweep / done["run"]
    assert run.name == "mask_p=0.5_name=synthetic_seed=42"
    summary = json.loads((run / "summary.json").read_text())
    assert float(done["best_test_acc"]) == pytest.approx(summary["best_test_acc"])
    assert float(done["final_test_acc"]) == pytest.approx(summary["final_test_acc"])
    assert int(done["epochs"]) == summary["epochs"] == 2 and float(done["seconds"]) == summary["seconds"]
    saved = config_io.load(run / "config.yaml")
    assert (saved.model.neuron.mask_p, saved.data.name, saved.train.seed, saved.data.size) == (0.5, "synthetic", 42, 16)

    # the same sweep again (its finished half): nothing to train
    rerun = [*args, "--grid", "data.name=synthetic"]
    stamp = (run / "metrics.csv").stat().st_mtime_ns
    result = invoke(*rerun)
    assert result.exit_code == 0, result.output
    assert "1 runs, 1 finished already, 0 to resume, 0 to start" in result.output
    assert (run / "metrics.csv").stat().st_mtime_ns == stamp

    # an interrupted run (a checkpoint, no summary) is resumed, not restarted
    (run / "summary.json").unlink()
    result = invoke(*rerun)
    assert result.exit_code == 0, result.output
    assert "1 to resume, 0 to start" in result.output
    assert "resuming" in (sweep / "logs" / f"{run.name}.log").read_text()
    assert pd.read_csv(sweep / "sweep.csv")["status"].tolist() == ["finished"]

    # a changed setting is not silently mixed with the old runs
    result = invoke(*rerun, "--set", "model.neuron.alpha=4")
    assert result.exit_code != 0 and "model.neuron.alpha: 2.0 -> 4.0" in result.output, result.output


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1], ids=lambda sig: sig.name)
def test_a_stop_signal_to_the_coordinator_alone_saves_the_running_point_and_the_same_command_resumes(tmp_path, stop):
    """SLURM's SIGUSR1 or a SIGTERM that reaches only the coordinator (not its process group): the running point
    saves and stops, sweep.csv says so, no point is left running, and the same command finishes the sweep."""
    args = [sys.executable, "-m", "msgcli", "sweep", "--out", str(tmp_path), "--name", "stopped", "--mask-p", "0.3,0.6",
            *tiny_cli_args(tmp_path), "--set", "train.epochs=30"]
    sweep = tmp_path / "sweeps" / "stopped"
    first = sweep / "mask_p=0.3_seed=42"
    coordinator = subprocess.Popen(args, env=clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)  # the signal reaches the coordinator alone
    try:
        deadline = time.monotonic() + 120
        while not (first / "checkpoints" / "last.pt").exists():
            assert coordinator.poll() is None and time.monotonic() < deadline, coordinator.communicate()
            time.sleep(0.1)
        coordinator.send_signal(stop)
        out, err = coordinator.communicate(timeout=120)
    finally:
        coordinator.kill()
    assert coordinator.returncode == 130, out + err
    assert err.strip().splitlines() == [f"error: {stop.name}: the running points saved their checkpoints; "
                                        "the same command resumes them"], err
    assert pd.read_csv(sweep / "sweep.csv")["status"].tolist() == ["interrupted", "pending"]
    RunDirectory(first).refuse_if_held()  # its train process is gone: it would raise RunInUse
    assert re.search(r"interrupted (at|after) epoch \d+", (sweep / "logs" / f"{first.name}.log").read_text())
    done = subprocess.run(args, env=clean_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 to resume, 1 to start" in done.stdout
    assert pd.read_csv(sweep / "sweep.csv")["status"].tolist() == ["finished", "finished"]


@pytest.mark.usefixtures("isolated_registries")
def test_ray_backend_runs_points_as_tasks_on_a_local_instance(tmp_path):
    """Each point a Ray task; its worker imports the plugin that the config names (a backbone of its own)."""
    ray = pytest.importorskip("ray")
    plugin = write_plugin(tmp_path / "plugins", "ray_net")
    cfg = tiny_config(tmp_path, train__epochs=1, plugins=[str(plugin)], model__name="ray_net")
    plan = sweeps.plan_sweep(cfg, {"model.neuron.mask_p": [0.25]}, 1, tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = sweeps.run_sweep(plan, backend="ray", echo=lambda line: None)
    finally:
        ray.shutdown()
    assert [row["status"] for row in rows] == ["finished"], rows
    table = pd.read_csv(plan.directory / "sweep.csv")
    assert list(table["model.neuron.mask_p"]) == [0.25] and list(table["epochs"]) == [1]
    assert (plan.directory / "mask_p=0.25_seed=42" / "summary.json").exists()
    assert json.loads((plan.directory / "mask_p=0.25_seed=42" / "summary.json").read_text())["model"] == "ray_net"


def test_the_ray_backend_starts_ray_without_usage_statistics(monkeypatch):
    """Ray's usage reporting tries the network at ray.init; a sweep turns it off unless the user chose."""
    seen = {}
    fake_ray = types.SimpleNamespace(
        is_initialized=lambda: False, shutdown=lambda: None, cluster_resources=lambda: {},
        init=lambda **kwargs: seen.setdefault("stats", os.environ.get("RAY_USAGE_STATS_ENABLED")),
        remote=lambda **kwargs: (lambda fn: fn))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED")
    assert list(sweeps.run_ray([], None)) == [] and seen == {"stats": "0"}
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    seen.clear()
    list(sweeps.run_ray([], None))
    assert seen == {"stats": "1"}


def test_a_missing_dataset_stops_the_sweep_before_any_run_starts(tmp_path):
    args = [a.replace("data.name=synthetic", "data.name=nmnist") for a in tiny_cli_args(tmp_path)]
    result = invoke("sweep", *args, "--mask-p", "0,0.5", "--seeds", "2", "--jobs", "2", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: nmnist:") and "NMNIST/train.zip" in result.output
    assert not (tmp_path / "out").exists()  # no sweep folder, no run folders, no logs
