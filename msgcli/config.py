"""One typed configuration schema for presets, CLI overrides and saved runs.

A run is described by a :class:`RunConfig` tree of dataclasses. Presets (YAML),
``--set key.path=value`` overrides and a saved ``config.yaml`` all go through
:func:`from_dict` / :func:`apply_overrides`, which check every key, type, choice
and range and raise :class:`ConfigError` with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from msgcli import plugins as plugin_io
from msgcli.errors import ConfigError, did_you_mean
from msgcli.snn import options
from msgcli.snn.surrogate import fill_names, names as surrogate_names


def _preset_dir() -> Path:
    """``$MSGSNN_PRESETS``; else the presets an installed package ships (``msgcli/presets/``), else the checkout's ``presets/``."""
    if os.environ.get("MSGSNN_PRESETS"):
        return Path(os.environ["MSGSNN_PRESETS"])
    package = Path(__file__).resolve().parent
    shipped = package / "presets"
    return shipped if shipped.is_dir() else package.parent / "presets"


PRESET_DIR = _preset_dir()

LOGGERS = ("csv", "tensorboard")


def _choice(*values: str, default: str | None) -> Any:
    return field(default=default, metadata={"choices": values})


def _live_choice(values: Callable[[], tuple[str, ...]], default: str) -> Any:
    """A choice among ``values()`` as they are when a config is checked: surrogates registered by plugins count."""
    return field(default=default, metadata={"choices": values})


def _ranged(default: float | None, lo: float | None = None, hi: float | None = None) -> Any:
    return field(default=default, metadata={"range": (lo, hi)})


def _listed(*values: str, default: tuple[str, ...], required: tuple[str, ...] = ()) -> Any:
    """A list of choices; ``required`` ones must be in it."""
    return field(default_factory=lambda: list(default), metadata={"choices": values, "required": required})


@dataclass
class NeuronConfig:
    """LIF neuron, surrogate gradient and MSG mask (see docs/method.md)."""

    tau: float = _ranged(2.0, 1.0)
    v_threshold: float = 0.5
    surrogate: str = _live_choice(surrogate_names, default="piecewise_linear")
    alpha: float = _ranged(2.0, 0.0)
    mask_p: float = _ranged(0.5, 0.0, 1.0)
    mask_mode: str = _choice(*options.MASK_MODES, default="element")
    mask_fill: str = _live_choice(fill_names, default="zero")
    rescale: bool = False
    reset: str = _choice(*options.RESETS, default="hard")
    detach_reset: bool = False
    backend: str = _choice(*options.BACKENDS, default="auto")


@dataclass
class ModelConfig:
    """The backbone. ``init``: ``release`` (each backbone as the authors' code initialises it) or
    ``kaiming`` (Kaiming-normal convolutions). ``stem`` and ``stem_pool`` apply to the ResNets;
    unset (null), the backbone's default applies: the ImageNet stem, average-pooled for resnet18
    (the release's ``ResNet18(pool='avg')``), max-pooled for the SEW-ResNets. ``recompute``: keep only each
    conv-BN-LIF block's input spikes (as bits) for backward and recompute the block there: less memory, a
    slower step, the same gradients."""

    name: str = "vggsnn"
    stem: str | None = _choice("imagenet", "cifar", default=None)
    stem_pool: str | None = _choice("avg", "max", default=None)
    init: str = _choice("release", "kaiming", default="release")
    bn_mode: str = _choice(*options.BN_MODES, default="per_step")
    recompute: bool = False
    neuron: NeuronConfig = field(default_factory=NeuronConfig)


@dataclass
class AugmentConfig:
    """Training augmentation; event clips are transformed jointly over T.

    Images only: ``autoaugment`` (CIFAR) with ``autoaugment_policy`` ``release`` (the authors'
    CIFAR10 policy: grey fill, rotation one way) or ``torchvision``; ``color_jitter`` (the
    release's ImageNet ColorJitter(0.2, 0.2, 0.2, 0.1)); ``cutout`` side with ``cutout_fill``
    ``black`` (before Normalize, the release) or ``mean`` (after it); ``normalize`` the CIFAR
    constants, train and test: ``release`` or ``measured`` (the training set's pixel statistics).
    """

    crop: bool = True
    crop_padding: int = _ranged(4, 0)
    flip: bool = True
    rotate: float = _ranged(15.0, 0.0, 180.0)
    roll: int = _ranged(0, 0)
    autoaugment: bool = True
    autoaugment_policy: str = _choice("release", "torchvision", default="release")
    color_jitter: bool = False
    cutout: int = _ranged(16, 0)
    cutout_fill: str = _choice("black", "mean", default="black")
    normalize: str = _choice("release", "measured", default="release")


