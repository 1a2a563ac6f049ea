"""``msgsnn reproduce``: the paper's tables in one command (thin over msgcli.engine.reproduce and msgcli.analysis.report)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from msgcli.cli.common import (Backend, DataRoot, Jobs, LimitBatches, Plugins, RayAddress, Sets, console,
                               exit_on_user_errors, flag_overrides)
from msgcli.errors import UserError


@exit_on_user_errors
def reproduce_command(
    table: Optional[list[str]] = typer.Argument(
        None, help="main (every row of the paper's tables), ablation (baseline / +TWO / +MSG / MSG+TWO of its ablation "
                   "presets), fig5 (accuracy against p, arctan surrogate, dvs-vgg) or preset names. Default: main."),
    data_root: DataRoot = None,
    seeds: int = typer.Option(3, min=1, help="Seeds per row: the preset's seed (42), then +1, +2, ..."),
    jobs: Jobs = 1,
    backend: Backend = "local",
    ray_address: RayAddress = None,
    epochs: Optional[int] = typer.Option(None, help="Epochs of every run (default: each preset's own)."),
    limit_batches: LimitBatches = None,
    plugins: Plugins = [],  # noqa: B006 - typer's repeatable option
    sets: Sets = [],  # noqa: B006 - typer's repeatable option
    out: Path = typer.Option(Path("results"), help="Runs go to <out>/reproduce/<table>/<preset>/<run>/, the report beside them."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing: rebuild the report from whatever has finished."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo every run of the table, finished ones too."),
) -> None:
    """Train every run of one of the paper's tables and write <out>/reproduce/<table>/report.md and .csv beside
    the published numbers.

    Rerunning the same command skips finished runs and resumes interrupted ones.
    """
    import pandas as pd

    from msgcli import config as config_io
    from msgcli.analysis.report import reproduction_report
    from msgcli.analysis.stats import rich_table
    from msgcli.engine import reproduce, sweep
    from msgcli.engine.results import RunDirectory

    overrides = flag_overrides(epochs=epochs, limit_batches=limit_batches, data_root=data_root)
    overrides.update(config_io.parse_override(text) for text in sets)
    plan = reproduce.plan_reproduction(table or [], overrides, seeds, out, plugins)
    given = [*(["--epochs", str(epochs)] if epochs else []), *(["--limit-batches", str(limit_batches)] if limit_batches else []),
             *(f"--plugin={spec}" for spec in plugins), *(f"--set={text}" for text in sets)]
    rebuild = shlex.join(["msgsnn", "reproduce", *(table or []), "--seeds", str(seeds), "--out", str(out), *given, "--report-only"])

    def echo(line: str) -> None:
        console.print(escape(line), highlight=False, soft_wrap=True)

    def report() -> None:
        written = reproduction_report(plan, rebuild)
        console.print(rich_table(written.table, written.title))
        for line in written.gaps:
            console.print(f"[yellow]gap:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)
        echo(f"wrote {', '.join(map(str, written.written))}")

    if report_only:
        return report()
    times = reproduce.epoch_times(out)
    measured = reproduce.measured_epochs(times)
    runs = [(s.directory / point.name) for s in plan.sweeps for point in s.points]
    console.print(rich_table(pd.DataFrame(reproduce.plan_table(plan, measured)), f"the plan of msgsnn reproduce {plan.name}"))
    echo(f"{len(runs)} runs, {len(plan.sweeps)} presets, {seeds} seeds each, under {plan.directory}")
    devices = ", ".join(dict.fromkeys(str(row.get("device", "an unnamed device")) for row in measured))
    echo(f"GPU time per run: the training steps of an epoch as benchmarks/epoch.py measured them on {devices} "
         f"({times}/epoch*.json), times the epochs" if measured else
         f"GPU time per run: not measured (no {times}/epoch*.json; on a GPU, "
         f"OUT={times.resolve()} bash benchmarks/gpu.sh puts them there)")
    try:
        sweep.run_sweeps(plan.sweeps, jobs=jobs, backend=backend, ray_address=ray_address, overwrite=overwrite,
                         echo=echo, on_result=lambda: reproduction_report(plan, rebuild))
    finally:
        if plan.directory.exists():  # not when a dataset was missing: then nothing has started
            report()
    unfinished = [run for run in runs if RunDirectory(run).status() != "finished"]
    if unfinished:
        raise UserError(f"{len(unfinished)} of {len(runs)} runs did not finish; see {plan.directory / 'report.md'} and "
                        "each preset's logs/; rerun the same command to retry them")
