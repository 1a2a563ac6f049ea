"""``msgsnn train``, ``msgsnn eval`` and ``msgsnn presets``: one run, from a preset to its test accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from msgcli import config as config_io
from msgcli.cli.common import (Amp, BatchSize, Checkpoint, DataRoot, Device, Epochs, LimitBatches, Lr, Plugins, Preset, RunDir,
                               Sets, SkipBadSamples, Seed, Surrogate, Two, Workers, check_choice, console,
                               exit_on_user_errors, flag_overrides, resolve_config)


@exit_on_user_errors
def train_command(
    preset: Preset = None,
    config_file: Optional[Path] = typer.Option(None, "--config", help="Re-run from a saved config.yaml instead of a preset."),
    data_root: DataRoot = None,
    out: Path = typer.Option(Path("results"), help="Where runs are written: <out>/<name>/."),
    name: Optional[str] = typer.Option(None, help="Run name (default: the preset name)."),
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    mask_p: Optional[float] = typer.Option(None, help="MSG mask probability p in [0, 1] (0 = plain surrogate gradient)."),
    two: Two = None,
    surrogate: Surrogate = None,
    seed: Seed = None,
    device: Device = None,
    amp: Amp = None,
    limit_batches: LimitBatches = None,
    workers: Workers = None,
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write the metrics as TensorBoard scalars under "
                                     "<run>/tb/ (train.loggers: [csv, tensorboard]; needs the tensorboard package)."),
    skip_bad_samples: SkipBadSamples = False,
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (train.compile): CUDA graphs on "
                                 "CUDA, the default mode on the CPU; same metrics, faster steps after the first."),
    plugins: Plugins = [],  # noqa: B006 - typer's repeatable option
    sets: Sets = [],  # noqa: B006 - typer's repeatable option
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run exactly where it stopped."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    auto_resume: bool = typer.Option(False, "--auto-resume", help="Resume if the run has a checkpoint, start if it has "
                                     "none, exit 0 untouched if it finished (train.auto_resume; for requeued jobs)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
) -> None:
    """Train one run; writes config.yaml, metrics.csv, checkpoints/, train.log and summary.json."""
    from msgcli.engine.launch import detect_launch
    from msgcli.engine.results import RunDirectory

    overrides = flag_overrides(epochs=epochs, batch_size=batch_size, lr=lr, mask_p=mask_p, two=two, surrogate=surrogate, seed=seed,
                               device=device, amp=amp, limit_batches=limit_batches, data_root=data_root, name=name,
                               loggers=["csv", "tensorboard"] if tensorboard else None,
                               skip_bad_samples=skip_bad_samples or None, workers=workers, auto_resume=auto_resume or None,
                               compile=compile or None)
    cfg = resolve_config(preset, config_file, overrides, sets, plugins)
    run = RunDirectory(out / (cfg.name or cfg.preset or "run"))
    if detect_launch().rank == 0:  # at once, before torch loads (the engine holds the directory itself)
        run.refuse_if_held()
    from msgcli.engine import loggers
    from msgcli.engine.train import train as run_training

    continuing = resume or (cfg.train.auto_resume and not overwrite and run.last.exists())
    if continuing and run.config.exists():
        # continue with the saved config (and its plugins); only flags given now change it (e.g. more --epochs)
        cfg = resolve_config(None, run.config, overrides, sets, plugins)
    loggers.require(cfg.train.loggers)
    result = run_training(cfg, out, resume=resume, overwrite=overwrite, progress=not quiet, console=console)
    s = result.summary
    if result.model is None:
        console.print(f"{s['run_dir']} finished already: best test accuracy {s['best_test_acc']:.2f}%, final "
                      f"{s['final_test_acc']:.2f}% after {s['epochs']} epochs; nothing to do", soft_wrap=True)
        return
    validation = ("" if s["best_val_acc"] is None else
                  f"best validation accuracy {s['best_val_acc']:.2f}% (test {s['test_acc_at_best_val']:.2f}% there, best.pt); ")
    console.print(f"[green]done[/green] {s['run_dir']}: {validation}best test accuracy {s['best_test_acc']:.2f}%, "
                  f"final {s['final_test_acc']:.2f}% after {s['epochs']} epochs in {s['seconds']:.0f}s", soft_wrap=True)


def _print_accuracy(title: str, accuracy: float, per_step: list[float]) -> None:
    table = Table(title=title)
    table.add_column("output")
    table.add_column("test accuracy (%)", justify="right")
    table.add_row("decoded (TWO / mean)", f"{accuracy:.2f}")
    for t, a in enumerate(per_step):
        table.add_row(f"timestep {t} alone", f"{a:.2f}")
    console.print(table)


@exit_on_user_errors
def eval_command(
    run_dir: RunDir,
    checkpoint: Checkpoint = "best",
    timesteps: Optional[int] = typer.Option(None, "--T", min=1, help="Evaluate at this many timesteps instead of the "
                                            "run's own (event data re-framed; output decoded by its mean over time)."),
    data_root: DataRoot = None,
    device: Device = None,
    workers: Workers = None,
    plugins: Plugins = [],  # noqa: B006 - typer's repeatable option
) -> None:
    """Test accuracy of a saved run, overall and per timestep (builds the test split only); writes
    eval-<checkpoint>.json (eval-<checkpoint>-T<N>.json at --T N)."""
    from msgcli import plugins as plugin_io
    from msgcli.engine.evaluate import run_evaluation
    from msgcli.engine.results import write_atomic

    check_choice("--checkpoint", checkpoint, ("best", "last"))
    plugin_io.load(plugins)
    result, path = run_evaluation(run_dir, checkpoint, flag_overrides(data_root=data_root, device=device, workers=workers),
                                  timesteps)
    if path is None:  # another rank of the job reports
        return
    T = len(result.timestep_accuracy)
    _print_accuracy(f"{run_dir} ({checkpoint}, T = {T})", result.accuracy, result.timestep_accuracy)
    report = {"checkpoint": checkpoint, "T": T, "test_acc": result.accuracy, "test_loss": result.loss,
              "test_acc_per_timestep": result.timestep_accuracy, "firing_rates": result.firing_rates, "samples": result.samples}
    write_atomic(path, json.dumps(report, indent=2) + "\n")
    console.print(f"saved {path}")


@exit_on_user_errors
def presets_command() -> None:
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
