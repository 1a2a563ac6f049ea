"""Reading what ``msgsnn train`` and ``msgsnn sweep`` write: run and sweep directories.

A run directory holds ``config.yaml``, ``metrics.csv`` (one row per finished
epoch) and, once the run has finished, ``summary.json``. A sweep directory holds
run directories and ``sweep.csv`` (one row per point, with a status). Readers
accept partial runs; each analysis decides what it needs and reports the rest as
gaps. Only a path that is neither a run nor a sweep is an error.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from msgcli import config as config_io
from msgcli.config import PaperConfig, RunConfig
from msgcli.engine.results import RunDirectory
from msgcli.engine.sweep import SWEEP_CSV
from msgcli.errors import UserError

VARIANTS = ("baseline", "+TWO", "+MSG", "MSG+TWO")
RESULTS = Path("results")  # where `msgsnn train` and `msgsnn sweep` write by default


def paper_numbers(cfg: RunConfig) -> PaperConfig:
    """What the paper reports for a run's setup: its preset's ``paper:`` block as the presets say now (so a run
    saved before a number was added gets it too), else the block saved with the run."""
    return config_io.load_preset(cfg.preset).paper if cfg.preset in config_io.list_presets() else cfg.paper


def paper_ablation(cfg: RunConfig, cell: str) -> float | None:
    """The paper's top-1 % for one ablation cell (a VARIANTS name) of ``cfg``'s setup, from ``paper.ablation``."""
    numbers = paper_numbers(cfg).ablation
    return (numbers.baseline, numbers.two, numbers.msg, numbers.msg_two)[VARIANTS.index(cell)]


def variant(cfg: RunConfig) -> str:
    """The ablation cell of a run: TWO on or off, MSG on (``mask_p > 0``) or off."""
    return VARIANTS[2 * (cfg.model.neuron.mask_p > 0) + bool(cfg.two.enabled)]


@dataclass
class Run:
    """One run directory, read once. ``metrics`` is empty before the first finished epoch."""

    path: Path
    config: RunConfig
    metrics: pd.DataFrame
    summary: dict | None
    note: str = ""  # what sweep.csv says about a run that did not finish

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def finished(self) -> bool:
        return bool(self.summary) and self.summary.get("status") == "finished"

    @property
    def variant(self) -> str:
        return variant(self.config)

    def per_timestep(self, prefix: str) -> pd.DataFrame:
        """Columns ``<prefix>0 .. <prefix>{T-1}`` of the metrics, those present, in timestep order."""
        columns = [f"{prefix}{t}" for t in range(self.config.T) if f"{prefix}{t}" in self.metrics]
        return self.metrics[columns]

    def accuracy(self, metric: str) -> float:
        """``best`` or ``final`` test accuracy (percent) of a finished run."""
        return float(self.summary[f"{metric}_test_acc"])

    def validation(self, key: str) -> float:
        """``best_val_acc`` or ``test_acc_at_best_val`` of a finished run with a validation split, else NaN."""
        value = (self.summary or {}).get(key)
        return float("nan") if value is None else float(value)


@dataclass
class Report:
    """What an analysis wrote, what it could not draw, and an optional table for the terminal."""

    written: list[Path]
    gaps: list[str]
    table: pd.DataFrame | None = None
    title: str = ""


def legend_labels(runs: list[Run]) -> list[str]:
    """Legend text per run: its variant from its config, with p where MSG's p is not 0.5 and the seed where the
    runs have several; a run's name is added only where two labels would otherwise tie."""
    seeds = {run.config.train.seed for run in runs}
    labels = []
    for run in runs:
        p = run.config.model.neuron.mask_p
        label = run.variant + (f" (p={p:g})" if p > 0 and p != 0.5 else "")
        labels.append(label + (f", seed {run.config.train.seed}" if len(seeds) > 1 else ""))
    ties = Counter(labels)
    return [f"{label}: {run.name}" if ties[label] > 1 else label for label, run in zip(labels, runs)]


