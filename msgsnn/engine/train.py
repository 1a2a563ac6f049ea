"""The training loop, top to bottom: setup, data, model, optimizer, then the epochs.

Each epoch: train (MSG in the spike backward, TWO counts observed per batch),
evaluate (accuracy overall and per timestep, firing rate per spiking layer),
update TWO once, then write the checkpoint and the metrics row. SIGINT/SIGTERM
stop after the current batch with a checkpoint that ``--resume`` continues
exactly; a NaN loss stops with the last good checkpoint untouched.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from msgsnn import config as config_io
from msgsnn.config import RunConfig
from msgsnn.data import build_datasets
from msgsnn.engine import checkpoint, distributed
from msgsnn.engine.build import build_model_from_config, build_optimizer, build_two, compute_loss, spiking_layers
from msgsnn.engine.errors import Interrupted, NonFiniteLoss
from msgsnn.engine.evaluate import autocast, evaluate, test_loader
from msgsnn.engine.results import RunDirectory, append_row_locked
from msgsnn.engine.sampling import EpochSampler, SeededDataset, epoch_generator
from msgsnn.snn import TWO

log = logging.getLogger("msgsnn")


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: nn.Module
    two: TWO
    run: RunDirectory


def lr_at(epoch: int, cfg: RunConfig) -> float:
    """Linear warm-up (optional), then cosine from the base lr to ``min_lr_ratio`` of it, per epoch."""
    base, o, epochs = cfg.lr, cfg.optim, cfg.train.epochs
    if epoch < o.warmup_epochs:
        return base * (epoch + 1) / (o.warmup_epochs + 1)
    progress = (epoch - o.warmup_epochs) / max(1, epochs - o.warmup_epochs)
    floor = base * o.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checks it between batches."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, ctx: distributed.DistContext) -> bool:
        """True on every rank as soon as any rank was asked to stop."""
        if not ctx.enabled:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=ctx.device)
        return bool(distributed.all_reduce_sum(flag, ctx).item() > 0)


def make_progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=True,
    )


def setup_logging(path: Path | None) -> None:
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if path is not None:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def train(
    cfg: RunConfig, out_dir: Path, *, resume: bool = False, overwrite: bool = False,
    progress: bool = True, console: Console | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``out_dir/<cfg.name>``; returns the summary and the trained modules."""
    console = console or Console(stderr=False)
    ctx = distributed.setup(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    name = cfg.name or cfg.preset or "run"
    run = RunDirectory(Path(out_dir) / name)
    cfg.name = name

    def prepare_run_directory() -> None:
        run.prepare(resume=resume, overwrite=overwrite)
        config_io.save(cfg, run.config)

    distributed.main_first(ctx, prepare_run_directory, others=False)
    setup_logging(run.log if ctx.is_main else None)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    # ---- data (rank 0 builds the cache first; if it cannot, every rank stops)
    bundle = distributed.main_first(ctx, lambda: build_datasets(cfg, progress=progress and ctx.is_main))
    info = bundle.info
    log.info("data %s: %d train / %d test samples, input %s, %d classes", info.name, info.n_train, info.n_test, info.input_shape, info.num_classes)
    pin = ctx.device.type == "cuda"
    test_batches = test_loader(bundle.test, cfg, ctx, pin)

    # ---- model, decoder, optimizer
    model = build_model_from_config(cfg, info.in_channels, info.num_classes).to(ctx.device)
    if ctx.enabled and cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    two = build_two(cfg).to(ctx.device)
    raw_model = model
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if pin else None)
    optimizer = build_optimizer(cfg, model.parameters())
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.amp == "fp16")

    # ---- resume
    state = {"epoch": 0, "batch": 0, "sums": None, "rows": [], "best": -1.0, "seconds": 0.0}
    if resume and run.last.exists():
        ck = checkpoint.load(run.last, map_location=ctx.device)
        raw_model.load_state_dict(ck["model"])
        two.load_state_dict(ck["two"])
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        checkpoint.set_rng_state(ck["rng"])
        state = {k: ck[k] for k in state}
        console.print(f"resuming {run.path} at epoch {state['epoch'] + 1}, batch {state['batch']}")

    def save_checkpoint(epoch: int, batch: int, sums: dict | None, path: Path) -> None:
        if not ctx.is_main:
            return
        checkpoint.save({
            "model": raw_model.state_dict(), "two": two.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "scheduler": {"epoch": epoch, "lr": lr_at(min(epoch, cfg.train.epochs - 1), cfg)},
            "epoch": epoch, "batch": batch, "sums": sums, "rows": state["rows"], "best": state["best"],
            "seconds": state["seconds"], "config": config_io.to_dict(cfg), "rng": checkpoint.rng_state(),
        }, path)

    # ---- the loop
    layers = list(spiking_layers(raw_model))
    started = time.time() - state["seconds"]
    with StopFlag() as stop, make_progress(console, progress and ctx.is_main and console.is_terminal) as bar:
        for epoch in range(state["epoch"], cfg.train.epochs):
            epoch_start = time.time()
            lr = lr_at(epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            skip = state["batch"] if epoch == state["epoch"] else 0
            sums = (state["sums"] if skip else None) or {"loss": 0.0, "correct": 0, "seen": 0, "batches": 0}
            sampler = EpochSampler(len(bundle.train), cfg.train.seed, epoch, ctx.rank, ctx.world_size,
                                   bundle.sample_weights, skip=skip * cfg.train.batch_size)
            loader = DataLoader(SeededDataset(bundle.train), batch_size=cfg.train.batch_size, sampler=sampler,
                                num_workers=cfg.data.num_workers, pin_memory=pin, drop_last=False,
                                generator=epoch_generator(cfg.train.seed, epoch))  # keeps the global RNG (MSG masks) untouched
            total = len(loader) + skip
            if cfg.train.limit_batches:
                total = min(total, cfg.train.limit_batches)
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=total, completed=skip, stats="")
            model.train()
            two.train()
            factors_used = two.factors.tolist()
            for step, (inputs, targets) in enumerate(loader, start=skip):
                if step >= total:
                    break
                inputs = inputs.to(ctx.device, non_blocking=pin)
                targets = targets.to(ctx.device, non_blocking=pin)
                with autocast(ctx.device, cfg.train.amp):
                    logits = model(inputs)
                loss = compute_loss(logits.float(), targets, two, cfg)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"the loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}; stopped, "
                        f"the last good checkpoint is {run.last} (try a lower lr or --amp none)"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    two.observe(logits.detach().float(), targets)
                    sums["loss"] += loss.item()
                    sums["correct"] += int((two(logits.detach().float()).argmax(-1) == targets).sum())
                    sums["seen"] += targets.numel()
                    sums["batches"] += 1
                bar.update(task, advance=1, stats=f"loss {sums['loss'] / sums['batches']:.4f} acc {100 * sums['correct'] / sums['seen']:.2f}%")
                if stop.agreed(ctx) and step + 1 < total:
                    state["seconds"] = time.time() - started
                    save_checkpoint(epoch, step + 1, sums, run.last)
                    raise Interrupted(f"interrupted at epoch {epoch + 1}, batch {step + 1}; checkpoint saved, continue with --resume")
            bar.remove_task(task)

            train_counts = torch.tensor([sums["loss"], sums["correct"], sums["seen"], sums["batches"]], dtype=torch.float64, device=ctx.device)
            distributed.all_reduce_sum(train_counts, ctx)
            distributed.all_reduce_sum(two.correct, ctx)
            distributed.all_reduce_sum(two.seen, ctx)
            result = evaluate(model, two, test_batches, cfg, ctx, limit=cfg.train.limit_batches)
            two.end_epoch(epoch)

            row = {
                "epoch": epoch + 1, "lr": lr,
                "train_loss": float(train_counts[0] / train_counts[3]),
                "train_acc": float(100 * train_counts[1] / train_counts[2]),
                "test_loss": result.loss, "test_acc": result.accuracy,
            }
            row.update({f"test_acc_t{t}": a for t, a in enumerate(result.timestep_accuracy)})
            row.update({f"two_t{t}": f for t, f in enumerate(factors_used)})
            row.update({f"fr/{name}": result.firing_rates.get(name, float("nan")) for name in layers})
            row["epoch_seconds"] = time.time() - epoch_start
            state["rows"].append(row)
            state["seconds"] = time.time() - started
            improved = result.accuracy > state["best"]
            state["best"] = max(state["best"], result.accuracy)
            save_checkpoint(epoch + 1, 0, None, run.last)
            if improved and ctx.is_main:
                checkpoint.save(checkpoint.load(run.last), run.best)
            if ctx.is_main:
                run.write_metrics(state["rows"])
            message = (f"epoch {epoch + 1}/{cfg.train.epochs}  lr {lr:.2e}  train loss {row['train_loss']:.4f} "
                       f"acc {row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  "
                       f"({row['epoch_seconds']:.1f}s)")
            log.info(message)
            if ctx.is_main and progress:  # one line an epoch in logs and pipes, however long
                console.print(message, soft_wrap=not console.is_terminal)
            if stop.agreed(ctx) and epoch + 1 < cfg.train.epochs:
                raise Interrupted(f"interrupted after epoch {epoch + 1}; checkpoint saved, continue with --resume")

    summary = {
        "status": "finished", "name": name, "preset": cfg.preset, "dataset": cfg.data.name, "model": cfg.model.name,
        "surrogate": cfg.model.neuron.surrogate, "mask_p": cfg.model.neuron.mask_p, "two": cfg.two.enabled,
        "seed": cfg.train.seed, "epochs": len(state["rows"]), "best_test_acc": state["best"],
        "final_test_acc": state["rows"][-1]["test_acc"] if state["rows"] else float("nan"),
        "seconds": round(state["seconds"], 2), "run_dir": str(run.path),
    }
    if ctx.is_main:
        run.write_summary(summary)
        append_row_locked(run.path.parent / "runs.csv", summary)
    log.info("finished: best %.2f%%, final %.2f%%", summary["best_test_acc"], summary["final_test_acc"])
    setup_logging(None)
    return TrainResult(summary, raw_model, two, run)
