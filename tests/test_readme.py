"""The README's reproduction commands name real presets and stop, offline, with the layout to place."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from msgsnn import config as config_io
from msgsnn.cli import app
from tests.conftest import load_script

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
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


def test_ci_smoke_runs_every_readme_command():
    smoke = load_script(".ci/smoke.py")
    commands = smoke.readme_commands(README)
    planned = {command: smoke.plan(section, command, cuda=False) for section, command in commands}
    # every shell line and inline command in the README has a plan, none is silently dropped
    shell_lines = [
        line for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines() if line.strip()
    ]
    assert len(commands) >= len(shell_lines) + 5
    for line in shell_lines:
        for part in smoke.strip_comment(line).split("&&"):
            assert part.strip() in planned, part
    for inline in ('pip install -e ".[ray]"', "python benchmarks/step.py --amp bf16", "python benchmarks/data.py"):
        assert planned[inline].expect == "ok", inline
    for gpu_only in ("python benchmarks/step.py --device cuda --batch 64", "python benchmarks/epoch.py --device cuda --amp bf16",
                     "bash benchmarks/gpu.sh"):
        assert planned[gpu_only].expect == "no-cuda", gpu_only
    assert smoke.plan("Performance", "python benchmarks/step.py --device cuda --batch 64", cuda=True).expect == "ok"
    assert planned["python -m pytest -q"] is None  # .ci/run's own step
    for command in planned:  # prose must not quote a fragment such as `pip install` as if it were a command
        assert len(shlex.split(command)) >= (3 if command.startswith(("pip", "python -m")) else 2), command
    main_job = planned["msgsnn train --preset digits-dvs"]
    assert main_job.args == ["msgsnn", "train", "--preset", "digits-dvs"] and main_job.expect == "ok"
    expectations = {step.expect for step in planned.values() if step}
    assert expectations == {"ok", "offline", "no-cuda"}
    for command in COMMANDS:  # the paper's rows need their datasets: CI checks the offline stop
        assert planned[command].expect == "offline"
    torchrun = next(c for c in planned if c.startswith("torchrun"))
    assert planned[torchrun].expect == "offline"


def test_smoke_strips_comments_but_not_quoted_hashes():
    smoke = load_script(".ci/smoke.py")
    assert smoke.strip_comment('msgsnn analyze grads results/x   # Fig. 1') == "msgsnn analyze grads results/x"
    assert smoke.strip_comment("msgsnn train --name 'a #b' --set x=c#d") == "msgsnn train --name 'a #b' --set x=c#d"
