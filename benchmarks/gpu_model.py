"""The GPU training step on paper: the least time each part of a step can take on an H200.

For a preset's model at its batch (VGGSNN and ResNet18 on DVS-CIFAR10, B = 64, T = 10, 2x48x48, by
default), one forward pass on the meta device (no memory, no GPU) gives every layer's activation
shape. From the shapes:

* convolutions and the linear readout: FLOPs of the forward, input-gradient and weight-gradient
  passes, and the bytes of their inputs, weights and outputs;
* LIF and per-step BatchNorm: the bytes each kernel must move (every input read once, every output
  written once, in the activation dtype) and the bytes msgsnn's Triton kernels move (their loads
  and stores of activation-sized tensors, read off ``msgcli/snn/kernels/cuda.py``: ``KERNEL_ACCESSES``;
  the BatchNorm figures are those of its Triton kernels, which ``MSGSNN_TRITON_BN=1`` selects: by
  default CUDA runs torch's own ``batch_norm``, and ``benchmarks/step.py`` measures both);
* the rest: pooling, residual sums, the input copies, AdamW and the bf16 weight casts.

A part's bound is ``max(FLOPs / peak, bytes / bandwidth)``, summed over its kernels, with the H200
figures below: every kernel at the bandwidth or tensor-core limit, launch gaps and caches ignored.
The report gives the share of the step that the spiking layers (LIF + BatchNorm) take at that bound,
the same network with ReLU in place of the LIF (the ``floor`` of ``benchmarks/step.py``), and what
the Triton kernels' launch grids and tiles imply for each layer shape. A measured step on an H200 is
compared with this: the bound is what no implementation can beat.

Launches: one training step's GPU launches are counted on meta (Triton kernels, and torch operators
less views and metadata-only ones; msgsnn's ``torch.ops.msgcli`` operators count the launches of
their implementation), and priced at an assumed host cost each: eager, and under CUDA graphs
(``--compile``), where the model's forward and backward are one replay each and only the loss and
fused AdamW launch on their own.

    python benchmarks/gpu_model.py                                # every paper preset, bf16
    python benchmarks/gpu_model.py --presets dvs-vgg --precision fp32 --layers
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parent))

from epoch import DATASETS  # noqa: E402

from msgcli import config as config_io  # noqa: E402
from msgcli.engine.build import build_model_from_config  # noqa: E402
from msgcli.engine.reproduce import table_presets  # noqa: E402
from msgcli.snn import LIF, Folded, TemporalBatchNorm, kernels  # noqa: E402
from msgcli.snn.kernels import cuda, ops  # noqa: E402

# NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e at 4.8 TB/s; BF16 Tensor Core 1,979 TFLOPS
# and TF32 Tensor Core 989 TFLOPS, both "with sparsity", i.e. 989 and 494.5 dense. 132 SMs: the H100 SXM5
# configuration of the GH100 chip (NVIDIA H100 whitepaper), as torch reports on the H200 lent here.
H200_HBM_BYTES_PER_S = 4.8e12
H200_DENSE_TENSOR_FLOPS = {"bf16": 989e12, "fp32": 494.5e12}  # fp32 convolutions run as TF32 (torch's default)
H200_SMS = 132
BYTES = {"bf16": 2, "fp32": 4}

# Loads and stores of activation-sized tensors per element and call, from the kernels in kernels/cuda.py
# (the [T, C] coefficients and the per-split partial sums are left out: they are tiny and stay in cache).
KERNEL_ACCESSES = {
    "LIF forward": (1, 2),  # _lif_forward_kernel: x in; spikes and H out (SAVE_H when training)
    "LIF backward": (2, 1),  # _lif_backward_kernel: grad and H in; input gradient out
    "BN forward": (2, 1),  # _bn_sums_kernel (PRODUCT=False): x; _bn_map_kernel (BACKWARD=False): x in, y out
    "BN backward": (4, 1),  # _bn_sums_kernel (PRODUCT=True): dy, x; _bn_map_kernel (BACKWARD=True): dy, x in, dx out
}
# The least each must move: every input read once and every output written once.
MINIMUM_ACCESSES = {"LIF forward": (1, 2), "LIF backward": (2, 1), "BN forward": (1, 1), "BN backward": (2, 1)}
RELU_ACCESSES = {"forward": (1, 1), "backward": (2, 1)}  # in place; backward reads dy and the output
ADAMW_BYTES_PER_PARAM = 7 * 4  # reads parameter, gradient, both moments; writes parameter and moments (fp32)
FUSED_ADAMW_LAUNCHES = 2  # torch's fused AdamW: one _foreach_add_ of the step counts, one _fused_adamw_
LAUNCH_US = 5.0  # assumed cost of one eager launch (CPU dispatch), an order of magnitude to be measured on the GPU
# aten operators that launch no GPU work (views, allocations, metadata, host reads)
NOT_LAUNCHES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
                "reshape", "_reshape_alias", "permute", "as_strided", "expand", "t", "transpose", "unsqueeze",
                "squeeze", "select", "slice", "detach", "detach_", "alias", "lift_fresh", "unbind", "split", "chunk", "item", "_local_scalar_dense", "is_same_size", "_record_function_enter_new",
                "_record_function_exit"}


@dataclass
class Part:
    """FLOPs and bytes of one part of the step, and its least time at the H200's limits."""

    flops: float = 0.0
    bytes_min: float = 0.0
    bytes_kernels: float = 0.0
    seconds_min: float = 0.0
    seconds_kernels: float = 0.0

    def add(self, flops: float, bytes_min: float, bytes_kernels: float, peak: float) -> None:
        self.flops += flops
        self.bytes_min += bytes_min
        self.bytes_kernels += bytes_kernels
        self.seconds_min += max(flops / peak, bytes_min / H200_HBM_BYTES_PER_S)
        self.seconds_kernels += max(flops / peak, bytes_kernels / H200_HBM_BYTES_PER_S)


