"""Turn a RunConfig into the model, decoder and loss it describes (no data: usable without the datasets' packages)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from msgsnn.config import RunConfig
from msgsnn.snn import LIF, TWO, build_model


def neuron_options(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg.model.neuron)


def build_model_from_config(cfg: RunConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The backbone named in ``cfg.model`` with the configured neuron, BN mode, init and stem, sized for ``cfg.data``.

    Unset (``None``) options fall back to the backbone's default inside :func:`build_model`.
    """
    m = cfg.model
    options = dict(neuron_options(cfg), bn_mode=m.bn_mode, init=m.init, stem=m.stem, stem_pool=m.stem_pool)
    return build_model(m.name, in_channels, num_classes, cfg.T, input_size=cfg.data.size, **options)


def build_two(cfg: RunConfig) -> TWO:
    t = cfg.two
    return TWO(cfg.T, rule=t.rule, warmup_epochs=t.warmup_epochs, momentum=t.momentum, enabled=t.enabled)


def spiking_layers(model: nn.Module) -> dict[str, LIF]:
    """Every LIF layer by module path (``features.0.2``), DDP/compile wrappers stripped."""
    inner = getattr(model, "module", model)
    return {name: m for name, m in inner.named_modules() if isinstance(m, LIF)}


def build_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum as ``cfg.optim`` says, at the configured lr (the schedule sets it per epoch)."""
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.optim.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)


def compute_loss(logits: torch.Tensor, targets: torch.Tensor, two: TWO, cfg: RunConfig) -> torch.Tensor:
    """CE on the decoded output; or TET: CE at every timestep plus a small MSE pull to 1."""
    smoothing = cfg.loss.label_smoothing
    if cfg.loss.name == "tet":
        T = logits.shape[0]
        per_step = F.cross_entropy(logits.flatten(0, 1), targets.repeat(T), label_smoothing=smoothing)
        pull = F.mse_loss(logits, torch.ones_like(logits))
        return (1 - cfg.loss.tet_lambda) * per_step + cfg.loss.tet_lambda * pull
    return F.cross_entropy(two(logits), targets, label_smoothing=smoothing)
