"""A trained network as a NIR graph (the Neuromorphic Intermediate Representation, package ``nir``).

NIR describes one sample at one instant (no batch or time axis); a simulator or chip steps the
graph once per timestep of msgsnn's input. What becomes what:

* convolution + BatchNorm -> ``nir.Conv2d`` with the BatchNorm folded in from its running
  statistics (what evaluation uses, for ``per_step`` and ``joint`` BN alike); linear -> ``nir.Affine``;
* LIF -> ``nir.LIF``; average pooling, the global one included -> ``nir.AvgPool2d``;
  flatten -> ``nir.Flatten``; a residual sum -> fan-in (NIR adds the edges entering a node);
* the non-spiking readout -> the graph's output: logits at every timestep. TWO's decoding (one
  weight per timestep) has no NIR node; its weights travel in the graph's metadata.

The LIF. msgsnn charges ``H[t] = V[t-1] + (I[t] - V[t-1]) / tau`` (tau in timesteps), fires when
``H >= V_th`` and resets to 0 (hard reset). NIR's LIF is ``tau_n dv/dt = (v_leak - v) + r I``, fires
when ``v > v_threshold`` and sets ``v = v_reset``. Its Euler step of length dt,
``v[t] = v[t-1] + dt / tau_n (v_leak - v[t-1] + r I[t])``, is msgsnn's charge exactly for
``tau_n = tau * dt``, ``r = 1``, ``v_leak = v_reset = 0``, whatever dt: one msgsnn timestep lasts dt
seconds of the graph (stored as ``metadata["dt"]``). The spike conditions differ only when the
membrane lands exactly on the threshold. Max pooling and the soft (subtractive) reset have no NIR
form and are refused with the layer's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msgcli.errors import UserError
from msgcli.snn import LIF, TWO
from msgcli.snn.layers import Folded
from msgcli.snn.models.resnet import BasicBlock, SEWBlock, SpikingResNet
from msgcli.snn.models.vgg import ConvStack

DT = 1e-4  # seconds per timestep; snnTorch's NIR importer (1.0) assumes this step
STAGES = {ConvStack: ("features", "pool", "classifier"), SpikingResNet: ("stem", "stages", "pool", "classifier")}


class NotExportable(UserError):
    """A layer (or setting) NIR cannot express; the message names it."""


def load_nir():
    """The ``nir`` package, imported on first use (an optional dependency)."""
    try:
        import nir
    except ImportError:
        raise UserError("--format nir needs the nir package, an optional extra of msgsnn: pip install nir") from None
    return nir


def output_weights(two: TWO) -> np.ndarray:
    """``w`` with ``decoded = sum_t w[t] * logits[t]``: TWO's factors over T (release rule), as they are
    (paper rule), or ``1/T`` (TWO off: the time mean)."""
    if not two.enabled:
        return np.full(two.T, 1.0 / two.T)
    factors = two.factors.detach().double().cpu().numpy()
    return factors if two.rule == "paper" else factors / two.T


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _GraphBuilder:
    """Walks a backbone in forward order, adding one NIR node per layer; ``sources`` are the nodes whose
    summed outputs are the current activation (several after a SEW block's spike sum)."""

    def __init__(self, dt: float) -> None:
        self.nir = load_nir()
        self.dt = dt
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []

    def add(self, name: str, node, sources: list[str]) -> list[str]:
        self.nodes[name] = node
        self.edges += [(source, name) for source in sources]
        return [name]

    def emit(self, module: nn.Module, name: str, sources: list[str], shape: tuple[int, ...]):
        """Nodes for ``module`` fed by ``sources`` with per-sample input ``shape``; returns (sources, shape) after it."""
        nir = self.nir
        if type(module) in STAGES:
            return self.sequence([(stage, getattr(module, stage)) for stage in STAGES[type(module)]], name, sources, shape)
        if isinstance(module, nn.Sequential):
            return self.sequence(list(module.named_children()), name, sources, shape)
        if isinstance(module, Folded):
            return self.emit(module.module, name, sources, shape)
        if isinstance(module, nn.Identity):
            return sources, shape
        if isinstance(module, BasicBlock):
            branch, out_shape = self.emit(module.branch, f"{name}.branch", sources, shape)
            shortcut, _ = self.emit(module.shortcut, f"{name}.shortcut", sources, shape)
            return self.emit(module.spike, f"{name}.spike", branch + shortcut, out_shape)
        if isinstance(module, SEWBlock):
            branch, out_shape = self.emit(module.branch, f"{name}.branch", sources, shape)
            shortcut, _ = self.emit(module.shortcut, f"{name}.shortcut", sources, shape)
            return branch + shortcut, out_shape
        if isinstance(module, nn.Conv2d):
            return self.conv(module, None, name, sources, shape)
        if isinstance(module, LIF):
            if module.reset != "hard":
                raise NotExportable(f"{name} (LIF, reset={module.reset}): NIR's LIF resets to v_reset after a spike; "
                                    "a subtractive reset has no NIR form (train with model.neuron.reset=hard)")
            full = lambda value: np.full(shape, value, dtype=np.float64)  # noqa: E731
            node = nir.LIF(tau=full(module.tau * self.dt), r=full(1.0), v_leak=full(0.0),
                           v_threshold=full(module.v_threshold), v_reset=full(0.0))
            return self.add(name, node, sources), shape
        if isinstance(module, nn.Linear):
            bias = module.bias if module.bias is not None else torch.zeros(module.out_features)
            node = nir.Affine(weight=_array(module.weight), bias=_array(bias))
            return self.add(name, node, sources), (module.out_features,)
        if isinstance(module, nn.AvgPool2d):
            if module.ceil_mode or module.divisor_override is not None:
                raise NotExportable(f"{name} (AvgPool2d): ceil_mode and divisor_override have no NIR form")
            kernel = _pair(module.kernel_size)
            return self.pool(name, kernel, _pair(module.stride or kernel), _pair(module.padding), sources, shape)
        if isinstance(module, nn.AdaptiveAvgPool2d):
            if _pair(module.output_size) != (1, 1):
                raise NotExportable(f"{name} (AdaptiveAvgPool2d to {module.output_size}): only the global average (to 1x1) is exported")
            return self.pool(name, shape[1:], shape[1:], (0, 0), sources, shape)
        if isinstance(module, nn.Flatten):
            start = module.start_dim - 1 if module.start_dim > 0 else module.start_dim  # NIR shapes have no batch axis
            end = module.end_dim - 1 if module.end_dim > 0 else module.end_dim
            node = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=start, end_dim=end)
            return self.add(name, node, sources), tuple(int(n) for n in node.output_type["output"])
        if isinstance(module, nn.MaxPool2d):
            raise NotExportable(f"{name} (MaxPool2d): NIR has no max pooling; only networks with average pooling export "
                                "(ResNets: an average-pooled stem)")
        raise NotExportable(f"{name} ({type(module).__name__}): no NIR form in msgsnn's exporter")

    def sequence(self, children, name: str, sources: list[str], shape: tuple[int, ...]):
        """Children in order; a convolution followed by a BatchNorm becomes one convolution node."""
        i = 0
        while i < len(children):
            child_name, child = children[i]
            path = f"{name}.{child_name}" if name else child_name
            conv = child.module if isinstance(child, Folded) else child
            following = children[i + 1][1] if i + 1 < len(children) else None
            if isinstance(conv, nn.Conv2d) and isinstance(following, nn.modules.batchnorm._BatchNorm):
                sources, shape = self.conv(conv, following, path, sources, shape)
                i += 2
                continue
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                raise NotExportable(f"{path} ({type(child).__name__}): a BatchNorm not right after a convolution is not folded")
            sources, shape = self.emit(child, path, sources, shape)
            i += 1
        return sources, shape

    def conv(self, conv: nn.Conv2d, bn, name: str, sources: list[str], shape: tuple[int, ...]):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotExportable(f"{name} (Conv2d): only zero padding given in pixels exports")
        weight = conv.weight.detach().double()
        bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
        if bn is not None:
            if bn.running_mean is None:
                raise NotExportable(f"{name} ({type(bn).__name__}): no running statistics to fold (track_running_stats=False)")
            scale = torch.rsqrt(bn.running_var.double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach().double()
            bias = (bias - bn.running_mean.double()) * scale + (bn.bias.detach().double() if bn.bias is not None else 0.0)
            weight = weight * scale[:, None, None, None]
        node = self.nir.Conv2d(input_shape=tuple(shape[1:]), weight=_array(weight), stride=_pair(conv.stride),
                               padding=_pair(conv.padding), dilation=_pair(conv.dilation), groups=conv.groups, bias=_array(bias))
        return self.add(name, node, sources), tuple(int(n) for n in node.output_type["output"])

    def pool(self, name: str, kernel, stride, padding, sources: list[str], shape: tuple[int, ...]):
        """An average pool (no ceil mode: the output size rounds down, as torch's)."""
        node = self.nir.AvgPool2d(kernel_size=np.array(kernel), stride=np.array(stride), padding=np.array(padding))
        height, width = ((size + 2 * p - k) // s + 1 for size, k, s, p in zip(shape[1:], kernel, stride, padding))
        return self.add(name, node, sources), (shape[0], height, width)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy()


def check_exportable(model: nn.Module) -> None:
    """NotExportable unless ``model`` is one of the backbone families the exporter walks (a plugin's is not)."""
    if type(model) not in STAGES:
        known = ", ".join(cls.__name__ for cls in STAGES)
        raise NotExportable(f"model ({type(model).__name__}): the NIR exporter knows the {known} backbones")


def to_nir(model: nn.Module, two: TWO, input_shape: tuple[int, int, int], dt: float = DT,
           metadata: dict[str, Any] | None = None):
    """The network (eval mode: BatchNorm running statistics) as a ``nir.NIRGraph`` over one ``[C, H, W]`` frame
    per timestep; ``metadata`` adds to what the graph records (dt, T, TWO's output weights, how to decode)."""
    check_exportable(model)
    if not dt > 0:
        raise UserError(f"--dt: must be a positive number of seconds, got {dt!r}")
    builder = _GraphBuilder(dt)
    nir = builder.nir
    builder.nodes["input"] = nir.Input(input_type=np.array(input_shape))
    sources, shape = builder.emit(model, "", ["input"], tuple(input_shape))
    builder.add("output", nir.Output(output_type=np.array(shape)), sources)
    info = {
        "producer": "msgsnn",
        "dt": float(dt),
        "timesteps": int(two.T),
        "time": "one msgsnn timestep lasts dt seconds; every LIF's tau is msgsnn's tau (in timesteps) times dt",
        "input": "one frame [C, H, W] per timestep: frame t of an event clip, or the same image at every timestep",
        "output": "logits of the non-spiking readout at every timestep",
        "output_weights": output_weights(two),
        "decode": "class scores = sum over timesteps t of output_weights[t] * output[t]",
        "spike_condition": "msgsnn fires when v >= v_threshold, NIR when v > v_threshold; they differ only when "
                           "the membrane equals the threshold exactly",
        **(metadata or {}),
    }
    return nir.NIRGraph(nodes=builder.nodes, edges=builder.edges, metadata=info)


def export_run(run_dir: Path, checkpoint: str = "best", path: Path | None = None, dt: float = DT):
    """Write ``run_dir``'s trained network (``best`` or ``last`` checkpoint) as a NIR file; returns (path, graph).

    Default path: ``<run>/<checkpoint>.nir``. The file is written whole or not at all.
    """
    from msgcli.engine.build import trained_model
    from msgcli.engine.results import RunDirectory

    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint: {checkpoint!r} is not allowed; choose one of best, last")
    nir = load_nir()
    run = RunDirectory(run_dir)
    cfg = run.read_config()
    model, two = trained_model(run.checkpoint(checkpoint), cfg)
    model.eval()
    check_exportable(model)
    graph = to_nir(model, two, (model.in_channels, cfg.data.size, cfg.data.size), dt,
                   {"model": cfg.model.name, "run": run.name, "checkpoint": checkpoint})
    path = Path(path) if path is not None else run.path / f"{checkpoint}.nir"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    nir.write(tmp, graph)
    os.replace(tmp, path)
    return path, graph
