"""The benchmark scripts run and compute what they claim (their timings are not asserted: shared machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_gpu_model_counts_the_bytes_and_flops_of_vggsnn(tmp_path, capsys):
    """The H200 yardstick for dvs-vgg from shapes alone: FLOPs by hand over the layers, LIF bytes from the activations."""
    gpu_model = load_script("benchmarks/gpu_model.py")
    out = tmp_path / "model.json"
    assert gpu_model.main(["--presets", "dvs-vgg", "--batch", "4", "--json", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert "spiking layers (LIF + BatchNorm)" in capsys.readouterr().out
    TB = 10 * 4
    convs = [(2, 64, 48), (64, 128, 48), (128, 256, 24), (256, 256, 24), (256, 512, 12), (512, 512, 12),
             (512, 512, 6), (512, 512, 6)]  # (in, out, size) of VGGSNN's 3x3 convolutions at 48x48
    forward = sum(2 * TB * size * size * cout * cin * 9 for cin, cout, size in convs)
    assert r["parts"]["conv forward"]["flops"] == forward
    assert r["parts"]["conv backward"]["flops"] == 2 * forward - 2 * TB * 48 * 48 * 64 * 2 * 9  # no input grad of the data
    lif_elements = sum(TB * size * size * cout for _, cout, size in convs)
    assert r["parts"]["LIF forward"]["bytes_kernels"] == 3 * 2 * lif_elements  # bf16: x in, spikes and H out
    assert r["parts"]["BN backward"]["bytes_kernels"] == 5 * 2 * lif_elements
    assert r["parts"]["BN backward"]["bytes_min"] == 3 * 2 * lif_elements
    assert r["launch_count"]["triton"] == 8 * 2 + 8 * 4  # per step: LIF forward + backward, BN two each way
    counted = r["launch_count"]["torch_ops"]
    assert counted["convolution"] == 8 and counted["randint"] == 8  # every conv once; a mask key per LIF backward
    assert not {"view", "permute", "expand", "empty_like", "detach", "lif", "lif_backward"} & set(counted)
    n, d = r["launch_count"], r["dispatch"]
    assert d["eager_launches"] == n["triton"] + n["torch"] + n["loss"] + n["optimizer"]
    assert d["graph_launches"] == 2 + n["loss"] + n["optimizer"] < d["eager_launches"] / 10
    assert d["eager_ms"] == pytest.approx(d["eager_launches"] * gpu_model.LAUNCH_US / 1e3)
    assert 0 < r["spiking_share_min"] < r["spiking_share_kernels"] < 1
    assert r["step_ms_kernels"] == pytest.approx(sum(p["seconds_kernels"] for p in r["parts"].values()) * 1e3)
    lif_rows = [row for row in r["launches"] if row["kernel"] == "LIF"]
    shapes = list(dict.fromkeys((c, s) for _, c, s in convs))  # one row per distinct LIF shape
    assert [row["programs"] for row in lif_rows] == [-(-4 * c * s * s // 1024) for c, s in shapes]


GPU_SH_FILES = {"device.txt", "gpu_model.txt", "test_cuda.log", "step.log", "step.json", "epoch.log", "epoch.json",
                "epoch-bf16.json"}


def _gpu_sh(tmp_path, **env):
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.sh"
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_sh_without_cuda_stops_at_once_with_one_line_naming_cuda(tmp_path):
    done = _gpu_sh(tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error:") and "CUDA" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_sh_runs_every_stage_on_the_cpu(tmp_path):
    """GPU_CHECK=cpu: the same stages at toy sizes, so a renamed flag or a broken stage shows before a GPU is lent."""
    done = _gpu_sh(tmp_path, GPU_CHECK="cpu")
    assert done.returncode == 0, done.stdout[-3000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == GPU_SH_FILES  # the device tool brings back 8 files at most
    step = json.loads((out / "step.json").read_text())
    assert {key.split("/")[0] for key in step["summary"]} >= {"msg", "floor", "msg_triton_bn"}
    assert "msg ran on: C kernels" in (out / "step.log").read_text()
    assert json.loads((out / "epoch-bf16.json").read_text())[0]["amp"] == "bf16"
    assert "spiking layers (LIF + BatchNorm)" in (out / "gpu_model.txt").read_text()


def test_an_eager_step_worker_leaves_the_cuda_graph_trees_unimported():
    """Only a compiled case marks CUDA-graph steps: eagerly, the call would import inductor's CUDA graph trees (2 s)
    inside a timed step."""
    code = ("import sys; from tests.conftest import load_script; step = load_script('benchmarks/step.py'); "
            "step.main(['--worker', 'msg', '--network', 'vggsnn_tiny', '--batch', '2', '--T', '2', '--size', '16', "
            "'--steps', '1', '--warmup', '0']); "
            "print('cudagraph_trees', 'torch._inductor.cudagraph_trees' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=README.parent, check=True)
    assert done.stdout.splitlines()[-1] == "cudagraph_trees False"


def test_step_benchmark_names_the_implementation_each_case_ran_on():
    step = load_script("benchmarks/step.py")
    cpu = torch.device("cpu")
    from msgcli.snn import kernels

    assert step.backend_used("msg", cpu) == ("C kernels" if kernels.C_KERNELS.get() is not None else "torch operators")
    pytest.importorskip("spikingjelly")
    assert step.backend_used("spikingjelly", cpu) == "torch-reference"  # SpikingJelly 2.0's own name for it


def test_memory_benchmark_takes_the_growth_between_two_batches_and_fits_the_budget(tmp_path):
    memory = load_script("benchmarks/memory.py")
    mib = 2**20
    small = {"batch": 4, "peak_bytes": 1000 * mib, "times": [9.0]}
    large = {"batch": 16, "peak_bytes": 1000 * mib + 12 * 50 * mib, "times": [3.0, 2.0, 4.0]}
    r = memory.summarise([small], [large], budget_bytes=2000 * mib)
    assert r["per_sample"] == 50 * mib and r["fixed"] == 800 * mib and r["step"] == 3.0
    assert r["max_batch"] == 24  # 800 MiB + 24 x 50 MiB = 2000 MiB
    assert r["range"] == [50 * mib, 50 * mib] and r["repeats"] == 1
    assert memory.summarise([small], [{"error": "boom"}, large], 1.0) == {"error": "boom"}
    args = memory.parse_args(["--release", "/nonexistent"])
    assert "no snn_model.py" in memory.available("release", args)
    assert "--release" in memory.available("release", memory.parse_args([]))
    release = tmp_path / "release"
    release.mkdir()
    (release / "snn_model.py").write_text("")
    assert memory.available("release", memory.parse_args(["--release", str(release)])) is None
    assert "48x48" in memory.available("release", memory.parse_args(["--release", str(release), "--quick"]))


def test_memory_benchmark_takes_the_median_peak_of_each_batch_over_repeats():
    memory = load_script("benchmarks/memory.py")
    mib = 2**20
    smalls = [{"batch": 4, "peak_bytes": p * mib, "times": [1.0]} for p in (1000, 1060, 1010)]
    larges = [{"batch": 16, "peak_bytes": p * mib, "times": t} for p, t in ((1600, [5.0]), (1630, [3.0, 4.0]),
                                                                           (1720, [9.0]))]
    r = memory.summarise(smalls, larges, budget_bytes=2000 * mib)
    assert r["per_sample"] == (1630 - 1010) / 12 * mib  # medians 1010 and 1630, not the mean nor one pair
    assert r["fixed"] == pytest.approx((1010 - 4 * (1630 - 1010) / 12) * mib)
    assert r["step"] == 4.5  # the median of every timed step at the large batch
    assert r["range"] == [(1630 - 1060) / 12 * mib, (1720 - 1010) / 12 * mib] and r["repeats"] == 3
    assert memory.main(["--repeats", "0"]) == 2


def test_memory_benchmark_quick_runs_recompute_in_fresh_processes(tmp_path, capsys):
    memory = load_script("benchmarks/memory.py")
    out = tmp_path / "memory.json"
    assert memory.main(["--quick", "--cases", "recompute", "--repeats", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| recompute | fp32 |" in printed and "the median of 2 processes" in printed
    data = json.loads(out.read_text())
    assert [(r["case"], r["batch"]) for r in data["results"]] == [("recompute", 2), ("recompute", 6)] * 2
    summary = data["summary"]["recompute/fp32"]
    peaks = [r["peak_bytes"] for r in data["results"]]
    assert summary["step"] > 0 and summary["repeats"] == 2 and summary["per_sample"] == pytest.approx(
        ((peaks[1] + peaks[3]) / 2 - (peaks[0] + peaks[2]) / 2) / 4)
    assert memory.main(["--cases", "nope"]) == 2
