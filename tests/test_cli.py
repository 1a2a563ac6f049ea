"""The command line as a user meets it: help, errors as one line with a non-zero exit, train and eval."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from rich.console import Console
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli.cli import app
from msgcli.cli import train as train_commands
from tests.conftest import tiny_cli_args

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_help_on_every_command():
    for command in ([], ["train"], ["eval"], ["presets"], ["sweep"], ["analyze"], ["analyze", "grads"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_presets_lists_the_paper_numbers():
    result = invoke("presets")
    assert result.exit_code == 0
    assert "dvs-vgg" in result.output and "83.97" in result.output and "digits-dvs" in result.output


def test_presets_table_fits_80_columns_with_network_stem_pool_and_init(monkeypatch):
    narrow = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(train_commands, "console", narrow)
    assert invoke("presets").exit_code == 0
    text = narrow.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in text  # nothing wrapped or cut
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in config_io.list_presets()}
    assert set(rows) == set(config_io.list_presets())
    assert rows["dvs-resnet18"][:4] == ["cifar10dvs", "resnet18", "avg", "release"]
    assert rows["imagenet-sew18-release"][:4] == ["imagenet", "sew_resnet18", "max", "release"]
    assert rows["dvs-vgg"][:4] == ["cifar10dvs", "vggsnn", "-", "release"]


def test_config_errors_are_one_line_with_exit_2(tmp_path):
    cases = [
        (["--preset", "dvs-vg"], "did you mean 'dvs-vgg'"),
        (["--set", "model.neuron.mask_pp=0.2"], "did you mean 'model.neuron.mask_p'"),
        (["--mask-p", "1.5"], "model.neuron.mask_p: 1.5 is outside the allowed range"),
        (["--set", "train.epochs=many"], "train.epochs: expected an integer"),
    ]
    for args, message in cases:
        result = invoke("train", *args, "--out", str(tmp_path))
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
        assert "Traceback" not in result.output


def test_missing_dataset_stops_before_download_with_exit_2(tmp_path):
    result = invoke("train", "--preset", "dvs-vgg", "--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "CIFAR10DVS" in result.output and "Traceback" not in result.output


def test_train_then_eval_then_refuse_to_clobber(tmp_path):
    out = tmp_path / "out"
    args = ["train", *tiny_cli_args(tmp_path), "--epochs", "1", "--out", str(out), "--quiet"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    again = invoke(*args)
    assert again.exit_code == 2 and "already exists" in again.output
    result = invoke("eval", str(out / "digits-dvs"), "--checkpoint", "last")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "digits-dvs" / "eval-last.json").read_text())
    assert len(report["test_acc_per_timestep"]) == 4
    summary = json.loads((out / "digits-dvs" / "summary.json").read_text())
    assert abs(report["test_acc"] - summary["final_test_acc"]) < 1e-6  # same checkpoint, same test set
    bad = invoke("eval", str(tmp_path))
    assert bad.exit_code != 0 and "not a run directory" in bad.output


def test_the_command_line_loads_without_torch_pandas_or_matplotlib():
    """`msgsnn --help` and typos answer at once: the heavy packages load inside the commands."""
    code = "import sys, msgcli.cli; print(sorted({'torch', 'pandas', 'matplotlib', 'torchvision'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_event_training_loads_neither_torchvision_nor_dynamo():
    """torchvision's import pulls in torch._dynamo and triton (seconds per process, on every rank and worker);
    only the image datasets need it, and they import it when built."""
    code = ("import sys, msgcli.cli.train, msgcli.engine.train, msgcli.data, msgcli.snn; "
            "print(sorted({'torchvision', 'torch._dynamo', 'triton'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_python_dash_m_msgcli_is_the_msgsnn_command():
    done = subprocess.run([sys.executable, "-m", "msgcli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "Usage: msgsnn" in done.stdout and "train" in done.stdout, done.stdout + done.stderr


def test_the_top_level_api_is_the_cores_own_objects_and_no_msgsnn_package_exists():
    import importlib.util

    import msgcli
    from msgcli import LIF, TWO, build_model, register_model
    from msgcli.snn import decode, models, neuron

    assert (LIF, TWO, build_model, register_model) == (neuron.LIF, decode.TWO, models.build_model, models.register_model)
    assert set(msgcli.__all__) >= {"LIF", "TWO", "build_model", "register_model"}
    assert importlib.util.find_spec("msgsnn") is None


def test_skip_bad_samples_is_a_flag_of_train_and_sweep(tmp_path):
    import yaml

    out = tmp_path / "out"
    common = [*tiny_cli_args(tmp_path), "--epochs", "1", "--limit-batches", "1", "--out", str(out)]
    for name, flag in (("skipping", ["--skip-bad-samples"]), ("stopping", [])):
        result = invoke("train", *common, "--name", name, "--quiet", *flag)
        assert result.exit_code == 0, result.output
        assert yaml.safe_load((out / name / "config.yaml").read_text())["data"]["skip_bad_samples"] == bool(flag)
    result = invoke("sweep", *common, "--name", "skip", "--skip-bad-samples")
    assert result.exit_code == 0, result.output
    configs = list((out / "sweeps" / "skip").glob("*/config.yaml"))
    assert len(configs) == 1 and yaml.safe_load(configs[0].read_text())["data"]["skip_bad_samples"] is True


def test_epoch_lines_are_not_wrapped_when_the_output_is_not_a_terminal(tmp_path):
    result = invoke("train", *tiny_cli_args(tmp_path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(len(line) > 80 and line.endswith("s)") for line in epochs), result.output
    assert any(line.startswith("done ") and "after 2 epochs in" in line for line in lines), result.output
