"""Models registered by name and created by one call, as in timm."""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

from torch import nn

from msgcli.errors import did_you_mean
from msgcli.snn.layers import set_recompute
from msgcli.snn.neuron import LIF

_MODELS: dict[str, Callable[..., nn.Module]] = {}

NEURON_OPTIONS = tuple(inspect.signature(LIF).parameters)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register the backbone ``fn`` under its name (a decorator); a second model of the same name replaces the first,
    with a warning. ``model.name: <fn's name>`` then selects it, in a config or with ``--set``.

    The contract: ``fn(in_channels, num_classes, T, neuron, input_size=None, **options)`` returns a module that maps
    ``[B, T, C, H, W]`` event clips (or ``[B, C, H, W]`` images, to be repeated over T) to per-timestep logits
    ``[T, B, num_classes]``. ``neuron`` is the dict of LIF keyword arguments from ``model.neuron`` (``LIF(**neuron)``
    builds each spiking layer, so MSG and the surrogate apply); ``input_size`` is the input's height and width
    (``data.size``). ``options`` are the model's other config keys (``bn_mode``, ``init``, ``stem``,
    ``stem_pool``): a backbone that takes ``**options`` receives them all and may ignore those it does not use;
    one without it receives only those it names, and an option it does not name is an error.
    """
    if fn.__name__ in _MODELS and _MODELS[fn.__name__] is not fn:
        warnings.warn(f"register_model: '{fn.__name__}' was already registered ({_MODELS[fn.__name__].__module__}); "
                      f"{fn.__module__}'s replaces it", RuntimeWarning, stacklevel=2)
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, in_channels: int, num_classes: int, T: int, input_size: int | None = None, **options) -> nn.Module:
    """Create a registered spiking network.

    ``options`` holds LIF options (``tau``, ``surrogate``, ``mask_p``, ...) and the
    model's own (``bn_mode``, ``init`` for every backbone; ``stem``, ``stem_pool`` for the
    ResNets). An option set to ``None`` is dropped, so the backbone's own default applies
    (as timm's ``create_model`` does): a caller passes every configured option without asking
    which backbone takes it. ``input_size`` (the input's height and width) describes the data,
    not a choice: it reaches the backbones whose layers depend on it (the VGGs' flatten head,
    CIFARNet's check of its pooling stages) and is not needed by the others.
    The model maps ``[B, T, C, H, W]`` events or ``[B, C, H, W]`` images to
    per-timestep logits ``[T, B, num_classes]``. ``recompute=True`` keeps only each conv-BN-LIF block's input
    spikes (as bits) for backward and recomputes the block there (:mod:`msgcli.snn.layers.recompute`).
    """
    if name not in _MODELS:
        raise ValueError(f"model name: unknown '{name}'{did_you_mean(name, _MODELS)}; choose one of {', '.join(list_models())}")
    for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("T", T)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{key}: must be a positive integer, got {value!r}")
    recompute = options.pop("recompute", None)
    options = {k: v for k, v in options.items() if v is not None}
    neuron = {k: v for k, v in options.items() if k in NEURON_OPTIONS}
    model_options = {k: v for k, v in options.items() if k not in NEURON_OPTIONS}
    builder = _MODELS[name]
    parameters = inspect.signature(builder).parameters
    accepted = set(parameters)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(model_options) - accepted)
    if unknown and not takes_any:
        allowed = sorted((accepted - {"in_channels", "num_classes", "T", "neuron", "input_size"}) | set(NEURON_OPTIONS))
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)} "
                         "(a backbone that takes **options receives every option and may ignore them)")
    if input_size is not None and ("input_size" in accepted or takes_any):
        model_options["input_size"] = input_size
    model = builder(in_channels=in_channels, num_classes=num_classes, T=T, neuron=neuron, **model_options)
    if recompute and not set_recompute(model, True):
        raise ValueError(f"recompute: {name} has no conv-BatchNorm-LIF block in a SpikingSequential to recompute")
    return model
