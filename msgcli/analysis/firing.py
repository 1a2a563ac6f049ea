"""Fig. 6 and the energy estimate: firing rate per layer, time per epoch, synaptic operations.

Definitions (per sample):

* MACs of a conv/linear layer for one timestep: output elements x (input
  channels / groups) x kernel area, i.e. the same network run once as an ANN.
* A spiking layer's fan-out: the MACs of the weight layers its spikes feed
  (through pooling and flattening, e.g. a ResNet block's branch and shortcut),
  divided by its neuron count: the accumulates one spike triggers (about
  out_channels x k^2 / stride^2 for a k x k conv).
* Synaptic operations (SynOps): sum over spiking layers of firing rate x neurons
  x fan-out x T, with the firing rate from the run's last epoch on the test set.
* Weight layers fed by anything other than one layer's spikes (the encoder
  layer on the raw input, SEW's sums of spikes) are counted as dense MACs at
  every timestep.
* Energy estimate: 0.9 pJ per accumulate and 4.6 pJ per multiply-accumulate
  (45 nm figures SNN papers quote); the ANN does all MACs once. An estimate of
  arithmetic only: memory traffic and neuron updates are not counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from msgcli.analysis.figures import grouped_bars, new_figure, save_figure
from msgcli.analysis.runs import Report, Run, describe_runs, legend_labels
from msgcli.engine.build import spiking_layers, trained_model
from msgcli.engine.results import RunDirectory

PJ_PER_AC = 0.9
PJ_PER_MAC = 4.6


@dataclass
class OperationCounts:
    """Per sample and timestep: neurons and fed MACs per spiking layer, dense MACs, all MACs."""

    neurons: dict[str, int] = field(default_factory=dict)
    fed_macs: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dense_macs: float = 0.0
    dense_layers: list[str] = field(default_factory=list)
    total_macs: float = 0.0


def layer_macs(module: nn.Module, output: torch.Tensor) -> float:
    """Multiply-accumulates of one call of a conv or linear layer (all samples in ``output``)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * module.in_channels // module.groups * kh * kw
    return output.numel() * module.in_features


