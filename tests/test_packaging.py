"""The wheel carries what an installed msgsnn needs outside the Python files: the presets and the C source."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from msgcli import config as config_io

REPO = Path(__file__).resolve().parent.parent


def test_the_package_list_names_every_package_and_the_presets():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "msgcli").rglob("__init__.py")}
    assert set(setup["packages"]) == found | {"msgcli.presets"}
    assert setup["package-dir"] == {"msgcli.presets": "presets"}


@pytest.mark.slow
def test_an_installed_wheel_reads_presets_and_kernel_source_from_its_own_files(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: building in the checkout would leave a build/ folder there
    for folder in ("msgcli", "presets"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                            "-w", str(tmp_path / "dist")], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("msgsnn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(p.name for p in (REPO / "presets").glob("*.yaml"))
    assert {f"msgcli/presets/{name}" for name in presets} <= names and "msgcli/snn/kernels/cpu.c" in names
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    probe = ("import msgcli.config as c, msgcli.snn.kernels.cpu as k; "
             "print(c.PRESET_DIR); print(k.SOURCE); print(','.join(c.list_presets())); c.load_preset('digits-dvs')")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("MSGSNN_PRESETS", None)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    preset_dir, source, listed = done.stdout.splitlines()
    assert Path(preset_dir) == target / "msgcli" / "presets" and Path(source) == target / "msgcli" / "snn" / "kernels" / "cpu.c"
    assert listed.split(",") == config_io.list_presets()


def test_a_checkout_reads_the_presets_at_the_top_of_the_repository():
    if "MSGSNN_PRESETS" not in os.environ:
        assert config_io.PRESET_DIR == REPO / "presets"