@dataclass
class DataConfig:
    """The dataset. ``train_fraction``: per class, the share of the recordings that train where a dataset has no
    official split. ``val_fraction``: per class, the share of the training set held out for validation, which then
    chooses ``best.pt`` (0: none, and the test set chooses it, as in the authors' release). ``sensor_size``: ``[W, H]``
    or ``[W, H, P]`` of ``event-folder`` recordings (empty: the recordings' extent, 2 polarities).
    ``frame_tail``: ``drop`` frames events as tonic's ``ToFrame`` (and the release) does, its last
    bin ending before the recording's last event; ``keep`` counts that event in the last bin."""

    name: str = "digits-dvs"
    root: str = ""
    size: int = _ranged(48, 4)
    frame_tail: str = _choice("drop", "keep", default="drop")
    train_fraction: float = _ranged(0.9, 0.0, 1.0)
    val_fraction: float = _ranged(0.0, 0.0, 0.9)
    sensor_size: list[int] = field(default_factory=list)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_dir: str = ""
    skip_bad_samples: bool = False
    balanced_sampler: bool = False
    num_workers: int | None = _ranged(None, 0)  # null: from the CPUs this process may use (data.resolve_workers)

    def __post_init__(self) -> None:
        if self.sensor_size and (len(self.sensor_size) not in (2, 3) or min(self.sensor_size) < 1):
            raise ConfigError(f"data.sensor_size: expected [W, H] or [W, H, P] of positive integers, got {self.sensor_size}")


@dataclass
class TWOConfig:
    """Temporally weighted output; ``momentum`` is 0.7 in the release, beta in the paper."""

    enabled: bool = True
    rule: str = _choice("release", "paper", default="release")
    warmup_epochs: int = _ranged(5, 0)
    momentum: float = _ranged(0.7, 0.0, 1.0)


@dataclass
class OptimConfig:
    """AdamW with lr = base_lr * batch / 1024 unless ``lr`` is set (> 0).

    ``lr_batch``: ``process`` scales by the batch of one process, as the release's ``main.py``
    computes it (its ``world_size`` stays 1); ``global`` by the batch of all processes together.
    """

    name: str = _choice("adamw", "sgd", default="adamw")
    lr: float = _ranged(0.0, 0.0)
    base_lr: float = _ranged(0.05, 0.0)
    lr_batch: str = _choice("process", "global", default="process")
    weight_decay: float = _ranged(0.0, 0.0)
    momentum: float = _ranged(0.9, 0.0, 1.0)
    warmup_epochs: int = _ranged(0, 0)
    min_lr_ratio: float = _ranged(1e-5, 0.0, 1.0)


@dataclass
class LossConfig:
    name: str = _choice("ce", "tet", default="ce")
    label_smoothing: float = _ranged(0.0, 0.0, 1.0)
    tet_lambda: float = _ranged(0.05, 0.0, 1.0)


@dataclass
class TrainConfig:
    """How a run trains and survives a cluster.

    ``dist_timeout``: seconds a collective (or the processes' first meeting) may wait for a peer before the
    run stops, passed to ``init_process_group``; 30 minutes by default, against NCCL's 10, since no collective
    waits on data building. ``auto_resume``: resume when the run directory holds a checkpoint, start when it
    holds none, exit 0 untouched when the run has finished. ``checkpoint_minutes``: also write the exact
    mid-epoch checkpoint between batches this often (0: at epoch ends only). ``deterministic``: torch's
    deterministic algorithms, raising on an operator that has none (CUDA; the CPU path is deterministic as it is).
    ``compile``: ``torch.compile`` the model for training and evaluation (CUDA: CUDA graphs, ``reduce-overhead``;
    CPU: the default mode); the run's numbers stay those of an uncompiled run, within float rounding.
    """

    epochs: int = _ranged(120, 1)
    batch_size: int = _ranged(64, 1)
    limit_batches: int = _ranged(0, 0)
    seed: int = 42
    device: str = _choice("auto", "cpu", "cuda", default="auto")
    amp: str = _choice("none", "bf16", "fp16", default="none")
    deterministic: bool = False
    compile: bool = False
    sync_bn: bool = False
    threads: int = _ranged(0, 0)
    dist_timeout: float = _ranged(1800.0, 1.0)
    auto_resume: bool = False
    checkpoint_minutes: float = _ranged(30.0, 0.0)
    loggers: list[str] = _listed(*LOGGERS, default=("csv",), required=("csv",))  # metrics.csv is the source of truth


@dataclass
class PaperAblation:
    """The paper's ablation row for this setup, top-1 % of each variant (it gives no spread for them)."""

    baseline: float | None = _ranged(None, 0.0, 100.0)
    two: float | None = _ranged(None, 0.0, 100.0)  # + TWO
    msg: float | None = _ranged(None, 0.0, 100.0)  # + MSG
    msg_two: float | None = _ranged(None, 0.0, 100.0)  # MSG + TWO


