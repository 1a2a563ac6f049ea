"""``msgsnn analyze ...``: the paper's figures and tables from your own runs (thin over msgcli.analysis).

The analysis modules (torch, matplotlib) are imported inside the commands, so ``msgsnn --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer
from rich.markup import escape

from msgcli.cli.common import DataRoot, Sets, check_choice, console, exit_on_user_errors
from msgcli.errors import UserError

if TYPE_CHECKING:
    from msgcli.analysis import runs

analyze_app = typer.Typer(
    help="Draw the paper's figures and tables from runs and sweeps (PNG + PDF + CSV, in <run or sweep>/figures/).",
    no_args_is_help=True,
)

RUNS = typer.Argument(None, help="Run directories (written by `msgsnn train`) or sweep directories (`msgsnn sweep`). "
                                  "Default: the most recently finished run under results/.")
OUT = typer.Option(None, "--out", help="Folder for the outputs (default: <run or sweep>/figures, or beside several runs).")
METRIC = typer.Option("best", help="Which test accuracy of each run: best or final.")


def show(report: runs.Report, gaps: list[str]) -> None:
    from msgcli.analysis import stats

    if report.table is not None:
        console.print(stats.rich_table(report.table, report.title))
    for gap in gaps + report.gaps:
        console.print(f"[yellow]gap:[/yellow] {escape(gap)}", highlight=False, soft_wrap=True)
    for path in report.written:
        console.print(f"wrote {escape(str(path))}", highlight=False, soft_wrap=True)


def select(paths: list[Path], choose: Callable) -> tuple[list[runs.Run], list[str]]:
    """Read ``paths``, keep the runs ``choose`` accepts; nothing left is an error listing why."""
    from msgcli.analysis import runs

    found, gaps = runs.collect_runs(paths)
    kept, left_out = choose(found)
    gaps += left_out
    if not kept:
        raise UserError("nothing to draw: " + ("; ".join(gaps) or "no runs found"))
    return kept, gaps


def latest(kind: str) -> Path:
    """The most recently finished run (``kind="run"``) or sweep under results/, announced on the terminal."""
    from msgcli.analysis import runs

    path = runs.latest_run() if kind == "run" else runs.latest_sweep()
    console.print(f"using {escape(str(path))} (the most recently finished {kind})", highlight=False, soft_wrap=True)
    return path


def check_metric(metric: str) -> None:
    check_choice("--metric", metric, ("best", "final"), UserError)


@analyze_app.command("grads")
@exit_on_user_errors
def grads_command(
    run_dir: Optional[Path] = typer.Argument(
        None, help="A run directory (its config and trained weights). Default: the most recently finished run under results/."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Instead of a run: a preset, with initial weights."),
    sets: Sets = [],  # noqa: B006 - typer's repeatable option
    data_root: DataRoot = None,
    batch_size: int = typer.Option(16, min=1, help="Samples in the batch."),
    mask_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="p of the MSG column (default: the run's p, or 0.5)."),
    checkpoint: str = typer.Option("last", help="Weights of a run: last or best."),
    out: Optional[Path] = OUT,
) -> None:
    """Fig. 1: dS/dV histograms under narrow/default/wide SG and MSG; non-zero fractions of dS/dV and dL/dW."""
    from msgcli import config as config_io
    from msgcli.analysis import grads, runs
    from msgcli.engine.results import RunDirectory

    if run_dir is not None and preset is not None:
        raise UserError("give either a RUN_DIR or --preset, not both")
    if run_dir is None and preset is None:
        run_dir = latest("run")
    overrides = dict(config_io.parse_override(s) for s in sets)
    if data_root is not None:
        overrides["data.root"] = data_root
    if run_dir is not None:
        check_choice("--checkpoint", checkpoint, ("last", "best"), UserError)
        run = runs.load_run(run_dir)
        cfg, weights, name = config_io.apply_overrides(run.config, overrides), RunDirectory(run_dir).checkpoint(checkpoint), run.name
        directory = runs.output_dir([run_dir], out)
    else:
        cfg, weights, name = config_io.apply_overrides(config_io.load_preset(preset), overrides), None, preset
        directory = out or Path("results") / "figures" / Path(preset).stem
    show(grads.gradient_report(cfg, weights, batch_size, mask_p, name, directory), [])


@analyze_app.command("temporal")
@exit_on_user_errors
def temporal_command(run_dir: Optional[Path] = typer.Argument(
        None, help="A run directory. Default: the most recently finished run under results/."), out: Optional[Path] = OUT) -> None:
    """Fig. 3: the TWO factor of every timestep against epoch."""
    from msgcli.analysis import figures, runs

    run_dir = run_dir or latest("run")
    run = runs.load_run(run_dir)
    _, gaps = runs.with_epochs([run])
    if gaps:
        raise UserError(f"nothing to draw: {gaps[0]}")
    show(figures.temporal_report(run, runs.output_dir([run_dir], out)), [])


@analyze_app.command("curves")
@exit_on_user_errors
def curves_command(paths: Optional[list[Path]] = RUNS, out: Optional[Path] = OUT) -> None:
    """Fig. 4: test accuracy and training loss against epoch, runs overlaid."""
    from msgcli.analysis import figures, runs

    paths = paths or [latest("run")]
    chosen, gaps = select(paths, runs.with_epochs)
    show(runs.Report(figures.plot_curves(chosen, runs.output_dir(paths, out)), []), gaps)


@analyze_app.command("maskp")
@exit_on_user_errors
def maskp_command(sweep_dir: Optional[Path] = typer.Argument(
                      None, help="A sweep directory (or a folder of runs). Default: the most recent sweep under results/."),
                  metric: str = METRIC, out: Optional[Path] = OUT) -> None:
    """Fig. 5: test accuracy against the mask probability p, mean ± std over seeds, one line per network/surrogate."""
    from msgcli.analysis import figures, runs

    check_metric(metric)
    sweep_dir = sweep_dir or latest("sweep")
    chosen, gaps = select([sweep_dir], runs.finished)
    show(figures.maskp_report(chosen, metric, sweep_dir.resolve().name, runs.output_dir([sweep_dir], out)), gaps)


@analyze_app.command("firing")
@exit_on_user_errors
def firing_command(paths: Optional[list[Path]] = RUNS, out: Optional[Path] = OUT) -> None:
    """Fig. 6: firing rate per layer and seconds per epoch; synaptic operations and an energy estimate."""
    from msgcli.analysis import firing, runs

    paths = paths or [latest("run")]
    chosen, gaps = select(paths, runs.with_epochs)
    show(firing.firing_report(chosen, runs.output_dir(paths, out)), gaps)


@analyze_app.command("table")
@exit_on_user_errors
def table_command(paths: Optional[list[Path]] = typer.Argument(
                      None, help="Sweep or run directories. Default: the most recent sweep under results/."),
                  metric: str = METRIC, out: Optional[Path] = OUT) -> None:
    """The ablation table (baseline / +TWO / +MSG / MSG+TWO, mean ± std over seeds) beside the paper's numbers."""
    from msgcli.analysis import runs, stats

    check_metric(metric)
    paths = paths or [latest("sweep")]
    chosen, gaps = select(paths, runs.finished)
    show(stats.table_report(chosen, metric, runs.output_dir(paths, out)), gaps)


