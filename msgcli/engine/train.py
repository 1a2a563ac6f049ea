"""The training loop, top to bottom: setup, data, model, optimizer, then the epochs.

Each epoch: train (MSG in the spike backward, TWO counts observed per batch),
evaluate (accuracy overall and per timestep, firing rate per spiking layer),
update TWO once, then write the checkpoint and the metrics row. SIGINT/SIGTERM
stop after the current batch with a checkpoint that ``--resume`` continues
exactly; a NaN loss stops with the last good checkpoint untouched.

Under ``torchrun`` every rank builds the same model from the seed, then trains with
random streams of its own (``seeding``); one small all-reduce per step, before
backward, makes all ranks agree on a stop request and on a non-finite loss, so that
they stop together; the checkpoint holds what each rank needs to resume exactly.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from msgcli import config as config_io
from msgcli.config import RunConfig
from msgcli.data import DataBundle, build_datasets
from msgcli.engine import checkpoint, distributed, loggers
from msgcli.engine.build import build_model_from_config, build_optimizer, build_two, compute_loss, model_args, spiking_layers
from msgcli.engine.evaluate import autocast, evaluate, test_loader
from msgcli.engine.results import RunDirectory, append_row_locked
from msgcli.engine.sampling import EpochSampler, SeededDataset, epoch_generator, ignore_stop_signals
from msgcli.engine.seeding import seed_everything, seed_rank
from msgcli.errors import Interrupted, NonFiniteLoss, UserError
from msgcli.snn import TWO
from msgcli.snn.layers import sync_batchnorm

log = logging.getLogger("msgcli")


@dataclass
class TrainState:
    """Everything a checkpoint restores: the modules, and where the run stands.

    ``epoch`` epochs are finished, and ``batch`` batches of the next one (an interrupted epoch,
    whose partial ``sums`` this rank holds). :meth:`state_dict` is the checkpoint, with what each
    rank holds alone (random streams, sums, TWO counts) gathered under ``ranks``.
    """

    model: nn.Module  # unwrapped (not the DDP module)
    two: TWO
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    epoch: int = 0
    batch: int = 0
    sums: dict[str, float] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv, one row per finished epoch
    best: float = -1.0  # best test accuracy
    seconds: float = 0.0
    best_val: float = -1.0  # with a validation split: its best accuracy, which chooses best.pt
    test_at_best_val: float = float("nan")  # the test accuracy of that epoch

    def rank_state(self) -> dict[str, Any]:
        """What this process alone holds: its random streams, partial sums and TWO counts."""
        return {"rng": checkpoint.rng_state(), "sums": self.sums, "two_correct": self.two.correct.cpu(),
                "two_seen": self.two.seen.cpu()}

    def state_dict(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "two": self.two.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "batch": self.batch, "ranks": ranks,
                "rows": self.rows, "best": self.best, "seconds": self.seconds, "best_val": self.best_val,
                "test_at_best_val": self.test_at_best_val}

    def load_state_dict(self, state: dict[str, Any], rank: int) -> None:
        mine = state["ranks"][rank]
        self.model.load_state_dict(state["model"])
        self.two.load_state_dict(state["two"])
        self.two.correct.copy_(mine["two_correct"])
        self.two.seen.copy_(mine["two_seen"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(mine["rng"])
        self.epoch, self.batch, self.rows = state["epoch"], state["batch"], state["rows"]
        self.best, self.seconds, self.sums = state["best"], state["seconds"], mine["sums"]
        self.best_val, self.test_at_best_val = state.get("best_val", -1.0), state.get("test_at_best_val", float("nan"))


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: nn.Module
    two: TWO
    run: RunDirectory


WARMUP_START = 1e-6  # the release's warmup_lr_init: the fraction of the lr at epoch 0 of a warm-up


def lr_at(epoch: int, cfg: RunConfig) -> float:
    """The release's schedule, per epoch: with ``warmup_epochs`` W > 0, a linear warm-up from
    ``WARMUP_START`` of the base lr at epoch 0 towards the base lr at epoch W; then cosine from
    the base lr to ``min_lr_ratio`` of it over the remaining epochs."""
    base, o, epochs = cfg.lr, cfg.optim, cfg.train.epochs
    if epoch < o.warmup_epochs:
        return base * (WARMUP_START + (1 - WARMUP_START) * epoch / o.warmup_epochs)
    progress = (epoch - o.warmup_epochs) / max(1, epochs - o.warmup_epochs)
    floor = base * o.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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

    def agreed(self, ctx: distributed.DistContext, loss: torch.Tensor | None = None) -> tuple[bool, list[int]]:
        """One small all-reduce: whether any rank was asked to stop, and the ranks whose ``loss`` is
        NaN or infinite; every rank gets the same answer, so all stop at the same step."""
        flags = torch.zeros(1 + ctx.world_size, device=ctx.device)
        flags[0] = float(self.requested)
        if loss is not None:
            flags[1 + ctx.rank] = (~torch.isfinite(loss.detach())).float()
        flags = distributed.all_reduce_sum(flags, ctx).tolist()
        return flags[0] > 0, [rank for rank, bad in enumerate(flags[1:]) if bad]


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
    """Train ``cfg`` into ``out_dir/<cfg.name>``; returns the summary and the trained modules.

    Under ``torchrun`` this process joins the job's process group and leaves it when the run ends.
    """
    ctx = distributed.setup(cfg.train.device)
    try:
        return _train(ctx, cfg, out_dir, resume, overwrite, progress, console or Console(stderr=False))
    finally:
        distributed.teardown(ctx)


@dataclass
class Job:
    """What the epochs of one process share: the config, where it writes, the data and the modules."""

    cfg: RunConfig
    ctx: distributed.DistContext
    run: RunDirectory
    bundle: DataBundle
    model: nn.Module  # DDP-wrapped under torchrun
    state: TrainState
    model_args: dict[str, Any]

    @property
    def pin(self) -> bool:
        return self.ctx.device.type == "cuda"

    def save_checkpoint(self, path: Path) -> None:
        """Every rank calls it; rank 0 writes the shared state and what each rank needs back."""
        ranks = distributed.gather_to_main(self.state.rank_state(), self.ctx)
        if self.ctx.is_main:
            checkpoint.save(self.state.state_dict(ranks) | {"config": config_io.to_dict(self.cfg),
                                                            "model_args": self.model_args}, path)

    def stop(self, error: Exception) -> Exception:
        return distributed.stop_everywhere(self.ctx, error)


def _train(
    ctx: distributed.DistContext, cfg: RunConfig, out_dir: Path, resume: bool, overwrite: bool, progress: bool,
    console: Console,
) -> TrainResult:
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

    # ---- data (rank 0 builds the cache first; if it cannot, every rank stops)
    bundle = distributed.main_first(ctx, lambda: build_datasets(cfg, progress=progress and ctx.is_main))
    info = bundle.info
    log.info("data %s: %d train / %d val / %d test samples, input %s, %d classes", info.name, info.n_train, info.n_val,
             info.n_test, info.input_shape, info.num_classes)
    pin = ctx.device.type == "cuda"
    test_batches = test_loader(bundle.test, cfg, ctx, pin)
    val_batches = test_loader(bundle.val, cfg, ctx, pin) if bundle.val is not None else None

    # ---- model, decoder, optimizer: the same on every rank; then each rank's own random streams
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model_from_config(cfg, info.in_channels, info.num_classes).to(ctx.device)
    if cfg.train.sync_bn:
        sync_batchnorm(model)
    two = build_two(cfg).to(ctx.device)
    if ctx.enabled:
        seed_rank(cfg.train.seed, ctx.rank)
    raw_model = model
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if pin else None)
    optimizer = build_optimizer(cfg, model.parameters())
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.amp == "fp16")
    state = TrainState(raw_model, two, optimizer, scaler)

    # ---- resume: shared state from rank 0, and each rank's own RNG streams, partial sums and TWO counts
    if resume and run.last.exists():
        state.load_state_dict(resumable(checkpoint.load(run.last), run.last, ctx.world_size), ctx.rank)
        if ctx.is_main:
            console.print(f"resuming {run.path} at epoch {state.epoch + 1}, batch {state.batch}")
    job = Job(cfg, ctx, run, bundle, model, state, model_args(cfg, info.in_channels, info.num_classes))

    # ---- the epochs: train, then evaluate, update TWO, write the checkpoint and the metrics row
    layers = list(spiking_layers(raw_model))
    started = time.time() - state.seconds
    with (StopFlag() as stop, make_progress(console, progress and ctx.is_main and console.is_terminal) as bar,
          loggers.MetricLoggers(cfg.train.loggers if ctx.is_main else [], run.path, state.rows) as extra):
        for epoch in range(state.epoch, cfg.train.epochs):
            epoch_start = time.time()
            lr = lr_at(epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            factors_used = two.factors.tolist()
            counts = train_epoch(job, epoch, stop, bar, started)
            result = evaluate(model, two, test_batches, cfg, ctx, limit=cfg.train.limit_batches)
            val = evaluate(model, two, val_batches, cfg, ctx, limit=cfg.train.limit_batches) if val_batches else None
            two.end_epoch(epoch)
            row = {
                "epoch": epoch + 1, "lr": lr,
                "train_loss": float(counts[0] / counts[3]), "train_acc": float(100 * counts[1] / counts[2]),
                "test_loss": result.loss, "test_acc": result.accuracy,
                **({"val_loss": val.loss, "val_acc": val.accuracy} if val else {}),
            }
            row.update({f"test_acc_t{t}": a for t, a in enumerate(result.timestep_accuracy)})
            row.update({f"two_t{t}": f for t, f in enumerate(factors_used)})
            row.update({f"fr/{name}": result.firing_rates.get(name, float("nan")) for name in layers})
            row["epoch_seconds"] = time.time() - epoch_start
            end_epoch(job, row, started)
            if ctx.is_main:
                extra.log(row)
            message = (f"epoch {epoch + 1}/{cfg.train.epochs}  lr {lr:.2e}  train loss {row['train_loss']:.4f} "
                       f"acc {row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  "
                       f"({row['epoch_seconds']:.1f}s)")
            log.info(message)
            if ctx.is_main and progress:  # one line an epoch in logs and pipes, however long
                console.print(message, soft_wrap=not console.is_terminal)
            if stop.agreed(ctx)[0] and epoch + 1 < cfg.train.epochs:
                raise job.stop(Interrupted(f"interrupted after epoch {epoch + 1}; checkpoint saved, continue with --resume"))

    summary = {
        "status": "finished", "name": name, "preset": cfg.preset, "dataset": cfg.data.name, "model": cfg.model.name,
        "surrogate": cfg.model.neuron.surrogate, "mask_p": cfg.model.neuron.mask_p, "two": cfg.two.enabled,
        "seed": cfg.train.seed, "epochs": len(state.rows), "best_test_acc": state.best,
        "final_test_acc": state.rows[-1]["test_acc"] if state.rows else float("nan"),
        "best_val_acc": state.best_val if bundle.val is not None else None,
        "test_acc_at_best_val": state.test_at_best_val if bundle.val is not None else None,
        "seconds": round(state.seconds, 2), "run_dir": str(run.path),
    }
    if ctx.is_main:
        run.write_summary(summary)
        append_row_locked(run.path.parent / "runs.csv", summary)
    log.info("finished: best %.2f%%, final %.2f%%", summary["best_test_acc"], summary["final_test_acc"])
    setup_logging(None)
    return TrainResult(summary, raw_model, two, run)


def resumable(saved: dict[str, Any], path: Path, world_size: int) -> dict[str, Any]:
    """``saved`` if this job can continue it exactly, else a UserError saying why not."""
    if "ranks" not in saved:
        raise UserError(f"{path} was written by an older msgsnn that did not save each rank's state; "
                        f"it cannot be resumed exactly, start the run again with --overwrite")
    saved_world = len(saved["ranks"])
    if saved_world != world_size:
        raise UserError(f"{path} was written by {saved_world} process(es) and this run has {world_size}; "
                        f"resume with as many (torchrun --nproc_per_node {saved_world}): the shards, the lr and "
                        f"the random streams depend on it")
    return saved


def train_epoch(job: Job, epoch: int, stop: StopFlag, bar: Progress, started: float) -> torch.Tensor:
    """This rank's batches of ``epoch`` (after those a resumed run already did); returns ``[loss sum, correct,
    seen, batches]`` over every rank. A stop request saves a checkpoint and raises Interrupted; a NaN loss
    raises NonFiniteLoss and leaves the last checkpoint as it is."""
    cfg, ctx, state, two = job.cfg, job.ctx, job.state, job.state.two
    skip = state.batch if epoch == state.epoch else 0
    sums = (state.sums if skip else None) or {"loss": 0.0, "correct": 0, "seen": 0, "batches": 0}
    sampler = EpochSampler(len(job.bundle.train), cfg.train.seed, epoch, ctx.rank, ctx.world_size,
                           job.bundle.sample_weights, skip=skip * cfg.train.batch_size)
    loader = DataLoader(SeededDataset(job.bundle.train), batch_size=cfg.train.batch_size, sampler=sampler,
                        num_workers=cfg.data.num_workers, pin_memory=job.pin, drop_last=True,  # as the release
                        worker_init_fn=ignore_stop_signals,
                        generator=epoch_generator(cfg.train.seed, epoch))  # keeps the global RNG (MSG masks) untouched
    total = len(loader) + skip
    if total == 0:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is more than the {sampler.per_rank} training "
                        "samples of each process; the last partial batch is dropped, so no batch would remain")
    if cfg.train.limit_batches:
        total = min(total, cfg.train.limit_batches)
    task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=total, completed=skip, stats="")
    job.model.train()
    two.train()
    for step, (inputs, targets) in enumerate(loader, start=skip):
        if step >= total:
            break
        inputs = inputs.to(ctx.device, non_blocking=job.pin)
        targets = targets.to(ctx.device, non_blocking=job.pin)
        with autocast(ctx.device, cfg.train.amp):
            logits = job.model(inputs)
        loss = compute_loss(logits.float(), targets, two, cfg)
        stop_requested, bad_ranks = stop.agreed(ctx, loss)  # before backward: no rank is left waiting there
        if bad_ranks:
            where = f" on rank {', '.join(map(str, bad_ranks))}" if ctx.enabled else ""
            raise job.stop(NonFiniteLoss(
                f"the loss became NaN or infinite{where} at epoch {epoch + 1}, batch {step + 1}; stopped, "
                f"the last good checkpoint is {job.run.last} (try a lower lr or --amp none)"
            ))
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        with torch.no_grad():
            two.observe(logits.detach().float(), targets)
            sums["loss"] += loss.item()
            sums["correct"] += int((two(logits.detach().float()).argmax(-1) == targets).sum())
            sums["seen"] += targets.numel()
            sums["batches"] += 1
        bar.update(task, advance=1, stats=f"loss {sums['loss'] / sums['batches']:.4f} acc {100 * sums['correct'] / sums['seen']:.2f}%")
        if stop_requested and step + 1 < total:
            state.epoch, state.batch, state.sums, state.seconds = epoch, step + 1, sums, time.time() - started
            job.save_checkpoint(job.run.last)
            raise job.stop(Interrupted(
                f"interrupted at epoch {epoch + 1}, batch {step + 1}; checkpoint saved, continue with --resume"))
    bar.remove_task(task)

    counts = torch.tensor([sums["loss"], sums["correct"], sums["seen"], sums["batches"]], dtype=torch.float64, device=ctx.device)
    distributed.all_reduce_sum(counts, ctx)
    distributed.all_reduce_sum(two.correct, ctx)
    distributed.all_reduce_sum(two.seen, ctx)
    return counts


def end_epoch(job: Job, row: dict[str, Any], started: float) -> None:
    """Record a finished epoch: its metrics row, the checkpoints (``best.pt`` a copy of ``last.pt`` when the
    validation accuracy improved, or without a validation split the test accuracy, as the release) and metrics.csv."""
    state = job.state
    state.rows.append(row)
    state.epoch, state.batch, state.sums, state.seconds = row["epoch"], 0, None, time.time() - started
    improved = row["test_acc"] > state.best
    if "val_acc" in row:
        improved = row["val_acc"] > state.best_val
        if improved:
            state.best_val, state.test_at_best_val = row["val_acc"], row["test_acc"]
    state.best = max(state.best, row["test_acc"])
    job.save_checkpoint(job.run.last)
    if job.ctx.is_main:
        if improved:
            checkpoint.copy(job.run.last, job.run.best)
        job.run.write_metrics(state.rows)