@dataclass
class PaperConfig:
    """What the paper reports for this setup (preset metadata, not used in training): top-1 %, its spread
    over seeds, and, for the setups of its ablation, the four variants."""

    accuracy: float | None = _ranged(None, 0.0, 100.0)
    std: float | None = _ranged(None, 0.0, 100.0)
    note: str = ""
    ablation: PaperAblation = field(default_factory=PaperAblation)


@dataclass
class RunConfig:
    name: str = ""
    preset: str = ""
    plugins: list[str] = field(default_factory=list)  # files (absolute paths) or modules, imported before validation
    T: int = _ranged(10, 1)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    two: TWOConfig = field(default_factory=TWOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)

    def lr(self, world_size: int) -> float:
        """The learning rate actually used by a job of ``world_size`` processes: explicit, or
        ``base_lr * batch / 1024`` with the batch of one process (``optim.lr_batch: process``, the
        release's ``main.py``) or of all of them (``global``: ``batch_size * world_size``)."""
        if self.optim.lr > 0:
            return self.optim.lr
        processes = world_size if self.optim.lr_batch == "global" else 1
        return self.optim.base_lr * self.train.batch_size * processes / 1024


# ---------------------------------------------------------------- conversion


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (YAML or a CLI string) to ``tp``, or raise ConfigError naming ``key``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typing.get_origin(tp) is list:
        if isinstance(value, str):  # from the command line: "csv,tensorboard" or "[csv, tensorboard]"
            value = [part.strip(" '\"") for part in value.strip().strip("[]").split(",") if part.strip(" '\"")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, typing.get_args(tp)[0], key) for item in value]
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = f.metadata.get("choices")
    if callable(choices):
        choices = choices()
    for item in value if isinstance(value, list) else [value]:
        if choices and item is not None and item not in choices:
            hint = did_you_mean(item, choices) if isinstance(item, str) else ""
            raise ConfigError(f"{key}: {item!r} is not allowed; choose one of {', '.join(choices)}{hint}")
    missing = [item for item in f.metadata.get("required", ()) if item not in value]
    if missing:
        raise ConfigError(f"{key}: must include {', '.join(missing)} (always written); e.g. [{', '.join(choices)}]")
    lo, hi = f.metadata.get("range", (None, None))
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key}: {value!r} is outside the allowed range {bounds}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in fields:
            valid = [prefix + name for name in fields]
            raise ConfigError(f"unknown config key '{full}'{did_you_mean(full, valid)}; valid keys here: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full + ".")
        else:
            kwargs[key] = _coerce(value, tp, full)
            _check(fields[key], kwargs[key], full)
    return cls(**kwargs)


def from_dict(data: dict[str, Any] | None) -> RunConfig:
    """Build and validate a RunConfig from nested dicts (YAML), after importing the plugins it names (and the
    installed packages' plugins), so that the backbones, surrogates and datasets they register are valid names."""
    data = dict(data or {})
    data["plugins"] = plugin_io.load(_coerce(data.get("plugins") or [], list[str], "plugins"))
    return _build(RunConfig, data, "")


def with_plugins(cfg: RunConfig, specs: list[str]) -> RunConfig:
    """``cfg`` with ``specs`` (``--plugin``, imported now) added to its ``plugins`` list."""
    added = plugin_io.load(specs)
    return apply_overrides(cfg, {"plugins": list(dict.fromkeys([*cfg.plugins, *added]))}) if added else cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, for suggestions and docs."""
    keys = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a new config with dotted-key overrides applied and re-validated."""
    data = to_dict(cfg)
    valid = all_keys()
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(f"unknown config key '{key}'{did_you_mean(key, valid)}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return from_dict(data)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if isinstance(data.get("plugins"), list):  # a plugin file a YAML file names lies beside it
        data["plugins"] = [str(Path(path).parent / spec) if isinstance(spec, str) and plugin_io.is_file(spec)
                           and not Path(spec).expanduser().is_absolute() else spec for spec in data["plugins"]]
    return data


def load_preset(name: str) -> RunConfig:
    """A preset by name (``presets/<name>.yaml``) or by path to a YAML file."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        names = list_presets()
        raise ConfigError(f"unknown preset '{name}'{did_you_mean(name, names)}; available: {', '.join(names)}")
    cfg = from_dict(load_yaml(path))
    if not cfg.preset:
        cfg.preset = path.stem
    return cfg


def save(cfg: RunConfig, path: Path) -> None:
    """Write ``config.yaml`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
    os.replace(tmp, path)


def load(path: Path) -> RunConfig:
    return from_dict(load_yaml(path))
