"""``msgsnn sweep``: train a grid of runs (thin over :mod:`msgsnn.engine.sweep`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from msgsnn.engine import sweep as sweeps
from msgsnn.engine.errors import UserError

console = Console()


def user_errors(fn: Callable) -> Callable:
    """msgsnn.cli's one-line errors and exit codes; imported at call time, as msgsnn.cli imports this module."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from msgsnn.cli import exit_on_user_errors

        return exit_on_user_errors(fn)(*args, **kwargs)

    return wrapper


@user_errors
def sweep_command(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name or YAML file. Default: digits-dvs."),
    mask_p: Optional[str] = typer.Option(
        None, "--mask-p", help="MSG mask probabilities: start:stop[:step] (stop included, step 0.1 by default) or a list 0,0.3,0.5."),
    grid: list[str] = typer.Option(
        [], "--grid", help="Sweep any config key: --grid model.neuron.surrogate=arctan,sigmoid (repeatable; numbers may be start:stop[:step])."),
    seeds: int = typer.Option(1, min=1, help="Seeds per point: the config's seed (42 unless --seed), then +1, +2, ..."),
    name: Optional[str] = typer.Option(None, help="Sweep name (default: the preset and the swept keys)."),
    out: Path = typer.Option(Path("results"), help="Runs go to <out>/sweeps/<name>/<run>/."),
    jobs: int = typer.Option(1, min=1, help="Runs at once on this machine (one GPU each when several are visible)."),
    backend: str = typer.Option("local", help="local, or ray: every run a Ray task (needs Ray: pip install ray)."),
    ray_address: Optional[str] = typer.Option(None, help="Address of a running Ray cluster (default: RAY_ADDRESS, else a local Ray)."),
    data_root: Optional[str] = typer.Option(None, help="Folder holding the datasets (default $MSGSNN_DATA or ~/datasets)."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs of every run."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process (lr scales with it)."),
    two: Optional[bool] = typer.Option(None, "--two/--no-two", help="TWO on/off in every run (sweep it with --grid two.enabled=true,false)."),
    surrogate: Optional[str] = typer.Option(None, help="piecewise_linear, arctan, sigmoid or rectangular."),
    seed: Optional[int] = typer.Option(None, help="First seed."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto."),
    amp: Optional[str] = typer.Option(None, help="Mixed precision: none, bf16 or fp16."),
    limit_batches: Optional[int] = typer.Option(None, help="Cap train and test batches per epoch (smoke runs)."),
    skip_bad_samples: bool = typer.Option(
        False, "--skip-bad-samples", help="Skip and count unusable recordings (empty, unreadable, from another sensor) instead of stopping."),
    sets: list[str] = typer.Option([], "--set", help="Override a config key in every run: --set model.neuron.alpha=4 (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every run of the sweep, finished ones too."),
) -> None:
    """Train a grid of runs, e.g. accuracy against the mask probability; writes <sweep>/sweep.csv, one row per run.

    Rerunning the same command skips finished runs and resumes interrupted ones.
    """
    import pandas as pd

    from msgsnn import config as config_io
    from msgsnn.analysis.stats import rich_table
    from msgsnn.cli import flag_overrides, resolve_config

    overrides = flag_overrides(epochs=epochs, batch_size=batch_size, two=two, surrogate=surrogate, seed=seed,
                               device=device, amp=amp, limit_batches=limit_batches, data_root=data_root,
                               skip_bad_samples=skip_bad_samples or None)
    base = resolve_config(preset, None, overrides, sets)
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
