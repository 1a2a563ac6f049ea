"""Fig. 1: which membrane potentials receive a surrogate gradient, under plain SG and under MSG.

For one batch, every spiking layer's membrane ``H`` (before the spike) is
recomputed from its input current with the neuron's own charge/fire/reset
(``lif_forward`` of :mod:`msgcli.snn.kernels`), and ``dS/dV`` is evaluated under four
settings: plain surrogate gradients with a narrow (4 alpha), the default and a
wide (alpha / 4) surrogate, and MSG at probability p. The MSG mask is drawn
here the way the spike's backward draws it (fresh per timestep and call), so
its statistics, not its exact entries, match the backward pass that produces
``dL/dW``. ``dL/dW`` is the real gradient of the cross-entropy loss on the
decoded output, one backward pass per setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from msgcli.analysis.figures import grouped_bars, new_figure, save_figure
from msgcli.analysis.runs import Report
from msgcli.config import RunConfig
from msgcli.data import DatasetInfo, build_datasets
from msgcli.engine.build import build_model_from_config, build_two, spiking_layers, trained_model
from msgcli.snn import LIF, TWO, SpikeSpec, kernels
from msgcli.snn.surrogate import get_surrogate

BINS = 80  # over [0, the largest peak of the settings]: the same bins for every setting


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    spec: SpikeSpec


def settings(spec: SpikeSpec, mask_p: float) -> list[Setting]:
    """Plain SG with narrow, default and wide alpha, and MSG at ``mask_p`` with the default alpha."""
    a = spec.alpha
    plain = dataclasses.replace(spec, mask_p=0.0)
    return [
        Setting("sg_narrow", f"SG narrow (α={4 * a:g})", dataclasses.replace(plain, alpha=4 * a)),
        Setting("sg_default", f"SG default (α={a:g})", plain),
        Setting("sg_wide", f"SG wide (α={a / 4:g})", dataclasses.replace(plain, alpha=a / 4)),
        Setting("msg", f"MSG p={mask_p:g} (α={a:g})", dataclasses.replace(spec, mask_p=mask_p)),
    ]


def peak(spec: SpikeSpec) -> float:
    """The largest value ``spec`` can give dS/dV (every surrogate peaks at the threshold)."""
    zero = torch.zeros(())
    names = {spec.surrogate, spec.mask_fill} - {"zero"}
    scale = 1.0 / (1.0 - spec.mask_p) if spec.rescale and spec.mask_p < 1 else 1.0
    return scale * max(float(get_surrogate(name)(zero, spec.alpha)) for name in names)


@dataclass
class GradientStats:
    """``fractions``: setting, quantity (dS/dV or dL/dW), layer, entries, nonzero, nonzero_fraction.
    ``histogram``: setting, layer, bin_low, bin_high, count of the non-zero dS/dV values."""

    fractions: pd.DataFrame
    histogram: pd.DataFrame


def _surrogate_counter(lif: LIF, name: str, setting: Setting, edges: torch.Tensor, fractions: list, histogram: list):
    """Forward hook: count the non-zero dS/dV entries of one layer and histogram their values over ``edges``."""

    @torch.no_grad()
    def hook(module, inputs, output):
        current = inputs[0].detach().float()
        _, membrane = kernels.for_device(current.device).lif_forward(current, lif.tau, lif.v_threshold, lif.reset, True)
        counts = torch.zeros(BINS, dtype=torch.float64)
        nonzero = 0
        for t in range(membrane.shape[0]):
            derivative = setting.spec.masked_derivative(membrane[t] - lif.v_threshold)
            values = derivative[derivative != 0]
            nonzero += values.numel()
            counts += torch.histc(values.cpu(), BINS, float(edges[0]), float(edges[-1])).double()
        fractions.append({"setting": setting.key, "quantity": "dS/dV", "layer": name,
                          "entries": membrane.numel(), "nonzero": nonzero})
        histogram.extend({"setting": setting.key, "layer": name, "bin_low": float(lo), "bin_high": float(hi), "count": int(c)}
                          for lo, hi, c in zip(edges[:-1], edges[1:], counts))

    return hook


def measure_gradients(model: nn.Module, two: TWO, inputs: torch.Tensor, targets: torch.Tensor,
                      chosen: list[Setting]) -> GradientStats:
    """dS/dV per spiking layer and dL/dW per conv/linear weight for one batch under each setting.

    The model runs in training mode (batch statistics), as during training; its
    surrogate settings are restored afterwards.
    """
    layers = spiking_layers(model)
    original = {name: lif.spec for name, lif in layers.items()}
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    fractions: list[dict] = []
    histogram: list[dict] = []
    edges = torch.linspace(0.0, max(peak(setting.spec) for setting in chosen), BINS + 1)
    model.train()
    try:
        for setting in chosen:
            handles = []
            for name, lif in layers.items():
                lif.spec = setting.spec
                handles.append(lif.register_forward_hook(_surrogate_counter(lif, name, setting, edges, fractions, histogram)))
            model.zero_grad(set_to_none=True)
            try:
                F.cross_entropy(two(model(inputs)), targets).backward()
            finally:
                for handle in handles:
                    handle.remove()
            for name, weight in weights.items():
                grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
                fractions.append({"setting": setting.key, "quantity": "dL/dW", "layer": name,
                                  "entries": grad.numel(), "nonzero": int((grad != 0).sum())})
    finally:
        for name, lif in layers.items():
            lif.spec = original[name]
        model.zero_grad(set_to_none=True)
    frame = pd.DataFrame(fractions)
    frame["nonzero_fraction"] = frame["nonzero"] / frame["entries"]
    return GradientStats(frame, pd.DataFrame(histogram))


def totals(fractions: pd.DataFrame) -> pd.DataFrame:
    """Non-zero fraction per setting and quantity over all layers together."""
    summed = fractions.groupby(["setting", "quantity"], sort=False)[["entries", "nonzero"]].sum().reset_index()
    summed["nonzero_fraction"] = summed["nonzero"] / summed["entries"]
    return summed


def plot_gradients(stats: GradientStats, chosen: list[Setting], title: str, directory: Path) -> list[Path]:
    """Top, as the paper's Fig. 1: one dS/dV histogram per setting (all spiking layers) on shared axes, the
    entries that get no gradient (dS/dV = 0) as a bar of their own; bottom: non-zero fractions per layer."""
    fig = new_figure(16, 9)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1, 1.1))
    overall = totals(stats.fractions).set_index(["setting", "quantity"])["nonzero_fraction"]
    histograms = top.subplots(1, len(chosen), sharex=True, sharey=True)
    for ax, setting in zip(histograms, chosen):
        rows = stats.histogram[stats.histogram["setting"] == setting.key]
        pooled = rows.groupby(["bin_low", "bin_high"], sort=True)["count"].sum().reset_index()
        entries = stats.fractions.query("setting == @setting.key and quantity == 'dS/dV'")["entries"].sum()
        edges = [*pooled["bin_low"], pooled["bin_high"].iloc[-1]]
        width = edges[1] - edges[0]
        nonzero = overall[setting.key, "dS/dV"]
        zeros = ax.bar(-width, 1 - nonzero, 2 * width, align="edge", color="0.6")
        values = ax.stairs(pooled["count"] / entries, edges, fill=True, color="C0")
        ax.set_yscale("log")
        ax.set_xlabel("dS/dV (per unit of membrane potential)")
        ax.set_title(f"{setting.label}\n{100 * nonzero:.1f}% of dS/dV non-zero", fontsize="medium")
    histograms[0].set_ylabel("fraction of all dS/dV entries")
    histograms[0].legend([zeros, values], ["dS/dV = 0 (no gradient)", "dS/dV > 0, per bin"], fontsize="small",
                         loc="upper right")
    labels = {s.key: s.label for s in chosen}
    for ax, quantity in zip(bottom.subplots(1, 2), ("dS/dV", "dL/dW")):
        rows = stats.fractions[stats.fractions["quantity"] == quantity]
        layers = list(dict.fromkeys(rows["layer"]))
        series = {labels[key]: list(100 * part.set_index("layer").loc[layers, "nonzero_fraction"])
                  for key, part in rows.groupby("setting", sort=False)}
        grouped_bars(ax, [layer.removesuffix(".module") for layer in layers], series, legend=False)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"non-zero entries of {quantity} (%)")
        ax.set_xlabel("spiking layer" if quantity == "dS/dV" else "weight layer")
        ax.set_title(f"{quantity}: fraction of non-zero entries per layer", fontsize="medium")
    bottom.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(chosen), fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, directory, "grads")


def first_batch(cfg: RunConfig, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, DatasetInfo]:
    """A shuffled training batch, augmented as in training; the same one for a given config seed."""
    torch.manual_seed(cfg.train.seed)
    bundle = build_datasets(cfg, progress=False)
    order = torch.Generator().manual_seed(cfg.train.seed)
    inputs, targets = next(iter(DataLoader(bundle.train, batch_size=batch_size, shuffle=True, generator=order)))
    return inputs, targets, bundle.info


def gradient_report(cfg: RunConfig, checkpoint: Path | None, batch_size: int, mask_p: float | None,
                    name: str, directory: Path) -> Report:
    """Fig. 1 for one batch of ``cfg``'s data: grads.png/.pdf, grads.csv (non-zero fractions), grads_hist.csv.

    ``checkpoint`` gives trained weights (None or missing: the initial weights);
    ``mask_p`` defaults to the config's p, or 0.5 for a run trained without MSG.
    """
    gaps = []
    if mask_p is None:
        mask_p = cfg.model.neuron.mask_p or 0.5
        if cfg.model.neuron.mask_p == 0:
            gaps.append(f"{name} trains without MSG (p=0); the MSG column uses p={mask_p:g} (choose with --mask-p)")
    inputs, targets, info = first_batch(cfg, batch_size)
    if checkpoint is not None and checkpoint.exists():
        model, two = trained_model(checkpoint, cfg)
        weights = f"{checkpoint.name} weights"
    else:
        if checkpoint is not None:
            gaps.append(f"{name}: no checkpoint at {checkpoint}; using the initial (untrained) weights")
        model, two = build_model_from_config(cfg, info.in_channels, info.num_classes), build_two(cfg)
        weights = "initial weights"
    chosen = settings(next(iter(spiking_layers(model).values())).spec, mask_p)
    stats = measure_gradients(model, two, inputs, targets, chosen)
    labels = {s.key: s.label for s in chosen}
    stats.fractions.insert(1, "label", stats.fractions["setting"].map(labels))
    title = f"Surrogate gradients of one batch ({len(targets)} samples) - {name}, {cfg.model.name}, {weights}"
    written = plot_gradients(stats, chosen, title, directory)
    for stem, frame in (("grads", stats.fractions), ("grads_hist", stats.histogram)):
        frame.to_csv(directory / f"{stem}.csv", index=False)
        written.append(directory / f"{stem}.csv")
    summary = totals(stats.fractions).pivot(index="setting", columns="quantity", values="nonzero_fraction")
    summary = summary.loc[[s.key for s in chosen]].rename(index=labels).rename_axis("setting").reset_index()
    return Report(written, gaps, summary.round(4), f"non-zero fraction over all layers - {name}")
