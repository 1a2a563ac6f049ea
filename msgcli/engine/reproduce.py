"""``msgsnn reproduce``: the paper's tables as plans of ordinary sweep runs.

A table is a list of rows; a row is one preset at one setting, trained at several seeds. The
presets of a table are one sweep each, under ``<out>/reproduce/<table>/<preset>/``, and all of
them run together through :func:`msgcli.engine.sweep.run_sweeps`, so a reproduction does what a
sweep does: every config validated and every missing dataset named before anything runs, runs N
at a time (one GPU each where several are visible) or each a Ray task, finished runs skipped and
interrupted ones resumed when the same command runs again. Every run is one process on one GPU:
no preset asks for more, and a multi-GPU run is ``torchrun ... -m msgcli train`` by hand.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msgcli import config as config_io
from msgcli import plugins as plugin_io
from msgcli.config import ConfigError, RunConfig
from msgcli.engine.results import RunDirectory
from msgcli.engine.sweep import SWEEP_CSV, Point, Sweep, parse_values, plan_sweep, sweep_running

TABLES = ("main", "ablation", "fig5")
# The paper's Fig. 5: accuracy against p from 0 to 1 with the arctan surrogate, on DVS-CIFAR10.
FIG5_PRESET = "dvs-vgg"
FIG5_SETTINGS = {"model.neuron.surrogate": "arctan"}
FIG5_MASK_P = "0:1:0.1"
# What benchmarks/epoch.py measured (its --json files), in the output folder's gpu/ (reproduce's --out; gpu.sh
# writes results/gpu, the default --out's): epoch.json in each preset's own precision, epoch-bf16.json under bf16.
EPOCH_TIMES = "gpu"


def epoch_times(out: Path) -> Path:
    """Where the GPU epoch times of a reproduction writing to ``out`` are read: ``<out>/gpu/``, whatever the
    working directory."""
    return Path(out) / EPOCH_TIMES


@dataclass
class Row:
    """One line of a table: a preset at one setting (the swept keys but the seed), one point per seed."""

    sweep: Sweep
    setting: dict[str, Any]
    points: list[Point]

    @property
    def config(self) -> RunConfig:
        return self.points[0].config

    @property
    def label(self) -> str:
        """The setting as its runs' folders name it (``mask_p=0_two=false``), or "-" for a preset as it is."""
        return self.points[0].name.rsplit("_seed=", 1)[0] if self.setting else "-"


@dataclass
class Reproduction:
    """A table's plan: ``kind`` is main, ablation, fig5 or presets (a list of presets, rows as in main)."""

    kind: str
    name: str
    directory: Path
    sweeps: list[Sweep]
    rows: list[Row]


def table_presets(kind: str) -> list[str]:
    """The presets of a table: main, every preset with the paper's number; ablation, those in its ablation."""
    if kind == "fig5":
        return [FIG5_PRESET]
    papers = {name: config_io.load_preset(name).paper for name in config_io.list_presets()}
    if kind == "ablation":
        return [name for name, paper in papers.items() if paper.ablation.msg_two is not None]
    return [name for name, paper in papers.items() if paper.accuracy is not None]


def table_axes(kind: str, base: RunConfig) -> dict[str, list[Any]]:
    """What a table sweeps for one preset: ablation, MSG off/on (the preset's p) times TWO off/on; fig5, p."""
    if kind == "ablation":
        return {"model.neuron.mask_p": [0.0, base.model.neuron.mask_p], "two.enabled": [False, True]}
    if kind == "fig5":
        return {"model.neuron.mask_p": parse_values("fig5", FIG5_MASK_P)}
    return {}


