"""The README's reproduction commands name real presets and stop, offline, with the layout to place."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msgsnn import config as config_io
from msgsnn.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
REPRODUCTION = README.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
COMMANDS = re.findall(r"`(msgsnn train --preset [\w-]+)`", REPRODUCTION)


def test_every_paper_row_has_a_command_with_the_papers_number():
    assert len(COMMANDS) == 9
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
