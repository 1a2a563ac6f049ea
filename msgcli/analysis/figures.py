"""Figures drawn from run metrics: Fig. 3 (TWO factors), Fig. 4 (curves), Fig. 5 (accuracy vs p).

Figures are plain ``matplotlib.figure.Figure`` objects on the Agg canvas (no
pyplot, so no global backend is switched) and are saved as PNG and PDF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from msgcli.analysis.runs import Report, Run, describe_runs, legend_labels
from msgcli.analysis.stats import maskp_table
from msgcli.errors import UserError


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout figure (inches) on the Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, directory: Path, stem: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{stem}.png", directory / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def epoch_axis(ax: Axes) -> None:
    """Epochs are whole numbers: label the x axis so and never tick 2.5."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def grouped_bars(ax: Axes, categories: list[str], series: dict[str, list[float]], legend: bool = True) -> None:
    """One group of bars per category, one bar (and legend entry) per series.

    The legend goes inside the axes, over headroom added above the tallest bar, so it
    takes no width from the figure; ``legend=False`` leaves it to the caller.
    """
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    slanted = len(categories) > 4 or max(map(len, categories), default=0) > 14
    ax.set_xticks(x, categories, rotation=30 if slanted else 0, ha="right" if slanted else "center", fontsize="small")
    if legend:
        columns = min(len(series), 2)
        rows = -(-len(series) // columns)
        tallest = np.nanmax([v for values in series.values() for v in values] + [0.0])
        ax.set_ylim(0, (tallest or 1.0) * (1.08 + 0.1 * rows))
        ax.legend(fontsize="small", loc="upper left", ncols=columns)


def plot_temporal(run: Run, directory: Path) -> list[Path]:
    """Fig. 3: the TWO factor of each timestep against epoch (the factors used in that epoch)."""
    factors = run.per_timestep("two_t")
    fig = new_figure(7, 4.5)
    ax = fig.subplots()
    for t, column in enumerate(factors):
        colour = colormaps["viridis"](t / max(1, factors.shape[1] - 1))
        ax.plot(run.metrics["epoch"], factors[column], marker=".", color=colour, label=f"t = {t}")
    epoch_axis(ax)
    ax.set_ylabel("temporal factor (unitless)")
    rule = f"{run.config.two.rule} rule" if run.config.two.enabled else "TWO off: factors stay fixed"
    ax.set_title(f"TWO factors per timestep - {run.name} ({run.variant}, {rule})", fontsize="medium")
    ax.legend(ncol=2 if factors.shape[1] > 5 else 1, fontsize="small", title="timestep")
    ax.grid(alpha=0.3)
    return save_figure(fig, directory, "temporal")


def plot_curves(runs: list[Run], directory: Path) -> list[Path]:
    """Fig. 4: test accuracy and training loss against epoch, one line per run."""
    fig = new_figure(12, 4.5)
    accuracy, loss = fig.subplots(1, 2)
    for run, label in zip(runs, legend_labels(runs)):
        accuracy.plot(run.metrics["epoch"], run.metrics["test_acc"], marker=".", label=label)
        loss.plot(run.metrics["epoch"], run.metrics["train_loss"], marker=".", label=label)
    accuracy.set_ylabel("test accuracy (%)")
    loss.set_ylabel("training loss (cross-entropy, nats)")
    for ax in (accuracy, loss):
        epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"Test accuracy and training loss - {describe_runs(runs)}")
    return save_figure(fig, directory, "curves")


def plot_maskp(table: pd.DataFrame, metric: str, title: str, directory: Path) -> list[Path]:
    """Fig. 5: accuracy against the mask probability p, mean and spread (std) over seeds, one line per group."""
    fig = new_figure(7, 4.5)
    ax = fig.subplots()
    for label, group in table.groupby("group", sort=False):
        group = group.sort_values("mask_p")
        spread = group["std"].fillna(0.0)
        line, = ax.plot(group["mask_p"], group["mean"], marker="o", label=label)
        ax.fill_between(group["mask_p"], group["mean"] - spread, group["mean"] + spread, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("mask probability p (fraction of surrogate-gradient entries dropped)")
    ax.set_ylabel(f"{metric} test accuracy (%), mean ± std over seeds")
    ax.set_title(f"Accuracy against mask probability - {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, directory, "maskp")


def temporal_report(run: Run, directory: Path) -> Report:
    if run.per_timestep("two_t").empty:
        raise UserError(f"{run.name}: metrics.csv has no two_t* columns (TWO factors); was it written by msgsnn train?")
    gaps = []
    two = run.config.two
    if not two.enabled:
        gaps.append(f"{run.name}: TWO is off, so its factors never change")
    elif two.rule == "release" and len(run.metrics) <= two.warmup_epochs + 1:
        gaps.append(f"{run.name}: the release rule keeps the factors at 1 for the first {two.warmup_epochs + 1} epochs; "
                    f"this run has {len(run.metrics)}")
    return Report(plot_temporal(run, directory), gaps)


def maskp_report(runs: list[Run], metric: str, title: str, directory: Path) -> Report:
    """Fig. 5 (maskp.png/.pdf) and maskp.csv: accuracy per p, mean ± std over seeds, per group."""
    table = maskp_table(runs, metric)
    gaps = []
    if table["mask_p"].nunique() < 2:
        gaps.append(f"all runs use one mask probability (p={table['mask_p'].iloc[0]:g}); sweep it with --mask-p")
    written = plot_maskp(table, metric, title, directory)
    table.to_csv(directory / "maskp.csv", index=False)
    shown = table[["group", "mask_p", "n", "mean", "std", "seeds"]].round(3)
    return Report([*written, directory / "maskp.csv"], gaps, shown, f"{metric} test accuracy (%) against p - {title}")
