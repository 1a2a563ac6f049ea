"""One training step (forward, backward, AdamW) of a spiking network, msgsnn beside the floor and the peers.

Cases (each in its own process, so every peak-memory figure starts clean):

* ``msg``           msgsnn with MSG, mask_p = 0.5 (the release's setting)
* ``sg``            msgsnn with the plain surrogate gradient (mask_p = 0)
* ``msg_triton_bn`` ``msg`` with the per-step BatchNorm on msgsnn's Triton kernels (``MSGSNN_TRITON_BN=1``)
                    instead of torch's ``batch_norm``; CUDA only (on the CPU it would be ``msg`` again),
                    and there one of the default cases
* ``floor``         the same convolutions and BatchNorms as a plain ReLU network on the
                    folded ``[T*B, C, H, W]`` batch, channels-last: what the convolutions alone cost
* ``spikingjelly``  SpikingJelly's multi-step ``LIFNode`` on the same network (if installed); on CUDA it
                    runs its fastest implementation there (its native CUDA build, else its Triton
                    kernels), and the report names the one it took
* ``snntorch``      snnTorch's ``Leaky`` stepped over T on the same network (if installed)

The processes run in rounds, the order reversed every other round; a case's time is
the median over all its timed steps (after warm-up), its memory the median of its
rounds' peaks (the allocator makes a process's peak vary by a few percent). Peak memory is the growth of the process's peak resident set
(``VmHWM`` after resetting it) over the resident set just before the first step on CPU,
or ``torch.cuda.max_memory_allocated`` minus what was allocated before on CUDA.
It therefore includes gradients and the optimizer state, the same for every case.

    python benchmarks/step.py                      # VGGSNN, B=8, T=10, 2x48x48, CPU, 2 threads
    python benchmarks/step.py --amp bf16           # adds a bf16-autocast run of every case
    python benchmarks/step.py --device cuda --batch 64     # adds msg_triton_bn
    python benchmarks/step.py --compile --cases msg,sg,floor   # adds each case under torch.compile

``--compile`` adds a ``<case>+compile`` run of every case: the model under ``torch.compile`` (the CPU's
default mode; ``reduce-overhead``, CUDA graphs, on CUDA), as ``train.compile`` runs it; its warm-up
steps include the compilation, which is not timed. The notes give each case's compiled speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = ("msg", "sg", "floor", "spikingjelly", "snntorch", "msg_triton_bn")
CUDA_ONLY = ("msg_triton_bn",)
MSGSNN_CASES = ("msg", "sg", "msg_triton_bn")
RESULT_TAG = "STEP-RESULT "
COMPILED = "+compile"  # the suffix of a case run under torch.compile


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", default="vggsnn", help="a msgsnn model name (default vggsnn)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--T", type=int, default=10)
    p.add_argument("--size", type=int, default=48, help="input height = width")
    p.add_argument("--channels", type=int, default=2, help="input channels (2 for DVS polarities)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="bf16: also run every case under bf16 autocast and report the speed-up")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (>= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per case; order reversed every other round")
    p.add_argument("--cases", default=None,
                   help=f"comma-separated subset of {','.join(CASES)} (default: all; {','.join(CUDA_ONLY)} on CUDA only)")
    p.add_argument("--backend", default="auto", help="msgsnn LIF backend for the msg/sg cases")
    p.add_argument("--compile", action="store_true", help="also run every case under torch.compile (<case>+compile)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- worker side

def _import_msgsnn():
    try:
        import msgcli.snn as snn
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import msgcli.snn as snn
    return snn


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system (page faults are system time)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _replace(module, kind, make) -> None:
    """Swap every child of type ``kind`` (recursively) for ``make(child)``."""
    for name, child in module.named_children():
        if isinstance(child, kind):
            setattr(module, name, make(child))
        else:
            _replace(child, kind, make)


def _time_loop(cell):
    """Step a single-step neuron over ``[T, B, ...]``, one layer at a time (snnTorch's usage)."""
    import torch

    class TimeLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, x):
            mem, out = torch.zeros_like(x[0]), []
            for t in range(x.shape[0]):
                spk, mem = self.cell(x[t], mem)
                out.append(spk)
            return torch.stack(out)

    return TimeLoop()