@torch.no_grad()
def count_operations(model: nn.Module, sample: torch.Tensor) -> OperationCounts:
    """Trace one forward pass of ``sample`` (one input, no batch dim) and attribute every MAC.

    Tensors are followed by storage: a spiking layer's output, and what
    parameter-free modules (pooling, flatten) make of it, stay attributed to
    that layer; a conv/linear reading such a tensor is fed by it.
    """
    names = {m: n for n, m in spiking_layers(model).items()}
    layer_names = {m: n for n, m in model.named_modules()}
    counts = OperationCounts()
    origin: dict[int, tuple[str, torch.Tensor]] = {}  # data_ptr -> (spiking layer, tensor kept alive)

    def hook(module, inputs, output):
        source = origin.get(inputs[0].data_ptr())
        if module in names:
            counts.neurons[names[module]] = output[0, 0].numel()
            origin[output.data_ptr()] = (names[module], output)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            macs = layer_macs(module, output) / output.shape[0]  # per timestep: T frames, or 1 (direct encoding)
            counts.total_macs += macs
            if source is None:
                counts.dense_macs += macs
                counts.dense_layers.append(layer_names[module])
            else:
                counts.fed_macs[source[0]] += macs
        elif source is not None and next(module.parameters(), None) is None:
            origin[output.data_ptr()] = (source[0], output)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    model.eval()
    try:
        model(sample.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return counts


def run_costs(run: Run, counts: OperationCounts) -> tuple[pd.DataFrame, dict]:
    """Per-layer rows (firing rate, neurons, fan-out, SynOps) and the run's energy estimate."""
    last = run.metrics.iloc[-1]
    T = run.config.T
    rows = []
    for name, neurons in counts.neurons.items():
        rate = float(last.get(f"fr/{name}", float("nan")))
        fan_out = counts.fed_macs.get(name, 0.0) / neurons
        rows.append({"run": run.name, "layer": name, "firing_rate": rate, "neurons": neurons,
                     "fan_out": fan_out, "synops_per_sample": rate * neurons * fan_out * T})
    layers = pd.DataFrame(rows)
    synops = float(layers["synops_per_sample"].sum())
    snn_pj = PJ_PER_AC * synops + PJ_PER_MAC * counts.dense_macs * T
    ann_pj = PJ_PER_MAC * counts.total_macs
    energy = {
        "run": run.name, "variant": run.variant, "mask_p": run.config.model.neuron.mask_p, "T": T,
        "synops_per_sample": synops, "dense_macs_per_sample": counts.dense_macs * T,
        "snn_energy_uJ_estimate": snn_pj / 1e6, "ann_macs_per_sample": counts.total_macs,
        "ann_energy_uJ_estimate": ann_pj / 1e6, "snn_to_ann_energy_estimate": snn_pj / ann_pj,
        "seconds_per_epoch": float(run.metrics["epoch_seconds"].mean()),
    }
    return layers, energy


def firing_rates(run: Run) -> pd.Series:
    """The last epoch's firing rate per spiking layer, from the ``fr/<layer>`` columns."""
    columns = [c for c in run.metrics.columns if c.startswith("fr/")]
    return run.metrics.iloc[-1][columns].rename(lambda c: c[len("fr/"):]).astype(float)


def plot_firing(runs: list[Run], directory: Path) -> list[Path]:
    """Left: firing rate per spiking layer, one bar per run; right: seconds per epoch (mean ± std)."""
    labels = legend_labels(runs)
    fig = new_figure(11, 4.8)
    rates, timing = fig.subplots(1, 2, width_ratios=(3, 1))
    per_run = {label: firing_rates(run) for label, run in zip(labels, runs)}
    layers = list(dict.fromkeys(name for series in per_run.values() for name in series.index))
    grouped_bars(rates, layers, {label: [100 * series.get(n, float("nan")) for n in layers] for label, series in per_run.items()})
    rates.set_xlabel("spiking layer")
    rates.set_ylabel("firing rate (% of neurons spiking per timestep)")
    rates.set_title("Firing rate per layer (last epoch, test set)")
    seconds = [run.metrics["epoch_seconds"] for run in runs]
    timing.bar(range(len(runs)), [s.mean() for s in seconds], yerr=[s.std() if len(s) > 1 else 0 for s in seconds],
               color=[f"C{i}" for i in range(len(runs))], capsize=4)
    timing.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize="small")
    timing.set_ylabel("wall time per epoch (s)")
    timing.set_title("Time per epoch")
    fig.suptitle(f"Firing rates and time per epoch - {describe_runs(runs)}")
    return save_figure(fig, directory, "firing")


def firing_report(runs: list[Run], directory: Path) -> Report:
    """Fig. 6 (firing.png/.pdf), firing.csv (per layer) and energy.csv (per run, an estimate)."""
    gaps = []
    written = plot_firing(runs, directory)
    layer_frames, energies = [], []
    for run in runs:
        last = RunDirectory(run.path).last
        if not last.exists():
            gaps.append(f"{run.name}: no checkpoints/last.pt, so its network size is unknown; synaptic operations skipped")
            continue
        model, _ = trained_model(last, run.config)
        sample = torch.zeros(model.in_channels, run.config.data.size, run.config.data.size)
        layers, energy = run_costs(run, count_operations(model, sample))
        layer_frames.append(layers)
        energies.append(energy)
    if energies:
        pd.concat(layer_frames).to_csv(directory / "firing.csv", index=False)
        table = pd.DataFrame(energies)
        table.to_csv(directory / "energy.csv", index=False)
        written += [directory / "firing.csv", directory / "energy.csv"]
        shown = pd.DataFrame({
            "run": table["run"], "variant": table["variant"],
            "SynOps": table["synops_per_sample"].map("{:.3g}".format),
            "SNN µJ": table["snn_energy_uJ_estimate"].map("{:.3g}".format),
            "ANN µJ": table["ann_energy_uJ_estimate"].map("{:.3g}".format),
            "SNN/ANN": table["snn_to_ann_energy_estimate"].map("{:.2f}".format),
            "s/epoch": table["seconds_per_epoch"].map("{:.1f}".format),
        })
        return Report(written, gaps, shown, "per sample: synaptic operations and energy, an ESTIMATE "
                      f"({PJ_PER_AC} pJ/AC, {PJ_PER_MAC} pJ/MAC, arithmetic only)")
    return Report(written, gaps)
