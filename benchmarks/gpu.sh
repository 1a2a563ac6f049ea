#!/usr/bin/env bash
# The GPU check in one go, from a checkout on a CUDA machine (e.g. the `device` tool's machine, where
# nothing can be installed from the network):
#   device.txt       nvidia-smi, versions, and the peers' wheels installed from .whl/ if it is there
#   gpu_model.txt    the H200 yardstick: least time of each part of a VGGSNN/ResNet18 step (no GPU used)
#   test_cuda.log    the CUDA tests: Triton LIF and BatchNorm (and torch's batch_norm path) against the CPU
#                    reference, a training step
#   step.log/.json   one training step at B = 64, fp32 and bf16, beside the floor, SpikingJelly, snnTorch; msgsnn's
#                    per-step BatchNorm both ways: torch's batch_norm (msg, the default) and its Triton kernels
#                    (msg_triton_bn, MSGSNN_TRITON_BN=1); then ResNet18 (the launch-bound network) eager against
#                    --compile (torch.compile, CUDA graphs), msg and msg+compile, appended to step.log
#   epoch.log/.json  expected time per epoch of the nine paper presets (their own precision)
#   epoch-bf16.json  the same under bf16 autocast (its table is in epoch.log)
# in ${OUT:-results/gpu} (8 files: what the device tool brings back). Each stage has a time limit and
# the whole check a budget (BUDGET seconds, default 540), so it ends within 9.5 minutes; a stage stopped
# at its limit keeps its partial log and makes the exit status 1. Needs torch, triton, typer, rich,
# pyyaml, pandas and pytest, not tonic (no dataset is read). For the peers, carry the wheels of
# spikingjelly 2.0, snntorch 1.0 and loguru in .whl/ (see benchmarks/README.md).
# Without CUDA it stops at once with one line naming CUDA and exit status 2. GPU_CHECK=cpu runs every
# stage on the CPU at toy sizes instead, with 4 times the time limits: a check of this script, not a
# measurement.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
out="${OUT:-results/gpu}"
mode=${GPU_CHECK:-cuda}

if [ "$mode" = cuda ]; then
    cuda=$("$python" -c "import torch; print(torch.cuda.is_available())" 2>/dev/null)
    if [ "$cuda" != True ]; then
        if [ "$cuda" = False ]; then
            echo "error: benchmarks/gpu.sh needs a CUDA GPU visible to torch (torch.cuda.is_available() is False here)" >&2
        else
            echo "error: benchmarks/gpu.sh needs torch with CUDA, and $python cannot import torch" >&2
        fi
        exit 2
    fi
    step_args=(--device cuda --batch 64 --amp bf16 --threads 16 --rounds 1 --steps 10 --warmup 3)
    compile_args=(--device cuda --network resnet18 --batch 64 --threads 16 --rounds 1 --steps 10 --warmup 3)
    epoch_args=(--device cuda)
    model_args=()
    slack=1
elif [ "$mode" = cpu ]; then
    step_args=(--device cpu --network vggsnn_tiny --batch 2 --T 2 --size 16 --amp bf16 --rounds 1 --steps 1 --warmup 0
        --cases msg,floor,msg_triton_bn)
    compile_args=(--device cpu --network vggsnn_tiny --batch 2 --T 2 --size 16 --rounds 1 --steps 1 --warmup 1)
    epoch_args=(--device cpu --presets cifar100-resnet18 --batch 2 --steps 1 --warmup 0)
    model_args=(--presets dvs-vgg)
    slack=4
else
    echo "error: GPU_CHECK=$mode: choose cuda (the default) or cpu" >&2
    exit 2
fi

budget=$((${BUDGET:-540} * slack))
mkdir -p "$out"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

stage() {  # stage LIMIT LOG COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget is short)
    local limit=$(($1 * slack)) log=$2
    shift 2
    local left=$((budget - SECONDS))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 10)); then
        echo "skipped, the ${budget}s budget is spent: $*" | tee -a "$out/$log"
        status=1
        return
    fi
    echo "== $* (at most ${limit}s)" | tee -a "$out/$log"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$out/$log"
    local rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        echo "stopped at its ${limit}s limit: $*" | tee -a "$out/$log"
    fi
    if ((rc != 0)); then status=1; fi
}

: >"$out/device.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
    site="$(mktemp -d)"
    if "$python" -m pip install --quiet --no-index --no-deps --target "$site" .whl/*.whl >>"$out/device.txt" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:$site"
        echo "installed for this run: $(cd .whl && echo *.whl)" >>"$out/device.txt"
    fi
fi
if [ "$mode" = cuda ]; then
    stage 30 device.txt nvidia-smi
fi
stage 30 device.txt "$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
stage 60 gpu_model.txt "$python" benchmarks/gpu_model.py "${model_args[@]}"
stage 120 test_cuda.log "$python" -m pytest tests/test_cuda.py -q -p no:cacheprovider -k "not interpreter"
stage 210 step.log "$python" benchmarks/step.py "${step_args[@]}" --json "$out/step.json"
stage 150 step.log "$python" benchmarks/step.py "${compile_args[@]}" --cases msg --compile
stage 90 epoch.log "$python" benchmarks/epoch.py "${epoch_args[@]}" --json "$out/epoch.json"
stage 90 epoch.log "$python" benchmarks/epoch.py "${epoch_args[@]}" --amp bf16 --json "$out/epoch-bf16.json"
echo "gpu.sh: $((SECONDS))s, exit status $status; results in $out"
exit $status
