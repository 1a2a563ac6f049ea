"""What the commands share: the consoles, the flags as ``Annotated`` types, config resolution and the error exit.

A flag that several commands take is declared once here; a command takes it as a parameter of
that type (``epochs: Epochs = None``). :func:`flag_overrides` maps the flags to config keys.
Nothing heavy is imported here, so ``msgsnn --help`` answers at once.
"""

from __future__ import annotations

import functools
import os
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from msgcli import config as config_io
from msgcli import plugins as plugin_io
from msgcli.config import RunConfig
from msgcli.errors import ConfigError, MsgsnnError, PeerFailed, traceback_file
from msgcli.snn import surrogate

console = Console()
err_console = Console(stderr=True)


def exit_on_user_errors(fn: Callable) -> Callable:
    """Turn the errors a user can act on into one line on stderr and a non-zero exit code."""

    def fail(label: str, err: BaseException | str, code: int) -> typer.Exit:
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
        except PeerFailed as err:  # rank 0 has printed the reason
            raise typer.Exit(err.exit_code) from None
        except MsgsnnError as err:
            raise fail("error", err, err.exit_code) from None
        except Exception as err:
            if os.environ.get("MSGSNN_DEBUG"):
                traceback.print_exc()
            kept = traceback_file(err)
            where = f"full traceback in {kept}" if kept else "set MSGSNN_DEBUG=1 for the traceback"
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise fail("internal error", f"{type(err).__name__}: {first} ({where})", 1) from None

    return wrapper


def _or(names: tuple[str, ...]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


# ---- flags shared by several commands (a parameter named e.g. ``data_root`` becomes ``--data-root``)
Preset = Annotated[Optional[str], typer.Option(
    "--preset", "-p", help="Preset name (see `msgsnn presets`) or a YAML file. Default: digits-dvs.")]
DataRoot = Annotated[Optional[str], typer.Option(help="Folder holding the datasets (default $MSGSNN_DATA or ~/datasets).")]
Epochs = Annotated[Optional[int], typer.Option(help="Number of epochs.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Batch size per process (lr scales with it).")]
Two = Annotated[Optional[bool], typer.Option("--two/--no-two", help="Temporally weighted output (TWO) on/off.")]
Surrogate = Annotated[Optional[str], typer.Option(help=f"{_or(surrogate.names())}, or a name given to register_surrogate.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed (of a sweep: its first).")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or auto.")]
Amp = Annotated[Optional[str], typer.Option(help="Mixed precision: none, bf16 or fp16.")]
LimitBatches = Annotated[Optional[int], typer.Option(help="Cap train and test batches per epoch (smoke runs).")]
Workers = Annotated[Optional[int], typer.Option(
    min=0, help="DataLoader worker processes (data.num_workers; default: the CPUs this process may use, less one, at most 16).")]
SkipBadSamples = Annotated[bool, typer.Option(
    "--skip-bad-samples", help="Skip and count unusable recordings (empty, unreadable, from another sensor) instead of stopping.")]
Sets = Annotated[list[str], typer.Option(
    "--set", help="Override any config key: --set model.neuron.alpha=4 (repeatable).")]
Checkpoint = Annotated[str, typer.Option(help="Which checkpoint of the run: best or last.")]
Jobs = Annotated[int, typer.Option(min=1, help="Runs at once on this machine (one GPU each when several are visible).")]
Backend = Annotated[str, typer.Option(help="local, or ray: every run a Ray task (needs Ray: pip install ray).")]
RayAddress = Annotated[Optional[str], typer.Option(
    help="Address of a running Ray cluster (default: RAY_ADDRESS, else a local Ray).")]
RunDir = Annotated[Path, typer.Argument(help="A run directory written by `msgsnn train`.")]
Plugins = Annotated[list[str], typer.Option(
    "--plugin", metavar="FILE.py|MODULE", help="A plugin that registers backbones, surrogates or datasets: a file (plugin.py) or a module "
                     "(package.module); repeatable. Recorded in the run's config, so later commands load it themselves.")]
Lr = Annotated[Optional[float], typer.Option(help="Learning rate itself (optim.lr), instead of base_lr * batch / 1024.")]

FLAG_KEYS = {  # flag -> the config key it sets
    "epochs": "train.epochs", "batch_size": "train.batch_size", "mask_p": "model.neuron.mask_p",
    "two": "two.enabled", "surrogate": "model.neuron.surrogate", "seed": "train.seed", "device": "train.device",
    "amp": "train.amp", "limit_batches": "train.limit_batches", "data_root": "data.root", "name": "name",
    "loggers": "train.loggers", "skip_bad_samples": "data.skip_bad_samples", "lr": "optim.lr",
    "workers": "data.num_workers", "auto_resume": "train.auto_resume", "compile": "train.compile",
}


def flag_overrides(**flags: Any) -> dict[str, Any]:
    """Dotted-key overrides from the flags the user actually gave (None = not given)."""
    return {FLAG_KEYS[k]: v for k, v in flags.items() if v is not None}


def resolve_config(preset: str | None, config_file: Path | None, overrides: dict[str, Any], sets: list[str],
                   plugins: list[str] = ()) -> RunConfig:
    """Preset (or saved config.yaml) + ``--plugin`` + flags + ``--set key=value``, validated.

    The plugins are imported first, so the names they register are valid in the preset and the flags.
    """
    added = plugin_io.load(plugins)
    if config_file is not None:
        if not config_file.exists():
            raise ConfigError(f"--config: no such file {config_file}")
        cfg = config_io.load(config_file)
    else:
        cfg = config_io.load_preset(preset or "digits-dvs")
    merged = dict(overrides)
    merged.update(dict(config_io.parse_override(s) for s in sets))
    return config_io.with_plugins(config_io.apply_overrides(cfg, merged), added)


def check_choice(flag: str, value: str, choices: tuple[str, ...], error: type[MsgsnnError] = ConfigError) -> None:
    """``error`` naming ``flag`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise error(f"{flag}: {value!r} is not allowed; choose one of {', '.join(choices)}")
