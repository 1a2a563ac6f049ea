"""The README's reproduction commands name real presets and stop, offline, with the layout to place; CI's smoke
run plans every command of the documentation (README.md, docs/*.md, benchmarks/README.md)."""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from msgcli import config as config_io
from msgcli.cli import app
from tests.conftest import load_script

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
REPRODUCTION = README.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
COMMANDS = re.findall(r"`(msgsnn train --preset [\w-]+)`", REPRODUCTION)


def test_every_paper_row_has_a_command_with_the_papers_number():
    assert len(COMMANDS) == 10
    for command in COMMANDS:
        preset = shlex.split(command)[-1]
        cfg = config_io.load_preset(preset)
        row = next(line for line in REPRODUCTION.splitlines() if f"`{command}`" in line)
        assert f"{cfg.paper.accuracy:.2f}" in row, (preset, row)


@pytest.mark.parametrize("command", COMMANDS)
def test_reproduction_command_stops_before_any_download_without_data(command, tmp_path):
    result = CliRunner().invoke(app, shlex.split(command)[1:] + ["--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert str(tmp_path) in result.output  # names where the files must be placed
    assert not any(tmp_path.rglob("*.zip")) and not any(tmp_path.rglob("*.tar*"))


def test_library_snippet_runs_as_written():
    snippet = re.search(r"## The library\n+```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md (The library)", "exec"), scope)
    two, lif = scope["two"], scope["lif"]
    assert scope["logits"].shape == (6, 4, 10)
    assert lif.mask_p == 0.5 and "factors" in two.state_dict()
    assert torch.equal(two.factors, torch.ones(6)) and two.seen.item() == 0  # epoch 0 is in the warm-up; counts reset
    assert scope["spikes"].shape == (6, 4, 32) and set(scope["spikes"].unique().tolist()) <= {0.0, 1.0}


GPU_ONLY = ("python benchmarks/step.py --device cuda --batch 64", "python benchmarks/epoch.py --device cuda --amp bf16",
            "bash benchmarks/gpu.sh")


@pytest.mark.parametrize("cuda", [False, True])
def test_ci_smoke_plans_every_readme_command(cuda, tmp_path, monkeypatch):
    monkeypatch.setenv("MSGSNN_DATA", str(tmp_path / "datasets"))  # CI's empty data root
    smoke = load_script(".ci/smoke.py")
    commands = [(section, command) for _, section, command in smoke.documented_commands()]
    planned = {command: smoke.plan(section, command, cuda=cuda) for section, command in commands}
    # every shell line and inline command of every document has a plan, none is silently dropped
    texts = [path.read_text() for path in smoke.documents()]
    shell_lines = [
        line for text in texts for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines() if line.strip()
    ]
    assert len(commands) == len(planned) and len(commands) >= len(shell_lines) + 5
    for text in texts:  # each document's own commands, inline ones included, are among them
        assert {command for _, command in smoke.readme_commands(text)} <= set(planned)
    for line in shell_lines:
        for part in smoke.strip_comment(line).split("&&"):
            assert part.strip() in planned, part
    for inline in ('pip install -e ".[ray]"', "python benchmarks/step.py --amp bf16", "python benchmarks/data.py",
                   "bash results/reference/seeds.sh", 'pip install -e ".[tensorboard]"', "python benchmarks/busy.py"):
        assert planned[inline].expect == "ok", inline
    for gpu_only in GPU_ONLY:  # run where CUDA is, a one-line stop elsewhere
        assert planned[gpu_only].expect == ("ok" if cuda else "no-cuda"), gpu_only
    assert planned["python -m pytest -q -n 2"] is None  # .ci/run's own step
    for command in planned:  # prose must not quote a fragment such as `pip install` as if it were a command
        assert len(shlex.split(command)) >= (3 if command.startswith(("pip", "python -m")) else 2), command
    main_job = planned["msgsnn train --preset digits-dvs"]
    assert main_job.args == ["msgsnn", "train", "--preset", "digits-dvs"] and main_job.expect == "ok"
    expectations = {step.expect for step in planned.values() if step}
    assert expectations == ({"ok", "offline"} if cuda else {"ok", "offline", "no-cuda"})
    for command in COMMANDS:  # the paper's rows: the stop names the preset's dataset and its file under the root
        cfg = config_io.load_preset(shlex.split(command)[-1])
        step = planned[command]
        assert step.expect == "offline" and step.stop.startswith(f"{cfg.data.name}: {tmp_path / 'datasets'}/"), step.stop
    offline = [step for step in planned.values() if step and step.expect == "offline"]
    torchrun = next(step for step in offline if step.args[0] == "torchrun")
    assert torchrun.stop.startswith("cifar10dvs: /data/CIFAR10DVS/CIFAR10DVS.zip not found")
    analyze = [step for step in offline if step.args[1] == "analyze"]
    assert analyze and all(step.stop == step.args[-1] and step.stop.startswith("results/reproduce/") for step in analyze)
    assert all(step.stop for step in offline)
    # each table's command: one stop that lists every dataset its runs need, each under the root it names
    tables = {step.args[2]: step for step in offline if step.args[1] == "reproduce"}
    assert {"main", "ablation", "fig5"} <= set(tables)
    for table, datasets in (("main", ["cifar10", "cifar100", "cifar10dvs", "imagenet", "ncaltech101"]),
                            ("ablation", ["cifar100", "cifar10dvs"])):
        stop = tables[table].stop
        assert stop.startswith(f"{len(datasets)} datasets are missing: [1] "), stop
        assert re.findall(r"\[\d+\] ([\w-]+): /data/", stop) == datasets, stop
    assert tables["fig5"].stop.startswith("cifar10dvs: /data/CIFAR10DVS/CIFAR10DVS.zip not found")


def test_an_offline_step_passes_only_with_its_own_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("MSGSNN_DATA", str(tmp_path))
    smoke = load_script(".ci/smoke.py")
    step = smoke.plan("Reproducing the paper", "msgsnn train --preset ncaltech-vgg", cuda=False)

    def stopped(line: str, code: int = 2) -> bool:
        return smoke.passed(step, subprocess.CompletedProcess(step.args, code, "", line + "\n"))[0]

    assert stopped(f"error: {step.stop}")
    assert not stopped(f"error: {step.stop}", code=0)
    assert not stopped("error: model.neuron.mask_pp: unknown key (did you mean 'model.neuron.mask_p'?)")
    assert not stopped(f"error: {step.stop.replace('ncaltech101', 'cifar10dvs')}")  # another dataset's stop
    gpu = smoke.plan("Performance", GPU_ONLY[0], cuda=True)
    assert not smoke.passed(gpu, subprocess.CompletedProcess(gpu.args, 1, "", "error: CUDA is not available\n"))[0]


def test_smoke_compares_the_main_jobs_accuracy_with_the_readme_within_a_tolerance():
    smoke = load_script(".ci/smoke.py")
    quoted = smoke.readme_accuracy(README)
    assert f"reached **{quoted:.2f}% test accuracy**" in README
    assert smoke.compare_with_readme({"final_test_acc": quoted}, quoted) == (True, f"final test accuracy {quoted:.2f}% matches the README exactly")
    near, why = smoke.compare_with_readme({"final_test_acc": quoted - 0.56}, quoted)
    assert near and "within the 2.0-point tolerance" in why
    assert smoke.compare_with_readme({"final_test_acc": quoted + 1.68}, quoted)[0]  # three test digits: other CPUs
    assert not smoke.compare_with_readme({"final_test_acc": quoted - 2.23}, quoted)[0]  # four: outside


def test_smoke_strips_comments_but_not_quoted_hashes():
    smoke = load_script(".ci/smoke.py")
    assert smoke.strip_comment('msgsnn analyze grads results/x   # Fig. 1') == "msgsnn analyze grads results/x"
    assert smoke.strip_comment("msgsnn train --name 'a #b' --set x=c#d") == "msgsnn train --name 'a #b' --set x=c#d"


def test_the_method_is_in_the_repository_and_every_citation_points_to_it():
    repo = Path(__file__).resolve().parent.parent
    method = (repo / "docs" / "method.md").read_text()
    for preset in config_io.list_presets():  # every published number a preset quotes is in the method's tables
        paper = config_io.load_preset(preset).paper
        if paper.accuracy is not None:
            assert f"{paper.accuracy:.2f}" in method, preset
        ablation = [paper.ablation.baseline, paper.ablation.two, paper.ablation.msg, paper.ablation.msg_two]
        if any(number is not None for number in ablation):
            assert " / ".join(f"{number:.2f}" for number in ablation) in " ".join(method.split()), preset
    files = [p for p in repo.rglob("*") if p.suffix in (".py", ".md", ".sh", ".yaml", ".c") and ".venv" not in p.parts]
    citing = [p for p in files if "METHOD" + ".md" in p.read_text()]
    assert not citing, citing
    assert "docs/method.md" in README


def test_every_document_ci_runs_is_linked_from_the_readme():
    smoke = load_script(".ci/smoke.py")
    paths = [path.relative_to(REPO).as_posix() for path in smoke.documents()]
    assert paths[0] == "README.md" and "benchmarks/README.md" in paths
    assert {"docs/ci.md", "docs/clusters.md", "docs/differences.md", "docs/extending.md"} <= set(paths)
    for path in paths[1:]:  # what moved out of the README is one link away
        assert f"`{path}`" in README, path
    for text in [path.read_text() for path in smoke.documents()]:  # shown only: needs the network
        assert not any(command.startswith("pip download") for _, command in smoke.readme_commands(text))


def _schema_defaults(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            yield from _schema_defaults(hints[field.name], f"{prefix}{field.name}.")
        else:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            yield f"{prefix}{field.name}", ("(empty)" if default == "" else f"`{default}`" if isinstance(default, str)
                                            else f"`{default!r}`")


def test_the_configuration_page_lists_every_key_with_its_default():
    text = (REPO / "docs" / "configuration.md").read_text()
    documented = dict(re.findall(r"^\| `([\w.]+)` \| (.+?) \|$", text, re.M))
    assert documented == dict(_schema_defaults(config_io.RunConfig))

