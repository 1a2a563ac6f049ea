"""Activation memory per sample and step time of one training step, msgsnn beside the floor and the peers.

Activation memory per sample is the growth of the peak resident set from a small batch to a large
one, over the difference in batch size: ``(peak(B_large) - peak(B_small)) / (B_large - B_small)``.
What does not grow with the batch (torch itself, weights, gradients, AdamW state) cancels. Every
measurement runs in a fresh process (no allocator cache carried over). One process's peak moves by
tens of MiB with the state of glibc's heap (freed blocks it keeps resident), so ``--repeats N`` runs
N processes per case and batch, in rounds over the cases, and takes each batch's median peak. The
step time is the median of the timed steps at the large batch. The largest batch that fits
``--budget-gib`` follows from the two points, ``peak(B) = fixed + B * per_sample``, which is what memory does in a step whose
activations all scale with B.

Cases (the networks of ``benchmarks/step.py``; each skipped with a note where its package is missing):

* ``floor``         the same convolutions and BatchNorms as a ReLU network on ``[T*B]``, channels-last
* ``msgsnn``        msgsnn's default path, MSG with mask_p = 0.5
* ``recompute``     msgsnn with ``recompute=True``: saves each block's input spikes as bits, recomputes in backward
* ``spikingjelly``  SpikingJelly's multi-step ``LIFNode``
* ``snntorch``      snnTorch's ``Leaky`` stepped over T
* ``release``       the authors' release (``SpikeNet`` over its ``VGGNet``), only with ``--release PATH`` to its code

    python benchmarks/memory.py                           # VGGSNN, T=10, 2x48x48, B 4 and 16, fp32 and bf16
    python benchmarks/memory.py --budget-gib 16 --release ../msg
    python benchmarks/memory.py --cases floor,msgsnn,recompute --repeats 3   # medians of 3 processes a point
    python benchmarks/memory.py --quick                   # vggsnn_tiny at toy sizes: a check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("floor", "msgsnn", "recompute", "spikingjelly", "snntorch", "release")
RESULT_TAG = "MEMORY-RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="vggsnn", help="a msgsnn model name (default vggsnn)")
    p.add_argument("--batches", default="4,16", help="the small and the large batch (default 4,16)")
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--size", type=int, default=48, help="input height = width")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--repeats", type=int, default=1,
                   help="processes per case and batch, in rounds over the cases; the medians are taken (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    p.add_argument("--budget-gib", type=float, default=16.0, help="memory budget for the largest-batch column")
    p.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    p.add_argument("--release", default=None, help="path to a checkout of the authors' release (Brain-Cog-Lab/msg)")
    p.add_argument("--quick", action="store_true",
                   help="vggsnn_tiny, T=4, 16x16, batches 2,6, fp32, no warm-up, one step: checks the script")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.network, args.T, args.size, args.batches, args.precisions = "vggsnn_tiny", 4, 16, "2,6", "fp32"
        args.steps, args.warmup = 1, 0
    return args


def _step_script():
    """``benchmarks/step.py`` as a module: its networks for the floor and the peers."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("msgsnn_bench_step", HERE / "step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _release_model(args):
    """The release's ``SpikeNet`` over its ``VGGNet`` as its main.py builds it (MSG, p = 0.5), logits ``[1, B, K]``."""
    import torch
    from torch import nn

    sys.path.insert(0, os.path.abspath(args.release))
    from model import VGGNet  # noqa: PLC0415 - the release's own modules, found on its path
    from neuron import LIF
    from snn_model import SpikeNet
    from surrogate import MixedPLGrad

    surrogate = MixedPLGrad(alpha=2.0, requires_grad=False, sub_func="DeltaGrad", sub_prob=0.5, mix_mode="rand")
    ann = VGGNet()
    ann.fc = nn.Linear(ann.fc.in_features, args.classes)
    net = SpikeNet(ann, T=args.T, neuron=LIF(act_func=surrogate, threshold=0.5, tau=2.0), in_channels=args.channels)

    class TimeMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).unsqueeze(0)  # the release averages over T itself

    return TimeMean()  # contiguous, as the release runs: its layers call .view, which channels-last tensors refuse


def build(case: str, args):
    """``(model, after_step)`` for ``case``; the model maps ``[B, T, C, H, W]`` to ``[T, B, K]``."""
    step = _step_script()
    step_args = argparse.Namespace(network=args.network, channels=args.channels, classes=args.classes, T=args.T,
                                   size=args.size, backend="auto")
    if case == "release":
        return _release_model(args), None
    if case == "recompute":
        snn = step._import_msgsnn()
        model = snn.build_model(args.network, in_channels=args.channels, num_classes=args.classes, T=args.T,
                                mask_p=0.5, recompute=True, input_size=args.size)
        return model, None
    return step.build_case("msg" if case == "msgsnn" else case, step_args)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, after_step = build(args.worker, args)
    model = model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((args.batch, args.T, args.channels, args.size, args.size), 0.3), generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    amp = args.precision == "bf16"
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float().mean(0), y).backward()
        opt.step()
        if after_step is not None:
            after_step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"case": args.worker, "precision": args.precision, "batch": args.batch, "peak_bytes": _peak_rss_bytes(),
            "times": times}


def available(case: str, args) -> str | None:
    """None if ``case`` can run, else why not."""
    if case == "release":
        if not args.release:
            return "no --release PATH to the authors' code"
        if not (Path(args.release) / "snn_model.py").is_file():
            return f"--release {args.release}: no snn_model.py there"
        if args.network != "vggsnn" or args.size != 48:
            return "the release's VGGNet is VGGSNN for 48x48 input (--network vggsnn --size 48)"
        return None
    if case in ("spikingjelly", "snntorch"):
        return _step_script().available(case)
    return None


