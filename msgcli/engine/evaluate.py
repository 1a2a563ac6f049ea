"""Evaluation under no-grad: accuracy of the decoded output and of each timestep alone, firing rates."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from msgcli.config import RunConfig
from msgcli.engine import distributed
from msgcli.engine.build import spiking_layers
from msgcli.data import resolve_workers
from msgcli.data.registry import start_loading, worker_processes
from msgcli.engine.sampling import ignore_stop_signals
from msgcli.snn import TWO


def autocast(device: torch.device, amp: str):
    """Mixed precision for the forward pass: ``none``, ``bf16`` or ``fp16`` (CPU and CUDA)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class EvalResult:
    loss: float
    accuracy: float  # percent
    timestep_accuracy: list[float]  # percent, output at timestep t alone
    firing_rates: dict[str, float] = field(default_factory=dict)  # mean spikes per neuron and timestep
    samples: int = 0


def test_loader(dataset: Dataset, cfg: RunConfig, ctx: distributed.DistContext, pin: bool) -> DataLoader:
    """This rank's share of the test set (every world_size-th sample, no padding: counts stay exact); its
    workers persist from one evaluation to the next."""
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    workers = resolve_workers(cfg.data.num_workers)
    return DataLoader(shard, batch_size=cfg.train.batch_size, shuffle=False, **worker_processes(workers),
                      persistent_workers=workers > 0, pin_memory=pin, worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(cfg.train.seed))


@torch.no_grad()
def evaluate(
    model: nn.Module, two: TWO, loader: DataLoader, cfg: RunConfig, ctx: distributed.DistContext, limit: int = 0
) -> EvalResult:
    was_training = model.training
    eager = getattr(model, "_orig_mod", model)  # a compiled model's last, smaller batch runs eagerly: shapes stay static
    model.eval()
    two.eval()
    layers = spiking_layers(model)
    spike_sums = torch.zeros(len(layers), 2, dtype=torch.float64, device=ctx.device)

    def counter(index: int):
        def hook(module, inputs, output):
            spike_sums[index, 0] += output.sum(dtype=torch.float64)
            spike_sums[index, 1] += output.numel()
        return hook

    handles = [m.register_forward_hook(counter(i)) for i, m in enumerate(layers.values())]
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, samples
    per_step = torch.zeros(cfg.T, dtype=torch.float64, device=ctx.device)
    try:
        for i, (inputs, targets) in enumerate(start_loading(loader)):
            if limit and i >= limit:
                break
            inputs, targets = inputs.to(ctx.device), targets.to(ctx.device)
            with autocast(ctx.device, cfg.train.amp):
                logits = (model if inputs.shape[0] == loader.batch_size else eager)(inputs)
            logits = logits.float()
            decoded = two(logits)
            totals[0] += F.cross_entropy(decoded, targets, reduction="sum")
            totals[1] += (decoded.argmax(-1) == targets).sum()
            totals[2] += targets.numel()
            per_step += (logits.argmax(-1) == targets[None]).sum(1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        two.train(was_training)
    for tensor in (totals, per_step, spike_sums):
        distributed.all_reduce_sum(tensor, ctx)
    n = max(totals[2].item(), 1.0)
    rates = {name: (spike_sums[i, 0] / spike_sums[i, 1].clamp(min=1)).item() for i, name in enumerate(layers)}
    return EvalResult(
        loss=totals[0].item() / n, accuracy=100 * totals[1].item() / n,
        timestep_accuracy=(100 * per_step / n).tolist(), firing_rates=rates, samples=int(totals[2].item()),
    )


def run_evaluation(run_dir: Path, which: str, overrides: dict, T: int | None = None) -> tuple[EvalResult, Path | None]:
    """Evaluate ``run_dir``'s best or last checkpoint on its test set (the only split it builds); returns the result
    and the report path (``None`` on every rank but rank 0 of an ``srun``/``torchrun`` job: one process writes it).

    ``T`` other than the run's evaluates the same weights at ``T`` timesteps: event data is framed
    at ``T`` bins (and cached so), images are repeated ``T`` times, and the output is decoded by
    its mean over time (TWO's factors belong to the trained timesteps). Report: ``eval-<which>.json``,
    or ``eval-<which>-T<T>.json`` at another ``T``.
    """
    from msgcli import config as config_io
    from msgcli.data import build_datasets
    from msgcli.engine.build import trained_model
    from msgcli.errors import ConfigError, UserError
    from msgcli.engine.results import RunDirectory

    run = RunDirectory(run_dir)
    if not run.config.exists():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    trained = config_io.apply_overrides(config_io.load(run.config), overrides)
    if T is not None and T < 1:
        raise ConfigError(f"--T: must be at least 1, got {T}")
    other_T = T is not None and T != trained.T
    cfg = config_io.apply_overrides(trained, {"T": T}) if other_T else trained
    ctx = distributed.setup(cfg.train.device, cfg.train.dist_timeout, resolve_workers(cfg.data.num_workers))
    try:
        model, two = trained_model(run.best if which == "best" else run.last, trained, T=cfg.T)
        model, two = model.to(ctx.device), two.to(ctx.device)
        bundle = distributed.main_first(ctx, lambda: build_datasets(cfg, progress=ctx.is_main, splits=("test",)))
        loader = test_loader(bundle.test, cfg, ctx, pin=ctx.device.type == "cuda")
        report = run.path / (f"eval-{which}-T{cfg.T}.json" if other_T else f"eval-{which}.json")
        return evaluate(model, two, loader, cfg, ctx), report if ctx.is_main else None
    finally:
        distributed.teardown(ctx)