@dataclass
class Layer:
    kind: str  # conv, linear, bn, lif, pool, add, input
    shape_in: tuple
    shape_out: tuple
    module: nn.Module | None = field(default=None, repr=False)


def trace_layers(model: nn.Module, shape: tuple) -> list[Layer]:
    """Every layer the forward pass runs, in order, with its ``[T, B, ...]`` input and output shapes (meta device)."""
    layers: list[Layer] = []

    def hook(module, inputs, output):
        shape_in, shape_out = tuple(inputs[0].shape), tuple(output.shape)
        if isinstance(module, Folded):
            inner = module.module
            kind = ("conv" if isinstance(inner, nn.Conv2d) else "linear" if isinstance(inner, nn.Linear)
                    else "pool" if shape_in != shape_out and not isinstance(inner, nn.Flatten) else None)
            if kind:
                layers.append(Layer(kind, shape_in, shape_out, inner))
        elif isinstance(module, TemporalBatchNorm):
            layers.append(Layer("bn", shape_in, shape_out, module))
        elif isinstance(module, LIF):
            layers.append(Layer("lif", shape_in, shape_out, module))
        elif type(module).__name__ in ("BasicBlock", "SEWBlock"):
            layers.append(Layer("add", shape_out, shape_out, module))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            x = torch.empty(shape, device="meta")
            layers.append(Layer("input", tuple(shape), tuple(shape)))
            model(x)
    finally:
        for h in handles:
            h.remove()
    return layers


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def step_parts(model: nn.Module, layers: list[Layer], precision: str) -> dict[str, Part]:
    """FLOPs, bytes and bound of each part of one training step (forward, backward, AdamW)."""
    e = BYTES[precision]
    peak = H200_DENSE_TENSOR_FLOPS[precision]
    names = ("conv forward", "conv backward", "BN forward", "BN backward", "LIF forward", "LIF backward",
             "pool, add, readout, input", "AdamW, weight casts")
    parts = {name: Part() for name in names}
    first_conv = True
    for layer in layers:
        n_in, n_out = _numel(layer.shape_in), _numel(layer.shape_out)
        if layer.kind in ("conv", "linear"):
            w = layer.module.weight
            flops = 2.0 * n_out * w[0].numel()  # a multiply-add per output and weight of its receptive field
            io = (n_in + n_out + w.numel()) * e  # each pass reads two of input, output, weight and writes the third
            conv = layer.kind == "conv"
            parts["conv forward" if conv else "pool, add, readout, input"].add(flops, io, io, peak)
            passes = 1 if first_conv else 2  # weight gradient; input gradient too, except for the data's
            for _ in range(passes):
                parts["conv backward" if conv else "pool, add, readout, input"].add(flops, io, io, peak)
            first_conv = False
        elif layer.kind in ("bn", "lif"):
            prefix = "BN" if layer.kind == "bn" else "LIF"
            for direction in ("forward", "backward"):
                name = f"{prefix} {direction}"
                ideal, kernels = sum(MINIMUM_ACCESSES[name]) * n_in * e, sum(KERNEL_ACCESSES[name]) * n_in * e
                parts[name].add(0.0, ideal, kernels, peak)
        elif layer.kind == "pool":
            other = (n_in + n_out) * e * 2  # forward reads the input, writes the output; backward the reverse
            if isinstance(layer.module, nn.MaxPool2d):
                other += n_out * 8 * 2  # int64 indices written in forward, read in backward
            parts["pool, add, readout, input"].add(0.0, other, other, peak)
        elif layer.kind == "add":
            # forward: two summands in, the sum out; backward: the gradients of the two paths summed at the fork
            parts["pool, add, readout, input"].add(0.0, 6 * n_out * e, 6 * n_out * e, peak)
        elif layer.kind == "input":
            copies = 2 * 2 * n_in * 4  # about: [B, T] -> [T, B] and to channels-last, float32
            parts["pool, add, readout, input"].add(0.0, copies, copies, peak)
    params = sum(p.numel() for p in model.parameters())
    casts = params * ((4 + 2) + (2 + 2 + 4)) if precision == "bf16" else 0  # weights to bf16; bf16 grads to fp32
    parts["AdamW, weight casts"].add(0.0, params * ADAMW_BYTES_PER_PARAM + casts,
                                     params * ADAMW_BYTES_PER_PARAM + casts, peak)
    return parts


