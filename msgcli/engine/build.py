"""Turn a RunConfig into the model, decoder and loss it describes (no data: usable without the datasets' packages)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msgcli.config import RunConfig
from msgcli.engine import checkpoint
from msgcli.errors import ConfigError, UserError
from msgcli.snn import LIF, TWO, build_model


def neuron_options(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg.model.neuron)


def model_args(cfg: RunConfig, in_channels: int, num_classes: int) -> dict[str, Any]:
    """The arguments of :func:`build_model` for the backbone named in ``cfg.model`` with the configured neuron,
    BN mode, init and stem, sized for ``cfg.data``; checkpoints save them as ``model_args``.

    Unset (``None``) options fall back to the backbone's default inside :func:`build_model`.
    """
    m = cfg.model
    return dict(name=m.name, in_channels=in_channels, num_classes=num_classes, T=cfg.T, input_size=cfg.data.size,
                **neuron_options(cfg), bn_mode=m.bn_mode, init=m.init, stem=m.stem, stem_pool=m.stem_pool, recompute=m.recompute)


def build_model_from_config(cfg: RunConfig, in_channels: int, num_classes: int) -> nn.Module:
    return build_network(model_args(cfg, in_channels, num_classes))


def build_network(args: dict[str, Any]) -> nn.Module:
    """:func:`build_model` of ``args``; an unknown name or option is a ConfigError (one line), not a traceback."""
    try:
        return build_model(**args)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def trained_model(path: Path, cfg: RunConfig, T: int | None = None) -> tuple[nn.Module, TWO]:
    """The network and TWO decoder saved in a checkpoint, the network rebuilt from its ``model_args``.

    A checkpoint of an older msgsnn without them is rebuilt from ``cfg``, its input channels and
    classes read off the weights. ``T`` other than the trained ``cfg.T`` runs the same weights for
    ``T`` timesteps (the LIF keeps no state between calls); TWO's factors belong to the trained
    timesteps, so the decoder is then the plain mean over time.
    """
    state = checkpoint.load(path)
    args = state.get("model_args")
    if args is None:
        weights = [w for key, w in state["model"].items() if key.endswith("weight")]
        in_channels = next(w.shape[1] for w in weights if w.dim() == 4)
        args = model_args(cfg, in_channels, [w for w in weights if w.dim() == 2][-1].shape[0])
    other_T = T is not None and T != cfg.T
    model, two = build_network({**args, "T": T} if other_T else args), build_two(cfg)
    try:
        model.load_state_dict(state["model"])
        two.load_state_dict(state["two"])
    except RuntimeError as err:
        raise UserError(f"{path} does not fit the network its config.yaml describes: {str(err).splitlines()[0]}") from None
    return model, (TWO(T, enabled=False) if other_T else two)


def build_two(cfg: RunConfig) -> TWO:
    t = cfg.two
    return TWO(cfg.T, rule=t.rule, warmup_epochs=t.warmup_epochs, momentum=t.momentum, enabled=t.enabled)


def spiking_layers(model: nn.Module) -> dict[str, LIF]:
    """Every LIF layer by module path (``features.0.2``), DDP/compile wrappers stripped."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return {name: m for name, m in inner.named_modules() if isinstance(m, LIF)}


def build_optimizer(cfg: RunConfig, params, world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum as ``cfg.optim`` says, at the configured lr for a job of ``world_size``
    processes (the schedule sets it per epoch). AdamW on CUDA parameters is the fused one: one kernel a step
    for all of them instead of several per tensor."""
    lr = cfg.lr(world_size)
    params = list(params)
    if cfg.optim.name == "adamw":
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.optim.weight_decay, fused=fused or None)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``train.compile``: ``model`` under ``torch.compile``, with CUDA graphs on CUDA (``reduce-overhead``: the
    step's hundreds of launches become one replay) and the default mode on the CPU.

    The spiking layers are single graph nodes (:mod:`msgcli.snn.kernels.ops`). Random operators in the graph
    (the Triton mask's key) run as torch's own (inductor's ``fallback_random``), so a compiled run draws the
    numbers an uncompiled one does. The state dict stays the module's own: save ``model``'s original.
    Compiled, the layers run one by one (inductor plans the memory), so ``model.recompute`` is refused.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor import cpp_builder

    if any(getattr(module, "recompute", False) is True for module in model.modules()):
        raise UserError("train.compile and model.recompute: recomputation runs outside torch.compile's graph; "
                        "choose one of them")
    if device.type == "cpu":
        try:
            cpp_builder.get_cpp_compiler()
        except Exception as err:  # noqa: BLE001 - whatever stops inductor finding one
            raise UserError(f"train.compile: torch.compile on the CPU needs a C++ compiler ({err}); install g++ "
                            "(or set CXX), or train without --compile") from None
    inductor_config.fallback_random = True
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, two: TWO, cfg: RunConfig) -> torch.Tensor:
    """CE on the decoded output; or TET: CE at every timestep plus a small MSE pull to 1."""
    smoothing = cfg.loss.label_smoothing
    if cfg.loss.name == "tet":
        T = logits.shape[0]
        per_step = F.cross_entropy(logits.flatten(0, 1), targets.repeat(T), label_smoothing=smoothing)
        pull = F.mse_loss(logits, torch.ones_like(logits))
        return (1 - cfg.loss.tet_lambda) * per_step + cfg.loss.tet_lambda * pull
    return F.cross_entropy(two(logits), targets, label_smoothing=smoothing)
