"""Accuracy against the number of timesteps: one trained run evaluated at several T.

The LIF keeps no state between calls, so the same weights run for any T: event data is framed
at T bins (and cached so), images are repeated T times. At a T other than the trained one the
output is decoded by its mean over time (TWO's factors belong to the trained timesteps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from msgcli.analysis.figures import new_figure, save_figure
from msgcli.analysis.runs import Report, Run
from msgcli.engine.evaluate import run_evaluation


def default_timesteps(T: int) -> list[int]:
    """1, 2, 4, ... below twice the trained ``T``, then ``T`` and ``2T``."""
    values, t = {T, 2 * T}, 1
    while t <= 2 * T:
        values.add(t)
        t *= 2
    return sorted(values)


def timesteps_report(run: Run, timesteps: list[int], checkpoint: str, overrides: dict[str, Any], directory: Path) -> Report:
    """Evaluate ``run``'s checkpoint at each of ``timesteps``; write timesteps.csv and timesteps.png/.pdf."""
    trained = run.config.T
    rows = []
    for T in sorted(set(timesteps)):
        result, _ = run_evaluation(run.path, checkpoint, overrides, T)
        rows.append({"T": T, "test_acc": result.accuracy, "test_loss": result.loss,
                     "decoded_by": "TWO" if T == trained and run.config.two.enabled else "mean over time",
                     "samples": result.samples})
    table = pd.DataFrame(rows)
    fig = new_figure(6, 4)
    ax = fig.subplots()
    ax.plot(table["T"], table["test_acc"], marker="o")
    ax.axvline(trained, color="grey", linestyle=":", label=f"trained at T = {trained}")
    ax.set_xlabel("timesteps T at evaluation")
    ax.set_ylabel(f"test accuracy (%), {checkpoint} checkpoint")
    ax.set_xticks(table["T"])
    ax.set_title(f"{run.name}: accuracy against T")
    ax.legend(fontsize="small")
    directory.mkdir(parents=True, exist_ok=True)
    table.to_csv(directory / "timesteps.csv", index=False)
    written = [directory / "timesteps.csv", *save_figure(fig, directory, "timesteps")]
    shown = table.assign(test_acc=table["test_acc"].round(2))[["T", "test_acc", "decoded_by"]]
    return Report(written, [], shown, f"{run.name} ({checkpoint}): test accuracy (%) against T")