def relu_floor_seconds(layers: list[Layer], precision: str) -> float:
    """The LIF layers' bound if they were in-place ReLUs (the floor network of benchmarks/step.py)."""
    e = BYTES[precision]
    n = sum(_numel(layer.shape_in) for layer in layers if layer.kind == "lif")
    return sum(sum(a) for a in RELU_ACCESSES.values()) * n * e / H200_HBM_BYTES_PER_S


def launch_rows(layers: list[Layer], precision: str) -> list[dict]:
    """Grid and tile of the Triton kernels for each distinct LIF and BatchNorm shape, from kernels/cuda.py's own choices."""
    e = BYTES[precision]
    rows, seen = [], set()
    for layer in layers:
        if layer.kind not in ("bn", "lif") or (layer.kind, layer.shape_in) in seen:
            continue
        seen.add((layer.kind, layer.shape_in))
        count = sum(1 for other in layers if (other.kind, other.shape_in) == (layer.kind, layer.shape_in))
        T, B, C = layer.shape_in[:3]
        per_step = _numel(layer.shape_in[1:])
        if layer.kind == "lif":
            programs = cuda.cdiv(per_step, cuda.LIF_BLOCK)
            rows.append({
                "kernel": "LIF", "shape": layer.shape_in, "layers": count,
                "grid": f"({programs},)", "programs": programs,
                "per_thread": cuda.LIF_BLOCK // (32 * cuda.LIF_WARPS),
                "lanes_used": per_step / (programs * cuda.LIF_BLOCK),
                "fwd_bytes_per_element": sum(KERNEL_ACCESSES["LIF forward"]) * e,
                "bwd_bytes_per_element": sum(KERNEL_ACCESSES["LIF backward"]) * e,
            })
        else:
            M = per_step // C
            block = cuda.bn_channel_block(C)
            splits, rows_per_split = cuda.bn_sums_split(T, M, C)
            channel_blocks = cuda.cdiv(C, block)
            map_programs = cuda.cdiv(M, cuda.BN_ROWS) * T * channel_blocks
            sum_programs = T * channel_blocks * splits
            rows.append({
                "kernel": "BN", "shape": layer.shape_in, "layers": count,
                "grid": f"sums ({T}, {channel_blocks}, {splits}) x {rows_per_split} rows; "
                        f"map ({cuda.cdiv(M, cuda.BN_ROWS)}, {T}, {channel_blocks})",
                "programs": map_programs, "sum_programs": sum_programs,
                "per_thread": cuda.BN_ROWS * block // (32 * cuda.BN_WARPS),
                "lanes_used": (M * C) / (cuda.cdiv(M, cuda.BN_ROWS) * cuda.BN_ROWS * channel_blocks * block),
                "fwd_bytes_per_element": sum(KERNEL_ACCESSES["BN forward"]) * e,
                "bwd_bytes_per_element": sum(KERNEL_ACCESSES["BN backward"]) * e,
                "partials_bytes": 2 * T * splits * 2 * C * 4,  # written by the kernel, read by the torch sum
            })
    return rows