def describe_runs(runs: list[Run]) -> str:
    """Figure-title text: one run's name, or the setup(s) several runs share and how many there are."""
    if len(runs) == 1:
        return runs[0].name
    setups = dict.fromkeys(f"{r.config.preset or r.config.data.name}, {r.config.model.name}" for r in runs)
    return f"{'; '.join(setups)} ({len(runs)} runs)"


def is_run_dir(path: Path) -> bool:
    return RunDirectory(path).is_run()


def read_metrics(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return pd.DataFrame()


def load_run(path: Path) -> Run:
    run = RunDirectory(path)
    return Run(run.path, run.read_config(), read_metrics(run.metrics), run.read_summary())


def _sweep_rows(directory: Path) -> pd.DataFrame:
    path = directory / SWEEP_CSV
    return pd.read_csv(path, dtype={"error": str}, keep_default_na=False) if path.exists() else pd.DataFrame()


def collect_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The runs named by ``paths`` (run directories, or sweep directories expanded), plus gaps.

    A sweep point that did not finish (sweep.csv's status) and has no run
    directory is a gap; one with a directory is a run carrying that status and
    error as its ``note``.
    """
    runs: list[Run] = []
    gaps: list[str] = []
    for path in map(Path, paths):
        if is_run_dir(path):
            runs.append(load_run(path))
            continue
        if not path.is_dir():
            raise UserError(f"{path}: no such run or sweep directory")
        children = sorted(p for p in path.iterdir() if is_run_dir(p))
        rows = _sweep_rows(path)
        if not children and rows.empty:
            raise UserError(f"{path} is neither a run directory (config.yaml) nor a sweep directory (run directories inside)")
        notes = {row["run"]: f"{row['status']} in the sweep" + (f": {row['error']}" if row.get("error") else "")
                 for row in rows.to_dict("records") if row["status"] != "finished"}
        for child in children:
            run = load_run(child)
            run.note = notes.pop(child.name, "")
            runs.append(run)
        gaps += [f"{name}: {message}" for name, message in notes.items()]
    return runs, gaps


def with_epochs(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """The runs with at least one finished epoch, and a gap for each of the others."""
    gaps = [f"{r.name}: no finished epoch yet (metrics.csv is empty or missing)" for r in runs if r.metrics.empty]
    return [r for r in runs if not r.metrics.empty], gaps


def finished(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """The finished runs, and a gap for each unfinished one (left out of means over seeds)."""
    gaps = [f"{r.name}: {r.note or 'not finished (no summary.json)'}; left out" for r in runs if not r.finished]
    return [r for r in runs if r.finished], gaps


def _newest(root: Path, marker: str) -> Path | None:
    """The folder under ``root`` whose ``marker`` file was written last, or None."""
    found = [path for path in Path(root).rglob(marker) if path.is_file()]
    return max(found, key=lambda path: path.stat().st_mtime).parent if found else None


def latest_run(root: Path = RESULTS) -> Path:
    """The most recently finished run under ``root`` (by its summary.json, written when a run finishes)."""
    found = _newest(root, RunDirectory.SUMMARY)
    if found is None:
        raise UserError(f"no finished run under {root}/; make one with: msgsnn train --preset digits-dvs")
    return found


def latest_sweep(root: Path = RESULTS) -> Path:
    """The most recently written sweep under ``root`` (by its sweep.csv, rewritten as its points finish)."""
    found = _newest(root, SWEEP_CSV)
    if found is None:
        raise UserError(f"no sweep under {root}/; make one with: msgsnn sweep --preset digits-dvs --mask-p 0:1:0.25")
    return found


def output_dir(paths: list[Path], out: Path | None) -> Path:
    """Where an analysis writes: ``--out``, else ``<run or sweep>/figures``, else beside several runs."""
    if out is not None:
        return Path(out)
    if len(paths) == 1:
        return Path(paths[0]) / "figures"
    return Path(os.path.commonpath([Path(p).resolve() for p in paths])) / "figures"