def plan_reproduction(names: list[str], overrides: dict[str, Any], seeds: int, out: Path,
                      plugins: list[str] = ()) -> Reproduction:
    """The plan of a table (``main``, ``ablation``, ``fig5``) or of a list of presets, every run validated.

    ``plugins`` are imported first and added to every run's; ``overrides`` (dotted keys) apply to every run
    after the table's own settings.
    """
    added = plugin_io.load(plugins)
    names = list(dict.fromkeys(names or ["main"]))
    tables = [name for name in names if name in TABLES]
    if tables and len(names) > 1:
        raise ConfigError(f"TABLE: give one of {', '.join(TABLES)} or a list of presets, not {' '.join(names)}")
    kind = tables[0] if tables else "presets"
    presets = table_presets(kind) if tables else names
    configs = [config_io.load_preset(preset) for preset in presets]
    name = kind if tables else "+".join(cfg.preset for cfg in configs)
    directory = Path(out).resolve() / "reproduce" / name
    settings = FIG5_SETTINGS if kind == "fig5" else {}
    sweeps, rows = [], []
    for preset_config in configs:
        base = config_io.with_plugins(config_io.apply_overrides(preset_config, {**settings, **overrides}), added)
        sweep = plan_sweep(base, table_axes(kind, base), seeds, directory, name=base.preset)
        groups: dict[str, Row] = {}
        for point in sweep.points:
            setting = {k: v for k, v in point.values.items() if k != "train.seed"}
            groups.setdefault(repr(setting), Row(sweep, setting, [])).points.append(point)
        sweeps.append(sweep)
        rows += groups.values()
    return Reproduction(kind, name, directory, sweeps, rows)


def recorded_rows(sweep: Sweep) -> dict[str, dict[str, str]]:
    """sweep.csv's row per point, by run name ({} before the sweep first ran)."""
    path = sweep.directory / SWEEP_CSV
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        return {row["run"]: row for row in csv.DictReader(handle)}


def point_states(row: Row) -> list[tuple[str, str]]:
    """``(state, error)`` per point: finished, failed (with sweep.csv's error), running (its reproduce or sweep
    runs or queues it now), interrupted (a checkpoint to resume) or not started."""
    recorded, running = recorded_rows(row.sweep), sweep_running(row.sweep.directory)
    states = []
    for point in row.points:
        on_disk = RunDirectory(row.sweep.directory / point.name).status()
        status = recorded.get(point.name, {}).get("status", "")
        if on_disk == "finished":
            states.append(("finished", ""))
        elif status == "failed":  # in this session of its sweep, or the last one
            states.append(("failed", recorded[point.name].get("error", "")))
        elif running:
            states.append(("running", ""))
        elif on_disk == "interrupted":
            states.append(("interrupted", ""))
        else:
            states.append(("not started", ""))
    return states


def measured_epochs(folder: Path) -> list[dict[str, Any]]:
    """benchmarks/epoch.py's rows (one per preset and precision timed) from ``folder/epoch*.json``; [] if none."""
    rows = []
    for path in sorted(Path(folder).glob("epoch*.json")):
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows += [row for row in found if isinstance(row, dict)] if isinstance(found, list) else []
    return rows


def expected_minutes(cfg: RunConfig, measured: list[dict[str, Any]]) -> float | None:
    """Training minutes of one run: a measured epoch of the same preset, batch, T and precision, times its epochs
    (times the share of an epoch that ``train.limit_batches`` leaves); None where nothing fits."""
    for row in measured:
        if (row.get("preset"), row.get("batch"), row.get("T"), row.get("amp")) == (
                cfg.preset, cfg.train.batch_size, cfg.T, cfg.train.amp):
            steps = row["steps_per_epoch"]
            share = min(cfg.train.limit_batches, steps) / steps if cfg.train.limit_batches else 1.0
            return row["epoch_min"] * share * cfg.train.epochs
    return None


def plan_table(plan: Reproduction, measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per row for the terminal: preset, setting, seeds, what is left to run and its expected time."""
    lines = []
    for row in plan.rows:
        states = [state for state, _ in point_states(row)]
        minutes = expected_minutes(row.config, measured)
        lines.append({
            "preset": row.sweep.name,
            **({"setting": row.label} if row.setting else {}),
            "seeds": " ".join(str(point.config.train.seed) for point in row.points),
            "finished": states.count("finished"),
            "to run": len(states) - states.count("finished"),
            "epochs": row.config.train.epochs,
            "GPU time per run": "not measured" if minutes is None else duration(minutes * 60),
        })
    return lines


def duration(seconds: float) -> str:
    """A time as people read it: 40 s, 12 min, 3.5 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
