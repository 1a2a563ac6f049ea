"""``msgsnn sweep``: train a grid of runs (thin over :mod:`msgcli.engine.sweep`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from msgcli.cli.common import (Amp, Backend, BatchSize, DataRoot, Device, Epochs, Jobs, LimitBatches, Lr, Plugins, Preset,
                               RayAddress, Sets, SkipBadSamples, Seed, Surrogate, Two, console, exit_on_user_errors,
                               flag_overrides, resolve_config)
from msgcli.errors import UserError


@exit_on_user_errors
def sweep_command(
    preset: Preset = None,
    mask_p: Optional[str] = typer.Option(
        None, "--mask-p", help="MSG mask probabilities: start:stop[:step] (stop included, step 0.1 by default) or a list 0,0.3,0.5."),
    grid: list[str] = typer.Option(
        [], "--grid", help="Sweep any config key: --grid model.neuron.surrogate=arctan,sigmoid (repeatable; numbers may be start:stop[:step])."),
    seeds: int = typer.Option(1, min=1, help="Seeds per point: the config's seed (42 unless --seed), then +1, +2, ..."),
    name: Optional[str] = typer.Option(None, help="Sweep name (default: the preset and the swept keys)."),
    out: Path = typer.Option(Path("results"), help="Runs go to <out>/sweeps/<name>/<run>/."),
    jobs: Jobs = 1,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    data_root: DataRoot = None,
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    two: Two = None,
    surrogate: Surrogate = None,
    seed: Seed = None,
    device: Device = None,
    amp: Amp = None,
    limit_batches: LimitBatches = None,
    skip_bad_samples: SkipBadSamples = False,
    plugins: Plugins = [],  # noqa: B006 - typer's repeatable option
    sets: Sets = [],  # noqa: B006 - typer's repeatable option
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every run of the sweep, finished ones too."),
) -> None:
    """Train a grid of runs, e.g. accuracy against the mask probability; writes <sweep>/sweep.csv, one row per run.

    Rerunning the same command skips finished runs and resumes interrupted ones. Flags apply to every run.
    """
    import pandas as pd

    from msgcli import config as config_io
    from msgcli.analysis.stats import rich_table
    from msgcli.engine import sweep as sweeps

    overrides = flag_overrides(epochs=epochs, batch_size=batch_size, lr=lr, two=two, surrogate=surrogate, seed=seed,
                               device=device, amp=amp, limit_batches=limit_batches, data_root=data_root,
                               skip_bad_samples=skip_bad_samples or None)
    base = resolve_config(preset, None, overrides, sets, plugins)
    axes = {}
    if mask_p is not None:
        axes["model.neuron.mask_p"] = sweeps.parse_values("--mask-p", mask_p)
    for text in grid:
        key, values = config_io.parse_override(text)
        if key in axes:
            raise UserError(f"--grid: {key} is swept twice")
        axes[key] = sweeps.parse_values(key, values)
    plan = sweeps.plan_sweep(base, axes, seeds, out / "sweeps", name)
    rows = sweeps.run_sweep(plan, jobs=jobs, backend=backend, ray_address=ray_address, overwrite=overwrite,
                            echo=lambda line: console.print(escape(line), highlight=False, soft_wrap=True))
    table = pd.DataFrame(rows)[["run", "status", *sweeps.RESULT_COLUMNS]]
    console.print(rich_table(table.round(2), f"sweep {plan.name} ({plan.directory / sweeps.SWEEP_CSV})"))
    unfinished = [row["run"] for row in rows if row["status"] != "finished"]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {len(rows)} runs did not finish ({', '.join(unfinished)}); "
                        f"see {plan.directory / sweeps.SWEEP_CSV} and {plan.directory / 'logs'}; rerun to retry them")
