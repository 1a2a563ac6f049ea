"""`msgsnn reproduce`: table plans, the report beside the paper's numbers, resume, missing data named up front."""

from __future__ import annotations

import fcntl
import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli.cli import app
from msgcli.config import ConfigError
from msgcli.engine import reproduce

DIGITS = ["digits-dvs", "digits-dvs-hard"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_flags(tmp_path) -> list[str]:
    return ["--epochs", "1", "--limit-batches", "2", "--seeds", "2", "--jobs", "2", "--set", "train.threads=1",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--data-root", tmp_path / "data", "--out", tmp_path / "out"]


def finish(plan: reproduce.Reproduction, row: int, best: list[float], final: list[float] | None = None) -> None:
    """Write finished runs for a row's seeds as `msgsnn train` leaves them (config.yaml, summary.json)."""
    target = plan.rows[row]
    for point, b, f in zip(target.points, best, final or best):
        run = target.sweep.directory / point.name
        run.mkdir(parents=True)
        config_io.save(point.config, run / "config.yaml")
        summary = {"status": "finished", "best_test_acc": b, "final_test_acc": f, "epochs": 1, "seconds": 60.0}
        (run / "summary.json").write_text(json.dumps(summary))


def report(tmp_path, name: str) -> pd.DataFrame:
    return pd.read_csv(tmp_path / "out" / "reproduce" / name / "report.csv")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """One tiny reproduce over the digits presets (2 seeds, 1 epoch of 2 batches, 2 runs at once)."""
    tmp_path = tmp_path_factory.mktemp("reproduce")
    result = invoke("reproduce", *DIGITS, *tiny_flags(tmp_path))
    assert result.exit_code == 0, result.output
    return tmp_path, result


@pytest.mark.slow
def test_reproduce_over_presets_writes_one_row_per_preset_with_its_seeds(digits):
    tmp_path, result = digits
    assert "4 runs, 2 presets, 2 seeds each" in result.output and "not measured" in result.output
    table = report(tmp_path, "digits-dvs+digits-dvs-hard")
    assert list(table["preset"]) == DIGITS
    assert list(table["seeds"]) == [2, 2] and list(table["finished"]) == [2, 2]
    assert list(table["status"]) == ["2 finished", "2 finished"]
    for row in table.itertuples():
        runs = row.runs.split()
        assert [path.rsplit("/", 1)[-1] for path in runs] == ["seed=42", "seed=43"]
        summaries = [json.loads((tmp_path / "out" / "reproduce" / "digits-dvs+digits-dvs-hard" / row.preset / name.rsplit("/", 1)[-1]
                                 / "summary.json").read_text()) for name in runs]
        best = pd.Series([s["best_test_acc"] for s in summaries])
        assert row.best_mean == pytest.approx(best.mean()) and row.best_std == pytest.approx(best.std())
        assert row.seconds_total == pytest.approx(sum(s["seconds"] for s in summaries))
        assert pd.isna(row.paper_mean) and pd.isna(row.difference)  # the digits presets are not in the paper
    markdown = (tmp_path / "out" / "reproduce" / "digits-dvs+digits-dvs-hard" / "report.md").read_text()
    assert "| digits-dvs | not in the paper |" in markdown and markdown.count("| 2/2 |") == 2
    assert "msgsnn reproduce digits-dvs digits-dvs-hard --seeds 2" in markdown and "--report-only" in markdown


@pytest.mark.slow
def test_an_interrupted_reproduce_resumed_gives_the_same_report(digits, tmp_path):
    source, _ = digits
    shutil.copytree(source / "out", tmp_path / "out")
    table = tmp_path / "out" / "reproduce" / "digits-dvs+digits-dvs-hard"
    before = report(tmp_path, table.name)
    (table / "digits-dvs" / "seed=43" / "summary.json").unlink()  # stopped after its checkpoint: resumed
    shutil.rmtree(table / "digits-dvs-hard" / "seed=42")  # never started: trained from the start
    flags = [*tiny_flags(source)[:-2], "--out", tmp_path / "out"]  # the frame cache the first reproduce built
    result = invoke("reproduce", *DIGITS, *flags, "--report-only")
    assert result.exit_code == 0, result.output
    partial = report(tmp_path, table.name)
    assert list(partial["status"]) == ["1 finished, 1 interrupted", "1 finished, 1 not started"]
    assert list(partial["finished"]) == [1, 1]

    result = invoke("reproduce", *DIGITS, *flags)
    assert result.exit_code == 0, result.output
    assert "2 runs, 1 finished already, 1 to resume, 0 to start" in result.output
    assert "2 runs, 1 finished already, 0 to resume, 1 to start" in result.output
    after = report(tmp_path, table.name)
    timing = ["seconds_mean", "seconds_total", "runs"]
    pd.testing.assert_frame_equal(after.drop(columns=timing), before.drop(columns=timing))


def test_every_missing_dataset_is_named_before_any_run_starts(tmp_path):
    result = invoke("reproduce", "dvs-vgg", "digits-dvs", "ncaltech-vgg", "nmnist-vgg", *tiny_flags(tmp_path))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 3 datasets are missing: [1] cifar10dvs: "), errors
    for dataset, layout in (("cifar10dvs", "CIFAR10DVS/CIFAR10DVS.zip"), ("ncaltech101", "NCALTECH101/"), ("nmnist", "NMNIST/train.zip")):
        assert f"] {dataset}: {tmp_path / 'data'}" in errors[0] and layout in errors[0]
    assert "digits" not in errors[0]
    assert "8 runs, 4 presets, 2 seeds each" in result.output  # the plan, printed before the check
    assert not (tmp_path / "out").exists()  # no run folder, no log, no report


def test_the_main_table_puts_ours_beside_the_papers_mean_and_spread(tmp_path):
    plan = reproduce.plan_reproduction(["main"], {}, 2, tmp_path / "out")
    presets = [row.sweep.name for row in plan.rows]
    assert presets == [name for name in config_io.list_presets() if config_io.load_preset(name).paper.accuracy is not None]
    assert len(presets) == 10 and all(len(row.points) == 2 for row in plan.rows)
    vgg, resnet = presets.index("dvs-vgg"), presets.index("dvs-resnet18")
    finish(plan, vgg, [84.0, 84.1], [83.0, 83.2])  # paper 83.97 ± 0.12
    finish(plan, resnet, [77.0, 77.4])  # paper 79.35 ± 0.34
    failed = plan.rows[presets.index("ncaltech-vgg")].sweep.directory
    failed.mkdir(parents=True)
    (failed / "sweep.csv").write_text("run,seed,status,error\nseed=42,42,failed,CUDA out of memory\nseed=43,43,pending,\n")
    running = plan.rows[presets.index("cifar10-cifarnet")].sweep.directory
    running.mkdir(parents=True)
    (running / "sweep.csv").write_text("run,seed,status,error\nseed=42,42,pending,\nseed=43,43,failed,NaN loss\n")
    with open(running / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # its reproduce is running now
        result = invoke("reproduce", "main", "--seeds", "2", "--out", tmp_path / "out", "--report-only")
    assert result.exit_code == 0, result.output
    table = report(tmp_path, "main").set_index("preset")
    assert table.loc["dvs-vgg", "paper_mean"] == 83.97 and table.loc["dvs-vgg", "paper_std"] == 0.12
    assert table.loc["dvs-vgg", "best_mean"] == pytest.approx(84.05)
    assert table.loc["dvs-vgg", "final_mean"] == pytest.approx(83.1)
    assert table.loc["dvs-vgg", "difference"] == pytest.approx(0.08)
    assert table.loc["dvs-vgg", "within_spread"] == "yes" and table.loc["dvs-resnet18", "within_spread"] == "no"
    assert table.loc["ncaltech-vgg", "status"] == "1 failed, 1 not started"
    assert "CUDA out of memory" in table.loc["ncaltech-vgg", "errors"]
    assert table.loc["cifar10-cifarnet", "status"] == "1 running, 1 failed"
    assert table.loc["imagenet-sew34", "status"] == "2 not started" and pd.isna(table.loc["imagenet-sew34", "best_mean"])
    markdown = (tmp_path / "out" / "reproduce" / "main" / "report.md").read_text()
    assert "| dvs-vgg | 83.97 ± 0.12 | 84.05 ± 0.07 | 83.10 ± 0.14 | +0.08 | yes | 2/2 | 60 s | 2 finished |" in markdown
    assert "| cifar100-resnet18 | 69.21 |" in markdown  # the paper gives no spread there
    assert "failed: ncaltech-vgg, seed=42: CUDA out of memory" in markdown
    assert "4 of 20 runs finished" in markdown


def test_the_ablation_table_reads_the_papers_cells_from_the_presets(tmp_path):
    plan = reproduce.plan_reproduction(["ablation"], {"train.epochs": 3}, 1, tmp_path / "out")
    assert [row.sweep.name for row in plan.rows[::4]] == ["cifar100-resnet18", "dvs-resnet18", "dvs-vgg"]
    assert [row.label for row in plan.rows[:4]] == ["mask_p=0_two=false", "mask_p=0_two=true", "mask_p=0.5_two=false",
                                                    "mask_p=0.5_two=true"]
    assert all(row.config.train.epochs == 3 for row in plan.rows)
    for row in range(8, 12):
        finish(plan, row, [83.0])
    result = invoke("reproduce", "ablation", "--seeds", "1", "--out", tmp_path / "out", "--report-only")
    assert result.exit_code == 0, result.output
    table = report(tmp_path, "ablation")
    vgg = table[table["preset"] == "dvs-vgg"]
    assert list(vgg["variant"]) == ["baseline", "+TWO", "+MSG", "MSG+TWO"]
    assert list(vgg["paper_mean"]) == [82.70, 83.20, 83.30, 83.90]
    assert vgg["difference"].tolist() == pytest.approx([0.3, -0.2, -0.3, -0.9])
    assert set(vgg["within_spread"]) == {"no spread given"}
    assert list(table["paper_mean"][:4]) == [68.79, 68.98, 69.08, 69.21]
    assert "one number per ablation cell" in (tmp_path / "out" / "reproduce" / "ablation" / "report.md").read_text()


def test_fig5_sweeps_p_with_the_arctan_surrogate_and_draws_the_figure(tmp_path):
    plan = reproduce.plan_reproduction(["fig5"], {}, 2, tmp_path / "out")
    assert [row.config.model.neuron.mask_p for row in plan.rows] == pytest.approx([i / 10 for i in range(11)])
    assert {row.config.model.neuron.surrogate for row in plan.rows} == {"arctan"}
    assert {row.sweep.name for row in plan.rows} == {"dvs-vgg"}
    finish(plan, 0, [80.0, 81.0])
    finish(plan, 5, [83.0, 84.0])
    result = invoke("reproduce", "fig5", "--seeds", "2", "--out", tmp_path / "out", "--report-only")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "reproduce" / "fig5"
    assert (folder / "maskp.png").exists() and (folder / "maskp.pdf").exists()
    assert list(pd.read_csv(folder / "maskp.csv")["mean"]) == [80.5, 83.5]
    markdown = (folder / "report.md").read_text()
    assert "figure only" in markdown and "no numbers" in markdown and "![accuracy against p](maskp.png)" in markdown


def test_the_plan_gives_the_measured_gpu_time_per_run(tmp_path, monkeypatch):
    cfg = config_io.apply_overrides(config_io.load_preset("dvs-vgg"), {"train.epochs": 10})
    measured = [{"preset": "dvs-vgg", "batch": 64, "T": 10, "amp": "none", "steps_per_epoch": 141, "epoch_min": 1.5,
                 "device": "NVIDIA H200"}]
    assert reproduce.expected_minutes(cfg, measured) == pytest.approx(15.0)
    limited = config_io.apply_overrides(cfg, {"train.limit_batches": 47})
    assert reproduce.expected_minutes(limited, measured) == pytest.approx(5.0)
    assert reproduce.expected_minutes(config_io.apply_overrides(cfg, {"train.amp": "bf16"}), measured) is None
    (tmp_path / "epoch.json").write_text(json.dumps(measured))
    (tmp_path / "epoch-bf16.json").write_text(json.dumps([dict(measured[0], amp="bf16", epoch_min=0.9)]))
    assert reproduce.measured_epochs(tmp_path)[1] == measured[0] and reproduce.measured_epochs(tmp_path / "none") == []
    bf16 = config_io.apply_overrides(cfg, {"train.amp": "bf16"})
    assert reproduce.expected_minutes(bf16, reproduce.measured_epochs(tmp_path)) == pytest.approx(9.0)
    plan = reproduce.plan_reproduction(["dvs-vgg"], {"train.epochs": 10}, 1, tmp_path)
    assert reproduce.plan_table(plan, measured)[0]["GPU time per run"] == "15 min"
    monkeypatch.chdir(tmp_path)  # where benchmarks/gpu.sh leaves it: results/gpu/epoch.json
    (tmp_path / "results" / "gpu").mkdir(parents=True)
    (tmp_path / "results" / "gpu" / "epoch.json").write_text(json.dumps(measured))
    result = invoke("reproduce", "dvs-vgg", "ncaltech-vgg", "--epochs", "10", "--data-root", tmp_path / "data")
    assert result.exit_code == 2 and "error: 2 datasets are missing" in result.output, result.output
    assert "15 min" in result.output and "not measured" in result.output  # ncaltech-vgg was not timed
    assert "as benchmarks/epoch.py measured them on NVIDIA H200" in " ".join(result.output.split())


def test_tables_and_presets_are_not_mixed():
    with pytest.raises(ConfigError, match="not main dvs-vgg"):
        reproduce.plan_reproduction(["main", "dvs-vgg"], {}, 1, "out")
    with pytest.raises(ConfigError, match="unknown preset 'dvs-vg'"):
        reproduce.plan_reproduction(["dvs-vg"], {}, 1, "out")


def test_with_the_ray_backend_every_run_of_every_preset_is_a_ray_task(tmp_path, monkeypatch):
    from msgcli.engine import sweep

    seen = {}

    def fake_ray(jobs, address):
        seen.update(address=address, runs=[job.run_dir.split("/reproduce/", 1)[1] for job in jobs])
        for job in jobs:
            yield job, sweep.Outcome("failed", None, "Ray task failed: node lost")

    monkeypatch.setattr(sweep, "run_ray", fake_ray)
    # the cluster's nodes hold the data: nothing is checked on this machine
    result = invoke("reproduce", "dvs-vgg", "ncaltech-vgg", "--seeds", "2", "--backend", "ray", "--ray-address", "ray://head:10001",
                    "--data-root", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "error: 4 of 4 runs did not finish" in result.output, result.output
    assert seen == {"address": "ray://head:10001", "runs": [f"dvs-vgg+ncaltech-vgg/{preset}/seed={seed}"
                                                           for preset in ("dvs-vgg", "ncaltech-vgg") for seed in (42, 43)]}
    table = report(tmp_path, "dvs-vgg+ncaltech-vgg")
    assert list(table["status"]) == ["2 failed", "2 failed"] and "node lost" in table["errors"][0]
