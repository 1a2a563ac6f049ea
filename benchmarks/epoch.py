"""Expected training time per epoch of each paper preset, from timed steps on random input.

For the README's reproduction table: a preset's epoch is (training samples / batch) steps of
forward, loss, backward and optimizer on the preset's model, batch, T, input size, neuron, TWO
and mixed precision, built by msgsnn's own engine functions; the input is random data of the
dataset's shape, so no dataset is needed. Data loading and the test pass are not included (on a
GPU with cached frames the loader keeps up; see ``benchmarks/data.py``).

    python benchmarks/epoch.py --device cuda                   # every paper preset
    python benchmarks/epoch.py --presets dvs-vgg,cifar10-cifarnet --device cuda --amp bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`

from msgcli import config as config_io  # noqa: E402
from msgcli.engine.build import build_model_from_config, build_optimizer, build_two, compute_loss  # noqa: E402
from msgcli.engine.evaluate import autocast  # noqa: E402

# training samples (msgsnn's splits), classes, input kind; N-Caltech101: 90% of each class of 8,709
DATASETS = {
    "cifar10dvs": (9000, 10, "events"),
    "ncaltech101": (7838, 101, "events"),
    "dvsgesture": (1077, 11, "events"),
    "nmnist": (60000, 10, "events"),
    "cifar10": (50000, 10, "images"),
    "cifar100": (50000, 100, "images"),
    "imagenet": (1281167, 1000, "images"),
}
PAPER_PRESETS = ("dvs-vgg", "dvs-resnet18", "ncaltech-vgg", "ncaltech-resnet18", "cifar10-cifarnet",
                 "cifar10-cifarnet-noaa", "cifar100-cifarnet", "cifar100-resnet18", "imagenet-sew34",
                 "imagenet-sew18-release")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PAPER_PRESETS), help="comma-separated preset names")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"), help="default: each preset's own")
    p.add_argument("--batch", type=int, default=None, help="default: each preset's own")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def time_preset(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = config_io.load_preset(name)
    if args.batch:
        cfg.train.batch_size = args.batch
    amp = args.amp or cfg.train.amp
    samples, classes, kind = DATASETS[cfg.data.name]
    B, size = cfg.train.batch_size, cfg.data.size
    channels = 2 if kind == "events" else 3
    shape = (B, cfg.T, channels, size, size) if kind == "events" else (B, channels, size, size)
    model = build_model_from_config(cfg, channels, classes).to(device).train()
    two = build_two(cfg).to(device)
    optimizer = build_optimizer(cfg, model.parameters(), world_size=1)
    inputs = torch.rand(shape, device=device)
    targets = torch.randint(0, classes, (B,), device=device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, amp):
            logits = model(inputs)
        loss = compute_loss(logits.float(), targets, two, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    steps = -(-samples // B)
    return {"preset": name, "model": cfg.model.name, "batch": B, "T": cfg.T, "input": list(shape[1:]), "amp": amp,
            "step_s": step_s, "steps_per_epoch": steps, "epoch_min": step_s * steps / 60}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible to torch here; run on a GPU machine or use --device cpu",
              file=sys.stderr)
        return 2
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        for name in presets:
            config_io.load_preset(name)
    except config_io.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# one training step per preset on random input, {where}, torch {torch.__version__}, "
          f"median of {args.steps} steps after {args.warmup}; epoch = steps x training samples / batch")
    print(f"{'preset':<24}{'model':<14}{'batch':>6}{'T':>4}{'amp':>6}{'step s':>9}{'steps':>8}{'epoch min':>11}")
    rows = []
    for name in presets:
        row = time_preset(name, args, device) | {"device": where}  # msgsnn reproduce names it in its plan
        rows.append(row)
        print(f"{name:<24}{row['model']:<14}{row['batch']:>6}{row['T']:>4}{row['amp']:>6}{row['step_s']:>9.3f}"
              f"{row['steps_per_epoch']:>8}{row['epoch_min']:>11.2f}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