@analyze_app.command("timesteps")
@exit_on_user_errors
def timesteps_command(
    run_dir: Optional[Path] = typer.Argument(
        None, help="A run directory. Default: the most recently finished run under results/."),
    timesteps: Optional[str] = typer.Option(
        None, "--T", help="Timesteps to evaluate at, e.g. 1,2,4,8 (default: 1, 2, 4, ... and the run's T and twice it)."),
    checkpoint: str = typer.Option("best", help="Weights of the run: best or last."),
    data_root: DataRoot = None,
    out: Optional[Path] = OUT,
) -> None:
    """Test accuracy against the number of timesteps T: the trained run evaluated at each T (event data re-framed)."""
    from msgcli.analysis import runs, timesteps as accuracy_over_T

    check_choice("--checkpoint", checkpoint, ("best", "last"), UserError)
    run_dir = run_dir or latest("run")
    run = runs.load_run(run_dir)
    values = accuracy_over_T.default_timesteps(run.config.T)
    if timesteps is not None:
        try:
            values = [int(value) for value in timesteps.split(",")]
        except ValueError:
            raise UserError(f"--T: expected whole numbers such as 1,2,4,8, got {timesteps!r}") from None
        if min(values) < 1:
            raise UserError(f"--T: every T must be at least 1, got {timesteps!r}")
    overrides = {"data.root": data_root} if data_root is not None else {}
    show(accuracy_over_T.timesteps_report(run, values, checkpoint, overrides, runs.output_dir([run_dir], out)), [])
