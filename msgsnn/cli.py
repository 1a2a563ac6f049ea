"""The ``msgsnn`` command line: a thin layer over msgsnn.engine, msgsnn.data and msgsnn.analysis."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from msgsnn import config as config_io
from msgsnn.config import ConfigError, RunConfig

app = typer.Typer(
    help="Train spiking neural networks with Masked Surrogate Gradients (MSG) and the Temporally Weighted Output (TWO).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def exit_on_user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can act on into one line on stderr and a non-zero exit code."""

    def fail(label: str, err: BaseException, code: int) -> typer.Exit:
        err_console.print(f"[red]{label}:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return typer.Exit(code)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", KeyboardInterrupt("stopped by the user"), 130) from None
        except Exception as err:
            from msgsnn.data import BadSample, DatasetMissing  # imported here: keeps `msgsnn --help` fast
            from msgsnn.engine.errors import PeerFailed, UserError

            if isinstance(err, PeerFailed):  # rank 0 has printed the reason
                raise typer.Exit(err.exit_code) from None
            if isinstance(err, (ConfigError, DatasetMissing, UserError, BadSample)):
                raise fail("error", err, getattr(err, "exit_code", 1)) from None
            if os.environ.get("MSGSNN_DEBUG"):
                traceback.print_exc()
            raise fail("internal error", f"{type(err).__name__}: {err} (set MSGSNN_DEBUG=1 for the traceback)", 1) from None

    return wrapper


SKIP_BAD_SAMPLES_HELP = "Skip and count unusable recordings (empty, unreadable, from another sensor) instead of stopping."


def flag_overrides(**flags: Any) -> dict[str, Any]:
    """Dotted-key overrides from the flags the user actually gave (None = not given)."""
    keys = {
        "epochs": "train.epochs", "batch_size": "train.batch_size", "mask_p": "model.neuron.mask_p",
        "two": "two.enabled", "surrogate": "model.neuron.surrogate", "seed": "train.seed", "device": "train.device",
        "amp": "train.amp", "limit_batches": "train.limit_batches", "data_root": "data.root", "name": "name",
        "loggers": "train.loggers",
        "skip_bad_samples": "data.skip_bad_samples",
    }
    return {keys[k]: v for k, v in flags.items() if v is not None}


def resolve_config(preset: str | None, config_file: Path | None, overrides: dict[str, Any], sets: list[str]) -> RunConfig:
    """Preset (or saved config.yaml) + flags + ``--set key=value``, validated."""
    if config_file is not None:
        if not config_file.exists():
            raise ConfigError(f"--config: no such file {config_file}")
        cfg = config_io.load(config_file)
    else:
        cfg = config_io.load_preset(preset or "digits-dvs")
    merged = dict(overrides)
    merged.update(dict(config_io.parse_override(s) for s in sets))
    return config_io.apply_overrides(cfg, merged)


def _print_accuracy(title: str, accuracy: float, per_step: list[float]) -> None:
    table = Table(title=title)
    table.add_column("output")
    table.add_column("test accuracy (%)", justify="right")
    table.add_row("decoded (TWO / mean)", f"{accuracy:.2f}")
    for t, a in enumerate(per_step):
        table.add_row(f"timestep {t} alone", f"{a:.2f}")
    console.print(table)


