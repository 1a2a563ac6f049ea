#!/usr/bin/env bash
# The GPU check in one go, from a checkout on a CUDA machine (e.g. the `device` tool's machine,
# where nothing can be installed from the network): the CUDA tests (Triton LIF and BatchNorm
# against the CPU reference), the training-step benchmark at B = 64 beside the floor (and
# SpikingJelly / snnTorch when importable), and the expected epoch time of every paper preset.
# Needs torch, triton, typer, rich, pyyaml, pandas and pytest; not tonic (no dataset is read).
# Writes device.txt, test_cuda.log, step.log/.json and epoch.log/.json to ${OUT:-results/gpu}.
# About 6 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0
{ nvidia-smi; "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } \
    > "$out/device.txt" 2>&1 || status=1
"$python" -m pytest tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log" || status=1
"$python" benchmarks/step.py --device cuda --batch 64 --amp bf16 --threads 16 --json "$out/step.json" 2>&1 \
    | tee "$out/step.log" || status=1
for amp in none bf16; do
    "$python" benchmarks/epoch.py --device cuda --amp "$amp" --json "$out/epoch-$amp.json" 2>&1 \
        | tee "$out/epoch-$amp.log" || status=1
done
exit $status
