"""The ``msgsnn`` command line: a thin layer over msgcli.engine, msgcli.data, msgcli.analysis and msgcli.export.

Each module of this package holds one command or command group; shared flags, config
resolution and the error exit are in :mod:`msgcli.cli.common`. A new command is a new module
here plus one line below that registers it. Commands import torch and pandas inside their
bodies, so ``msgsnn --help`` answers at once.
"""

from __future__ import annotations

import logging
import os

import typer

from msgcli.cli import analyze, export, reproduce, sweep, train

app = typer.Typer(
    help="Train spiking neural networks with Masked Surrogate Gradients (MSG) and the Temporally Weighted Output (TWO).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
app.command("train")(train.train_command)
app.command("eval")(train.eval_command)
app.command("export")(export.export_command)
app.command("presets")(train.presets_command)
app.add_typer(analyze.analyze_app, name="analyze")
app.command("sweep")(sweep.sweep_command)
app.command("reproduce")(reproduce.reproduce_command)


def configure_process() -> None:
    """What the command sets up in its own process, and the library leaves to its host (docs/environment.md).

    OpenMP threads that wait sleep instead of spinning (read when torch loads OpenMP, so set before
    any command imports torch; kept if the user set it, or tuned GOMP_SPINCOUNT): on a machine busy
    with other work a spinning thread takes the core its peer in a static-schedule loop needs
    (``benchmarks/busy.py``). The ``msgcli`` logger passes INFO, which a run's ``train.log`` records.
    """
    if "GOMP_SPINCOUNT" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("msgcli").setLevel(logging.INFO)


def main() -> None:  # pragma: no cover - console-script entry
    configure_process()
    app(prog_name="msgsnn")