@app.command()
@exit_on_user_errors
def train(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name (see `msgsnn presets`) or a YAML file. Default: digits-dvs."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="Re-run from a saved config.yaml instead of a preset."),
    data_root: Optional[str] = typer.Option(None, help="Folder holding the datasets (default $MSGSNN_DATA or ~/datasets)."),
    out: Path = typer.Option(Path("results"), help="Where runs are written: <out>/<name>/."),
    name: Optional[str] = typer.Option(None, help="Run name (default: the preset name)."),
    epochs: Optional[int] = typer.Option(None, help="Number of epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per process (lr scales with it)."),
    mask_p: Optional[float] = typer.Option(None, help="MSG mask probability p in [0, 1] (0 = plain surrogate gradient)."),
    two: Optional[bool] = typer.Option(None, "--two/--no-two", help="Temporally weighted output on/off."),
    surrogate: Optional[str] = typer.Option(None, help="piecewise_linear, arctan, sigmoid or rectangular."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto."),
    amp: Optional[str] = typer.Option(None, help="Mixed precision: none, bf16 or fp16."),
    limit_batches: Optional[int] = typer.Option(None, help="Cap train and test batches per epoch (smoke runs)."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write the metrics as TensorBoard scalars under "
                                     "<run>/tb/ (train.loggers: [csv, tensorboard]; needs the tensorboard package)."),
    skip_bad_samples: bool = typer.Option(False, "--skip-bad-samples", help=SKIP_BAD_SAMPLES_HELP),
    sets: list[str] = typer.Option([], "--set", help="Override any config key: --set model.neuron.alpha=4 (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run exactly where it stopped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
) -> None:
    """Train one run; writes config.yaml, metrics.csv, checkpoints/, train.log and summary.json."""
    from msgsnn.engine import loggers
    from msgsnn.engine.train import train as run_training

    overrides = flag_overrides(epochs=epochs, batch_size=batch_size, mask_p=mask_p, two=two, surrogate=surrogate, seed=seed,
                               device=device, amp=amp, limit_batches=limit_batches, data_root=data_root, name=name,
                               loggers=["csv", "tensorboard"] if tensorboard else None,
                               skip_bad_samples=skip_bad_samples or None)
    cfg = resolve_config(preset, config_file, overrides, sets)
    run_name = cfg.name or cfg.preset or "run"
    saved = out / run_name / "config.yaml"
    if resume and saved.exists():
        # continue with the saved config; only flags given now change it (e.g. more --epochs)
        cfg = resolve_config(None, saved, overrides, sets)
    loggers.require(cfg.train.loggers)
    result = run_training(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet, console=console)
    s = result.summary
    console.print(f"[green]done[/green] {s['run_dir']}: best test accuracy {s['best_test_acc']:.2f}%, "
                  f"final {s['final_test_acc']:.2f}% after {s['epochs']} epochs in {s['seconds']:.0f}s", soft_wrap=True)


@app.command("eval")
@exit_on_user_errors
def evaluate_run(
    run_dir: Path = typer.Argument(..., help="A run directory written by `msgsnn train`."),
    checkpoint: str = typer.Option("best", help="best or last."),
    data_root: Optional[str] = typer.Option(None, help="Folder holding the datasets, if it moved."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or auto."),
) -> None:
    """Test accuracy of a saved run, overall and per timestep; writes eval-<checkpoint>.json."""
    from msgsnn.engine.evaluate import run_evaluation
    from msgsnn.engine.results import write_atomic

    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint: {checkpoint!r} is not allowed; choose one of best, last")
    result, path = run_evaluation(run_dir, checkpoint, flag_overrides(data_root=data_root, device=device))
    _print_accuracy(f"{run_dir} ({checkpoint})", result.accuracy, result.timestep_accuracy)
    report = {"checkpoint": checkpoint, "test_acc": result.accuracy, "test_loss": result.loss,
              "test_acc_per_timestep": result.timestep_accuracy, "firing_rates": result.firing_rates, "samples": result.samples}
    write_atomic(path, json.dumps(report, indent=2) + "\n")
    console.print(f"saved {path}")


@app.command("export")
@exit_on_user_errors
def export_command(
    run_dir: Path = typer.Argument(..., help="A run directory written by `msgsnn train`."),
    checkpoint: str = typer.Option("best", help="best or last."),
    file_format: str = typer.Option("nir", "--format", help="nir: the Neuromorphic Intermediate Representation "
                                    "(snnTorch, SpikingJelly, Norse, Sinabs, Lava and chips read it; needs the nir package)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write. Default: <run>/<checkpoint>.nir."),
    dt: float = typer.Option(1e-4, help="Seconds one timestep lasts in the graph; every LIF's tau is msgsnn's tau times dt."),
) -> None:
    """Write the trained network as a NIR graph: BatchNorm folded, LIF nodes, TWO's output weights in the metadata."""
    if file_format != "nir":
        raise ConfigError(f"--format: {file_format!r} is not allowed; choose one of nir")
    from msgsnn.export.nir import export_run

    path, graph = export_run(run_dir, checkpoint, output, dt)
    kinds: dict[str, int] = {}
    for node in graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    weights = ", ".join(f"{w:.4g}" for w in graph.metadata["output_weights"])
    console.print(escape(f"wrote {path}: {', '.join(f'{n} {kind}' for kind, n in kinds.items())}; dt = {dt:g} s per "
                         f"timestep; class scores = sum over t of w[t] * output[t], w = [{weights}]"),
                  highlight=False, soft_wrap=True)


@app.command()
@exit_on_user_errors
def presets() -> None:
    """List the presets: dataset, network (backbone, stem pool, init), T, epochs and the paper's top-1 accuracy."""
    table = Table(title="presets: MSG p = 0.5 and TWO (the paper's MSG+TWO rows); paper = its top-1 %",
                  box=box.SIMPLE, padding=0, show_edge=False)  # one space between columns: 80 columns wide
    for column in ("preset", "dataset", "network", "pool", "init", "T", "epochs", "paper"):
        table.add_column(column, no_wrap=True, min_width=len(column) if column != "T" else 2)
    for preset_name in config_io.list_presets():
        cfg = config_io.load_preset(preset_name)
        paper = "-" if cfg.paper.accuracy is None else f"{cfg.paper.accuracy:.2f}"
        table.add_row(preset_name, cfg.data.name, cfg.model.name, cfg.model.stem_pool or "-", cfg.model.init,
                      str(cfg.T), str(cfg.train.epochs), paper)
    console.print(table)


from msgsnn.analysis.cli import analyze_app  # noqa: E402  (their commands import msgsnn.cli lazily)
from msgsnn.engine.sweep_cli import sweep_command  # noqa: E402
from msgsnn.reproduce_cli import reproduce_command  # noqa: E402

app.add_typer(analyze_app, name="analyze")
app.command("sweep")(sweep_command)
app.command("reproduce")(reproduce_command)


def main() -> None:  # pragma: no cover - console-script entry
    app(prog_name="msgsnn")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
