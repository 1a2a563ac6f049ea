"""The benchmark scripts run and compute what they claim (their timings are not asserted: shared machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script

README = Path(__file__).resolve().parent.parent / "README.md"


def test_epoch_estimate_is_step_time_times_steps_of_the_presets_dataset(tmp_path):
    epoch = load_script("benchmarks/epoch.py")
    out = tmp_path / "epoch.json"
    assert epoch.main(["--presets", "dvs-vgg,cifar100-cifarnet", "--batch", "2", "--steps", "1", "--warmup", "0",
                       "--device", "cpu", "--json", str(out)]) == 0
    dvs, cifar = json.loads(out.read_text())
    assert (dvs["model"], dvs["T"], dvs["input"], dvs["steps_per_epoch"]) == ("vggsnn", 10, [10, 2, 48, 48], 4500)
    assert (cifar["model"], cifar["input"], cifar["steps_per_epoch"]) == ("cifarnet", [3, 32, 32], 25000)
    for row in (dvs, cifar):
        assert row["step_s"] > 0 and row["epoch_min"] == pytest.approx(row["step_s"] * row["steps_per_epoch"] / 60)


def test_epoch_estimate_covers_every_paper_row_and_stops_on_a_bad_preset(capsys):
    epoch = load_script("benchmarks/epoch.py")
    readme = README.read_text()
    assert all(f"`msgsnn train --preset {name}`" in readme for name in epoch.PAPER_PRESETS)
    assert epoch.main(["--presets", "dvs-vgg,nope", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