class _CountOps(TorchDispatchMode):
    """Counts the GPU launches of the operators dispatched under it: views and metadata-only operators are not
    launches, and msgsnn's own operators (``torch.ops.msgcli.*``) run their implementation, whose launches count."""

    def __init__(self, counter: collections.Counter) -> None:
        super().__init__()
        self.ops = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "msgcli":  # on meta the fake would run: run the implementation instead, counted
            with _CountOps(self.ops):
                return getattr(ops, func._opname)._init_fn(*args, **(kwargs or {}))
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with _CountOps(self.ops):  # what it decomposes into (``to`` of a tensor already so: nothing)
                return func.decompose(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name not in NOT_LAUNCHES:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_on_meta(launches: collections.Counter):
    """msgsnn's LIF and per-step BatchNorm run the Triton kernels (with ``MSGSNN_TRITON_BN=1``) on meta tensors;
    launches are counted, not run."""
    def record(kernel, grid, *args, num_warps, **switches):
        launches[kernel.__name__] += 1

    triton_on_meta = kernels.Kernels("triton", kernels.Family("Triton kernels", lambda: cuda, ""), strict=True)
    with mock.patch.object(cuda, "_launch", record), mock.patch.object(kernels, "for_device", lambda d: triton_on_meta), \
            mock.patch.object(cuda, "takes", lambda op, *args: op.startswith(("lif", "bn"))):
        yield


def count_launches(model: nn.Module, shape: tuple, classes: int) -> dict:
    """GPU launches of one steady-state training step, counted on meta: the model's forward and backward
    (``model``), the loss on its output and that loss's backward (``loss``), and fused AdamW (``optimizer``:
    :data:`FUSED_ADAMW_LAUNCHES`, as ``train`` runs it on CUDA; fused AdamW has no meta kernel)."""
    x = torch.empty(shape, device="meta")
    y = torch.zeros(shape[0], dtype=torch.long, device="meta")

    def loss_of(logits):
        return nn.functional.cross_entropy(logits.float().mean(0), y)

    launches: collections.Counter = collections.Counter()
    step_ops: collections.Counter = collections.Counter()
    loss_ops: collections.Counter = collections.Counter()
    with _triton_on_meta(launches):
        with _CountOps(step_ops):
            loss_of(model(x)).backward()
    logits = torch.empty((shape[1] if len(shape) == 5 else model.T, shape[0], classes), device="meta",
                         requires_grad=True)
    with _CountOps(loss_ops):
        loss_of(logits).backward()
    torch_model = sum(step_ops.values()) - sum(loss_ops.values())
    return {"triton": sum(launches.values()), "torch": torch_model, "loss": sum(loss_ops.values()),
            "optimizer": FUSED_ADAMW_LAUNCHES, "torch_ops": dict(step_ops.most_common())}


def dispatch_ms(launch_count: dict) -> dict:
    """The step's launch time on the host, eager and under CUDA graphs (``train.compile`` on CUDA: the model's
    forward and backward are one graph replay each; the loss and the optimizer stay eager), at
    :data:`LAUNCH_US` a launch or replay."""
    eager = sum(launch_count[k] for k in ("triton", "torch", "loss", "optimizer"))
    graphs = 2 + launch_count["loss"] + launch_count["optimizer"]
    return {"eager_launches": eager, "graph_launches": graphs,
            "eager_ms": eager * LAUNCH_US / 1e3, "graphs_ms": graphs * LAUNCH_US / 1e3}


def model_preset(name: str, batch: int | None, precision: str) -> dict:
    cfg = config_io.load_preset(name)
    if batch:
        cfg.train.batch_size = batch
    _, classes, kind = DATASETS[cfg.data.name]
    B, size = cfg.train.batch_size, cfg.data.size
    channels = 2 if kind == "events" else 3
    shape = (B, cfg.T, channels, size, size) if kind == "events" else (B, channels, size, size)
    with torch.device("meta"):
        model = build_model_from_config(cfg, channels, classes).train()
    layers = trace_layers(model, shape)
    parts = step_parts(model, layers, precision)
    launches = count_launches(model, shape, classes)
    total_min = sum(p.seconds_min for p in parts.values())
    total_kernels = sum(p.seconds_kernels for p in parts.values())
    spiking = ("BN forward", "BN backward", "LIF forward", "LIF backward")
    lif = ("LIF forward", "LIF backward")
    floor = total_kernels - sum(parts[p].seconds_kernels for p in lif) + relu_floor_seconds(layers, precision)
    return {
        "preset": name, "model": cfg.model.name, "batch": B, "T": cfg.T, "input": list(shape[1:]),
        "precision": precision, "parts": {k: asdict(v) for k, v in parts.items()},
        "step_ms_min": total_min * 1e3, "step_ms_kernels": total_kernels * 1e3,
        "spiking_share_min": sum(parts[p].seconds_min for p in spiking) / total_min,
        "spiking_share_kernels": sum(parts[p].seconds_kernels for p in spiking) / total_kernels,
        "lif_share_kernels": sum(parts[p].seconds_kernels for p in lif) / total_kernels,
        "floor_ms": floor * 1e3, "msgsnn_over_floor": total_kernels / floor,
        "launches": launch_rows(layers, precision),
        "launch_count": launches, "dispatch": dispatch_ms(launches),
    }


def print_report(r: dict, show_layers: bool) -> None:
    dims = "x".join(str(d) for d in r["input"])
    print(f"# {r['preset']}: {r['model']}, batch {r['batch']}, input {dims}, {r['precision']} activations; "
          f"H200 bound at {H200_HBM_BYTES_PER_S / 1e12:.1f} TB/s and "
          f"{H200_DENSE_TENSOR_FLOPS[r['precision']] / 1e12:.0f} dense TFLOP/s")
    print(f"{'part':<28}{'GFLOP':>9}{'GB least':>10}{'GB msgsnn':>11}{'ms least':>10}{'ms msgsnn':>11}{'share':>8}")
    total = r["step_ms_kernels"]
    for name, p in r["parts"].items():
        print(f"{name:<28}{p['flops'] / 1e9:>9.0f}{p['bytes_min'] / 1e9:>10.2f}{p['bytes_kernels'] / 1e9:>11.2f}"
              f"{p['seconds_min'] * 1e3:>10.3f}{p['seconds_kernels'] * 1e3:>11.3f}"
              f"{p['seconds_kernels'] * 1e3 / total:>8.1%}")
    print(f"{'step':<28}{sum(p['flops'] for p in r['parts'].values()) / 1e9:>9.0f}"
          f"{sum(p['bytes_min'] for p in r['parts'].values()) / 1e9:>10.2f}"
          f"{sum(p['bytes_kernels'] for p in r['parts'].values()) / 1e9:>11.2f}{r['step_ms_min']:>10.3f}{total:>11.3f}")
    print(f"spiking layers (LIF + BatchNorm): {r['spiking_share_kernels']:.0%} of the step at the bound with msgsnn's "
          f"kernels ({r['spiking_share_min']:.0%} if each moved only what it must); LIF alone "
          f"{r['lif_share_kernels']:.0%}")
    print(f"floor (in-place ReLU for the LIF, same BatchNorm): {r['floor_ms']:.3f} ms at the bound; msgsnn / floor "
          f"= {r['msgsnn_over_floor']:.2f} at the bound")
    n, d = r["launch_count"], r["dispatch"]
    print(f"launches per step: {n['triton']} Triton + {n['torch']} torch kernels in the model, {n['loss']} for the loss, "
          f"{n['optimizer']} for fused AdamW (views and metadata-only operators not counted)")
    print(f"dispatch at an assumed {LAUNCH_US:.0f} us a launch: eager {d['eager_launches']} launches, "
          f"{d['eager_ms']:.2f} ms = {d['eager_ms'] / total:.2f}x the bound; under CUDA graphs (--compile) "
          f"{d['graph_launches']} launches, {d['graphs_ms']:.3f} ms = {d['graphs_ms'] / total:.3f}x the bound")
    print(f"Triton launches per layer shape (LIF: {cuda.LIF_BLOCK} neurons per program, {cuda.LIF_WARPS} "
          f"warps; BN: {cuda.BN_ROWS}-row tiles, {cuda.BN_WARPS} warps, programs of the elementwise "
          f"kernel; {H200_SMS} SMs)")
    print(f"{'kernel':<7}{'shape [T,B,C,H,W]':<24}{'layers':>7}{'programs':>10}{'per SM':>8}{'elem/thread':>12}"
          f"{'lanes used':>11}{'B/elem fwd+bwd':>15}  grid")
    for row in r["launches"]:
        shape = "x".join(str(d) for d in row["shape"])
        print(f"{row['kernel']:<7}{shape:<24}{row['layers']:>7}{row['programs']:>10}{row['programs'] / H200_SMS:>8.1f}"
              f"{row['per_thread']:>12}{row['lanes_used']:>11.0%}"
              f"{str(row['fwd_bytes_per_element']) + '+' + str(row['bwd_bytes_per_element']):>15}  {row['grid']}")
    if show_layers:
        print(json.dumps(r["parts"], indent=1))
    print()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=None,
                   help="comma-separated preset names (default: every preset with the paper's number)")
    p.add_argument("--batch", type=int, default=None, help="default: each preset's own (64 for both defaults)")
    p.add_argument("--precision", default="bf16", choices=tuple(BYTES),
                   help="activation dtype: bf16 (autocast, as benchmarks/gpu.sh measures) or fp32")
    p.add_argument("--layers", action="store_true", help="also print the parts as JSON")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    presets = ([p.strip() for p in args.presets.split(",") if p.strip()] if args.presets
               else table_presets("main"))
    try:
        reports = [model_preset(name, args.batch, args.precision) for name in presets]
    except config_io.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in reports:
        print_report(r, args.layers)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=list) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