def build_case(case: str, args):
    """Return ``(model, after_step)``; the model maps ``[B, T, C, H, W]`` to ``[T, B, K]``."""
    import torch
    from torch import nn

    snn = _import_msgsnn()
    p = 0.5 if case in ("msg", "msg_triton_bn") else 0.0
    model = snn.build_model(args.network, in_channels=args.channels, num_classes=args.classes, T=args.T,
                            mask_p=p, backend=args.backend if case in MSGSNN_CASES else "auto",
                            **({"input_size": args.size} if args.network.startswith("vgg") else {}))
    after_step = None
    if case == "floor":
        # a plain network on the folded batch: no time axis anywhere, BatchNorm2d, in-place ReLU
        _replace(model, snn.Folded, lambda m: m.module)
        _replace(model, snn.TemporalBatchNorm, lambda m: nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum))
        _replace(model, snn.LIF, lambda m: nn.ReLU(inplace=True))
        spiking = model

        class Floor(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = spiking

            def forward(self, x):
                folded = self.net.encode(x).flatten(0, 1).contiguous(memory_format=torch.channels_last)
                return self.net.forward_time(folded).view(x.shape[1], x.shape[0], -1)

        model = Floor()
    elif case == "spikingjelly":
        from spikingjelly.activation_based import functional, neuron, surrogate

        def joint_bn(m):
            return snn.TemporalBatchNorm(m.num_features, mode="joint", eps=m.eps, momentum=m.momentum)
        _replace(model, snn.TemporalBatchNorm, joint_bn)
        _replace(model, snn.LIF, lambda m: neuron.LIFNode(
            tau=m.tau, v_threshold=m.v_threshold, surrogate_function=surrogate.ATan(alpha=2.0),
            detach_reset=False, step_mode="m"))
        after_step = lambda: functional.reset_net(model)  # noqa: E731
    elif case == "snntorch":
        import snntorch
        from snntorch import surrogate

        def joint_bn(m):
            return snn.TemporalBatchNorm(m.num_features, mode="joint", eps=m.eps, momentum=m.momentum)
        _replace(model, snn.TemporalBatchNorm, joint_bn)
        _replace(model, snn.LIF, lambda m: _time_loop(snntorch.Leaky(
            beta=1.0 - 1.0 / m.tau, threshold=m.v_threshold, spike_grad=surrogate.atan(alpha=2.0),
            reset_mechanism="zero")))
    if case in ("floor", "spikingjelly", "snntorch"):
        model = model.to(memory_format=torch.channels_last)  # conv weights; activations follow
    return model, after_step


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    case = args.worker.removesuffix(COMPILED)
    model, after_step = build_case(case, args)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = args.worker.endswith(COMPILED)
    if compiled:
        model = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.full((args.batch, args.T, args.channels, args.size, args.size), 0.3), generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    amp = args.precision == "bf16"

    def step():
        opt.zero_grad(set_to_none=True)
        if compiled:  # a new step for CUDA graphs; eager, the call would only import inductor (2 s, in a timed step)
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().mean(0), y)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        peak_reset = _reset_peak_rss()
        base = _rss_kib("VmRSS") * 1024
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(_cpu_seconds() - c0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base if peak_reset else float("nan")
    return {"case": args.worker, "precision": args.precision, "times": times, "cpu_times": cpu_times, "peak_bytes": peak,
            "backend": backend_used(case, device)}


def backend_used(case: str, device) -> str:
    """Which implementation ran the neurons (and msgsnn's per-step BatchNorm) in this worker."""
    if case in MSGSNN_CASES:
        from msgcli.snn import kernels

        if device.type == "cuda":
            if kernels.CUDA.fused_kernels() is None:
                return "torch operators (Triton off, see stderr)"
            if kernels.triton_batchnorm():
                return "Triton kernels (LIF and BatchNorm)"
            return "Triton kernels (LIF), torch's batch_norm (BatchNorm)"
        return "C kernels" if kernels.CPU.fused_kernels() is not None else "torch operators"
    if case == "spikingjelly":
        # SpikingJelly 2.0 has no backend argument: on CUDA it takes its native CUDA build if there is one, else
        # its Triton kernels, else torch operators (SJ_LIF_CUDA_IMPLEMENTATION overrides); ask which it took.
        from spikingjelly.activation_based.functional import neuron_implementation

        info = neuron_implementation("lif", device)
        skipped = "; ".join(f"{name} unavailable: {why.splitlines()[0]}" for name, why in info["unavailable"].items())
        return info["implementation"] + (f" ({skipped})" if skipped else "")
    if case == "snntorch":
        return "torch operators, stepped over T"
    return "torch operators (cuDNN/oneDNN convolutions and BatchNorm)"


# --------------------------------------------------------------------------- driver side

def available(case: str) -> str | None:
    """None if the case can run, else why not."""
    module = {"spikingjelly": "spikingjelly.activation_based.neuron", "snntorch": "snntorch"}.get(case)
    if module is None:
        return None
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"not importable ({last}); install with `pip install -e .[bench]`"
    return None


def run_process(case: str, precision: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, "--precision", precision,
           "--network", args.network, "--batch", str(args.batch), "--T", str(args.T), "--size", str(args.size),
           "--channels", str(args.channels), "--classes", str(args.classes), "--threads", str(args.threads),
           "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup), "--backend", args.backend]
    env = worker_env(args.threads, MSGSNN_TRITON_BN="1" if case == "msg_triton_bn" else "0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"case": case, "precision": precision, "error": tail}


def summarise(results: list[dict]) -> dict:
    by_key: dict[tuple, dict] = {}
    for r in results:
        key = (r["case"], r["precision"])
        entry = by_key.setdefault(key, {"times": [], "cpu": [], "peaks": [], "errors": []})
        if "error" in r:
            entry["errors"].append(r["error"])
        else:
            entry["times"].extend(r["times"])
            entry["cpu"].extend(r["cpu_times"])
            entry["peaks"].append(r["peak_bytes"])
    out = {}
    for key, e in by_key.items():
        if e["times"]:
            out[key] = {"time": statistics.median(e["times"]), "min": min(e["times"]), "max": max(e["times"]),
                        "cpu": statistics.median(e["cpu"]), "n": len(e["times"]), "peak": statistics.median(e["peaks"])}
        else:
            out[key] = {"error": e["errors"][-1]}
    return out


def table_rows(summary: dict, cases: list[str], precisions: list[str]):
    """``(case, precision, result, floor's result)`` for every case measured, precision by precision."""
    for prec in precisions:
        floor = summary.get(("floor", prec), {})
        for case in cases:
            if (case, prec) in summary:
                yield case, prec, summary[(case, prec)], floor


def worker_env(threads: int, **extra: str) -> dict:
    """The environment of a worker process: ``threads`` threads, waiting as msgsnn's processes do (sleeping OpenMP
    threads), the peers included."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **extra)


def print_table(summary: dict, cases: list[str], precisions: list[str], notes: list[str]) -> None:
    header = (f"{'case':<14}{'prec':<6}{'step s':>9}{'(min-max)':>16}{'x floor':>9}"
              f"{'cpu s':>8}{'x floor':>9}{'peak MB':>9}{'x floor':>9}")
    if "bf16" in precisions:
        header += f"{'bf16 speed-up':>15}"
    print(header)
    print("-" * len(header))
    for case, prec, r, floor in table_rows(summary, cases, precisions):
        if "error" in r:
            print(f"{case:<14}{prec:<6}  failed: {r['error']}")
            continue
        tr = f"{r['time'] / floor['time']:.2f}" if "time" in floor else "-"
        cr = f"{r['cpu'] / floor['cpu']:.2f}" if "cpu" in floor else "-"
        mr = f"{r['peak'] / floor['peak']:.2f}" if "peak" in floor else "-"
        line = (f"{case:<14}{prec:<6}{r['time']:>9.3f}{'(' + format(r['min'], '.3f') + '-' + format(r['max'], '.3f') + ')':>16}"
                f"{tr:>9}{r['cpu']:>8.2f}{cr:>9}{r['peak'] / 2**20:>9.0f}{mr:>9}")
        if prec == "bf16":
            fp32 = summary.get((case, "fp32"), {})
            line += f"{fp32['time'] / r['time']:>14.2f}x" if "time" in fp32 else f"{'-':>15}"
        print(line)
    for note in notes:
        print("note:", note)


def compile_speedups(summary: dict, cases: list[str], precisions: list[str]) -> list[str]:
    """One note per compiled case: its step time against the same case's eager one."""
    notes = []
    for prec in precisions:
        for case in cases:
            compiled, eager = summary.get((case, prec), {}), summary.get((case.removesuffix(COMPILED), prec), {})
            if case.endswith(COMPILED) and "time" in compiled and "time" in eager:
                notes.append(f"{case} {prec}: {compiled['time']:.3f} s a step against {eager['time']:.3f} s eager, "
                             f"{eager['time'] / compiled['time']:.2f}x (cpu s {eager['cpu'] / compiled['cpu']:.2f}x)")
    return notes


def write_json(path: str, args, results: list[dict], summary: dict) -> None:
    """The arguments, every process's result and the summary by ``case/precision``, for ``--json``."""
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": results,
                   "summary": {f"{c}/{p}": v for (c, p), v in summary.items()}}, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return 0
    if args.cases is None:
        cases = [c for c in CASES if args.device == "cuda" or c not in CUDA_ONLY]
    else:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.steps < 5:
        print("note: --steps below 5 gives a noisy median", file=sys.stderr)
    notes, runnable = [], []
    for case in cases:
        why = available(case)
        if why:
            notes.append(f"{case} skipped: {why}")
        else:
            runnable.append(case)
    if args.compile:
        runnable += [case + COMPILED for case in runnable]
    precisions = ["fp32"] + (["bf16"] if args.amp == "bf16" else [])
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible to torch here; run on a GPU machine or use --device cpu",
              file=sys.stderr)
        return 2

    print(f"# {args.network} one training step, input [B={args.batch}, T={args.T}, {args.channels}, {args.size}, {args.size}], "
          f"device={args.device}, threads={args.threads}, torch {torch.__version__}, "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds", flush=True)
    jobs = [(c, p) for p in precisions for c in runnable]
    results, backends = [], {}
    for r in range(args.rounds):
        for case, prec in (jobs if r % 2 == 0 else jobs[::-1]):
            res = run_process(case, prec, args)
            status = res.get("error") or f"median {statistics.median(res['times']):.3f} s, peak {res['peak_bytes'] / 2**20:.0f} MB"
            print(f"  round {r + 1}: {case:<13} {prec:<5} {status}", file=sys.stderr, flush=True)
            results.append(res)
            if "backend" in res and case not in backends:
                backends[case] = res["backend"]
    summary = summarise(results)
    notes.extend(f"{case} ran on: {backend}" for case, backend in backends.items())
    if backends.get("spikingjelly", "").startswith("torch") and args.device == "cuda":
        notes.append("spikingjelly fell back to torch operators on CUDA: its Triton kernels need the triton package")
    notes.append("peers use joint (T*B) BatchNorm statistics, msgsnn its default per-step statistics; "
                 "peak = growth of peak memory during the steps (includes grads and AdamW state); "
                 "cpu s = process CPU time per step (user + system), steadier than wall time on a busy machine")
    notes.extend(compile_speedups(summary, runnable, precisions))
    print_table(summary, runnable, precisions, notes)
    if args.json:
        write_json(args.json, args, results, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
