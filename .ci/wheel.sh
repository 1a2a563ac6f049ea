#!/usr/bin/env bash
# The wheel works outside the checkout: build it, install it into a venv of its own (its dependencies
# come from CI's venv through a .pth file, the checkout's editable install does not), then from another
# folder list the presets, run the main job's preset for 2 batches and build the CPU kernels from the
# C source the wheel ships, into an empty cache. Usage: .ci/wheel.sh SCRATCH (run with CI's venv active).
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="$1"
site_packages() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
mkdir -p "$scratch/source"  # a copy: an in-tree build would leave (and later reuse) a build/ folder here
cp -r pyproject.toml README.md msgcli presets "$scratch/source/"
find "$scratch/source" -name __pycache__ -prune -exec rm -rf {} +
pip wheel --quiet --no-deps "$scratch/source" -w "$scratch/dist"
python3 -m venv --without-pip "$scratch/wheel-venv"
wheel_python="$scratch/wheel-venv/bin/python"
site_packages python > "$(site_packages "$wheel_python")/ci-dependencies.pth"
python -m pip --python "$wheel_python" install --quiet --no-deps "$scratch"/dist/msgsnn-*.whl
mkdir -p "$scratch/elsewhere"
cd "$scratch/elsewhere"
export MSGSNN_CACHE="$scratch/wheel-cache"
"$wheel_python" -W error::RuntimeWarning - <<'PY'
import sys
from pathlib import Path

import msgcli
from msgcli import config
from msgcli.snn import kernels
from msgcli.snn.kernels import cpu

installed = Path(sys.prefix)
for path in (Path(msgcli.__file__), config.PRESET_DIR, cpu.SOURCE):
    assert installed in path.resolve().parents, f"{path} is not inside the wheel's venv {installed}"
assert kernels.C_KERNELS.get() is not None  # built now from the shipped kernels/cpu.c (a warning would be an error)
print(f"wheel: msgcli from {Path(msgcli.__file__).parent}, {len(config.list_presets())} presets, kernels built")
PY
"$scratch/wheel-venv/bin/msgsnn" presets
"$scratch/wheel-venv/bin/msgsnn" train --preset digits-dvs --epochs 1 --limit-batches 2 --out "$scratch/wheel-runs" --quiet
test -f "$scratch/wheel-runs/digits-dvs/summary.json"
echo "wheel: installed msgsnn ran a preset from $(pwd)"