def run_process(case: str, precision: str, batch: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, "--precision", precision, "--batch", str(batch),
           "--network", args.network, "--T", str(args.T), "--size", str(args.size), "--channels", str(args.channels),
           "--classes", str(args.classes), "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    if args.release:
        cmd += ["--release", args.release]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_step_script().worker_env(args.threads))
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"case": case, "precision": precision, "batch": batch, "error": tail}


def summarise(smalls: list[dict], larges: list[dict], budget_bytes: float) -> dict:
    """Per-sample activation bytes, the step time at the large batch, and the largest batch within the budget, from
    the processes run at the small and at the large batch: the median peak of each batch (the allocator's state
    moves one process's peak by tens of MiB), the median of every timed step at the large one. ``range``: the least
    and most per-sample bytes of the repeats, the i-th small process paired with the i-th large one."""
    failed = [r["error"] for r in (*smalls, *larges) if "error" in r]
    if failed:
        return {"error": failed[0]}
    small, large = smalls[0]["batch"], larges[0]["batch"]
    low, high = (statistics.median(r["peak_bytes"] for r in runs) for runs in (smalls, larges))
    per_sample = (high - low) / (large - small)
    fixed = low - small * per_sample
    fits = int((budget_bytes - fixed) // per_sample) if per_sample > 0 else None
    pairs = [(b["peak_bytes"] - a["peak_bytes"]) / (large - small) for a, b in zip(smalls, larges)]
    return {"per_sample": per_sample, "fixed": fixed, "step": statistics.median(t for r in larges for t in r["times"]),
            "max_batch": max(fits, 0) if fits is not None else None, "range": [min(pairs), max(pairs)],
            "repeats": len(pairs)}


def print_table(summary: dict, cases: list[str], precisions: list[str], args, notes: list[str]) -> None:
    large = int(args.batches.split(",")[1])
    print(f"| case | precision | activation MiB / sample | x floor | step at batch {large} (s) | x floor | "
          f"largest batch in {args.budget_gib:g} GiB |")
    print("|---|---|---|---|---|---|---|")
    for case, prec, r, floor in _step_script().table_rows(summary, cases, precisions):
        if "error" in r:
            print(f"| {case} | {prec} | failed: {r['error']} | | | | |")
            continue
        mem = f"{r['per_sample'] / floor['per_sample']:.2f}" if floor.get("per_sample") else "-"
        step = f"{r['step'] / floor['step']:.2f}" if floor.get("step") else "-"
        print(f"| {case} | {prec} | {r['per_sample'] / 2**20:.1f} | {mem} | {r['step']:.2f} | {step} | "
              f"{r['max_batch'] if r['max_batch'] is not None else '-'} |")
    for note in notes:
        print("note:", note)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    cases = list(CASES) if args.cases is None else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        print(f"error: --cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if set(precisions) - {"fp32", "bf16"}:
        print("error: --precisions: choose from fp32,bf16", file=sys.stderr)
        return 2
    try:
        small, large = (int(b) for b in args.batches.split(","))
    except ValueError:
        small = large = 0
    if args.repeats < 1:
        print(f"error: --repeats: expected at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    if not 0 < small < large:
        print(f"error: --batches: expected two batch sizes, small then large (e.g. 4,16), got {args.batches!r}",
              file=sys.stderr)
        return 2
    notes, runnable = [], []
    for case in cases:
        why = available(case, args)
        if why:
            notes.append(f"{case} skipped: {why}")
        else:
            runnable.append(case)
    import torch

    print(f"# {args.network} one AdamW training step, input [B, T={args.T}, {args.channels}, {args.size}, {args.size}], "
          f"CPU, {args.threads} threads, torch {torch.__version__}; activation memory = (peak RSS at B={large} - at "
          f"B={small}) / {large - small}, each in a fresh process (the median of {args.repeats}); {args.warmup} "
          f"warm-up + {args.steps} timed steps", flush=True)
    results, runs = [], {}
    for round_ in range(args.repeats):  # in rounds, so that a change of the host's load falls on every case alike
        for prec in precisions:
            for case in runnable:
                pair = [run_process(case, prec, batch, args) for batch in (small, large)]
                results.extend(pair)
                for kept, result in zip(runs.setdefault((case, prec), ([], [])), pair):
                    kept.append(result)
                r = summarise(*([result] for result in pair), args.budget_gib * 2**30)
                status = r.get("error") or f"{r['per_sample'] / 2**20:.1f} MiB/sample, step {r['step']:.2f} s"
                print(f"  {case:<13} {prec:<5} round {round_ + 1}/{args.repeats}: {status}", file=sys.stderr,
                      flush=True)
    summary = {key: summarise(*pair, args.budget_gib * 2**30) for key, pair in runs.items()}
    if args.repeats > 1:
        notes.append(f"each point the median of {args.repeats} processes; activation MiB / sample over the repeats: "
                     + ", ".join(f"{case} {prec} {r['range'][0] / 2**20:.1f}-{r['range'][1] / 2**20:.1f}"
                                 for (case, prec), r in summary.items() if "range" in r))
    notes.append("peers use joint (T*B) BatchNorm statistics, msgsnn per-step ones; the largest batch assumes "
                 "peak = fixed + batch x per-sample, from the two measured batches")
    print_table(summary, runnable, precisions, args, notes)
    if args.json:
        _step_script().write_json(args.json, args, results, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
