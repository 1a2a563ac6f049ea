"""The training loop, top to bottom: setup, data, model, optimizer, then the epochs.

Each epoch: train (MSG in the spike backward, TWO counts observed per batch),
evaluate (accuracy overall and per timestep, firing rate per spiking layer),
update TWO once, then write the checkpoint and the metrics row. SIGINT, SIGTERM
and SIGUSR1 (SLURM's warning before a time limit) stop after the current batch
with a checkpoint that ``--resume`` continues exactly; ``train.checkpoint_minutes``
writes the same checkpoint between batches, so that a ``kill -9`` loses at most
that much; a NaN loss stops with the last good checkpoint untouched.

Under ``torchrun`` or ``srun`` every rank builds the same model from the seed, then trains
with random streams of its own (``seeding``); one small all-reduce per step, before
backward (:func:`agree`), is the step's one host synchronisation: all ranks learn whether
any was asked to stop, whether a checkpoint is due and whose loss is not finite, so that
they act together; the checkpoint holds what each rank needs to resume exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from collections.abc import Iterator
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
from msgcli.data import DataBundle, build_datasets, resolve_workers
from msgcli.data.registry import start_loading, worker_processes
from msgcli.engine import checkpoint, distributed, loggers
from msgcli.engine.build import (build_model_from_config, build_optimizer, build_two, compile_model, compute_loss, model_args,
                                 spiking_layers)
from msgcli.engine.evaluate import autocast, evaluate, test_loader
from msgcli.engine.results import RunDirectory, append_row_locked
from msgcli.engine.sampling import EpochSampler, SeededDataset, ignore_stop_signals
from msgcli.engine.seeding import deterministic_algorithms, seed_everything, seed_rank
from msgcli.engine.stops import OnStopSignals
from msgcli.errors import Interrupted, MsgsnnError, NonFiniteLoss, UserError, note_traceback_file
from msgcli.snn import TWO
from msgcli.snn.layers import sync_batchnorm

log = logging.getLogger("msgcli")

SUM_KEYS = ("loss", "correct", "seen", "batches")  # a rank's running sums over the batches of an epoch
NO_DETERMINISTIC_VERSION = "does not have a deterministic implementation"  # torch's error under train.deterministic


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

    def rank_state(self, device: torch.device) -> dict[str, Any]:
        """What this process alone holds: its random streams, partial sums and TWO counts."""
        return {"rng": checkpoint.rng_state(device), "sums": self.sums, "two_correct": self.two.correct.cpu(),
                "two_seen": self.two.seen.cpu()}

    def state_dict(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "two": self.two.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "batch": self.batch, "ranks": ranks,
                "rows": self.rows, "best": self.best, "seconds": self.seconds, "best_val": self.best_val,
                "test_at_best_val": self.test_at_best_val}

    def load_state_dict(self, state: dict[str, Any], rank: int, device: torch.device) -> None:
        mine = state["ranks"][rank]
        self.model.load_state_dict(state["model"])
        self.two.load_state_dict(state["two"])
        self.two.correct.copy_(mine["two_correct"])
        self.two.seen.copy_(mine["two_seen"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(mine["rng"], device)
        self.epoch, self.batch, self.rows = state["epoch"], state["batch"], state["rows"]
        self.best, self.seconds, self.sums = state["best"], state["seconds"], mine["sums"]
        self.best_val, self.test_at_best_val = state.get("best_val", -1.0), state.get("test_at_best_val", float("nan"))


@dataclass
class TrainResult:
    """A run's summary and trained modules; ``model`` and ``two`` are None when ``train.auto_resume`` found
    the run finished already and did nothing."""

    summary: dict[str, Any]
    model: nn.Module | None
    two: TWO | None
    run: RunDirectory


WARMUP_START = 1e-6  # the release's warmup_lr_init: the fraction of the lr at epoch 0 of a warm-up


def lr_at(epoch: int, cfg: RunConfig, world_size: int) -> float:
    """The release's schedule, per epoch: with ``warmup_epochs`` W > 0, a linear warm-up from
    ``WARMUP_START`` of the base lr at epoch 0 towards the base lr at epoch W; then cosine from
    the base lr to ``min_lr_ratio`` of it over the remaining epochs."""
    base, o, epochs = cfg.lr(world_size), cfg.optim, cfg.train.epochs
    if epoch < o.warmup_epochs:
        return base * (WARMUP_START + (1 - WARMUP_START) * epoch / o.warmup_epochs)
    progress = (epoch - o.warmup_epochs) / max(1, epochs - o.warmup_epochs)
    floor = base * o.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class StopSignals(OnStopSignals):
    """Notes a stop signal while training; the loop checks ``requested`` between batches and saves before it stops."""

    requested = False

    def on_stop(self, signum: int) -> None:
        self.requested = True


@dataclass
class Agreement:
    """What every rank learns from :func:`agree`, identically."""

    stop: bool  # some rank was asked to stop
    checkpoint: bool  # rank 0's train.checkpoint_minutes clock has run out
    nonfinite_ranks: list[int]  # ranks whose loss is NaN or infinite
    sums: list[float]  # SUM_KEYS over every rank's batches of the epoch so far (for the progress bar)


def agree(ctx: distributed.DistContext, *, stop: bool, checkpoint_due: bool = False, loss: torch.Tensor | None = None,
          sums: torch.Tensor | None = None) -> Agreement:
    """One small all-reduce and one host synchronisation: whether any rank was asked to stop, whether a
    checkpoint is due, which ranks' ``loss`` is not finite, and the epoch's running ``sums`` of all ranks.
    Called before backward, so no rank is left waiting in the gradient all-reduce for one that stops."""
    flags = torch.zeros(2 + ctx.world_size + len(SUM_KEYS), dtype=torch.float64, device=ctx.device)
    if stop:
        flags[0] = 1.0
    if checkpoint_due:
        flags[1] = 1.0
    if loss is not None:
        flags[2 + ctx.rank] = (~torch.isfinite(loss.detach())).double()
    if sums is not None:
        flags[2 + ctx.world_size:] = sums
    values = distributed.all_reduce_sum(flags, ctx).tolist()
    bad = [rank for rank, flag in enumerate(values[2: 2 + ctx.world_size]) if flag]
    return Agreement(values[0] > 0, values[1] > 0, bad, values[2 + ctx.world_size:])


def make_progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=True,
    )


@contextlib.contextmanager
def run_log(path: Path | None) -> Iterator[None]:
    """``train.log``: a handler of the run's own on the ``msgcli`` logger while the run lasts (rank 0 only).

    No other handler is touched. If the logger would drop INFO records (its level, or one inherited),
    it passes them for the run, and gets its own level back at the end.
    """
    if path is None:
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(level)


def keep_traceback(err: BaseException, run: RunDirectory, ctx: distributed.DistContext) -> None:
    """Append an unexpected error's full traceback to the run's ``train.log`` and say so on ``err``: hours
    into a run, a CUDA, NCCL or Triton error is worth more than its last line."""
    who = f" on rank {ctx.rank}" if ctx.enabled else ""
    text = "".join(traceback.format_exception(err))
    with open(run.log, "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR unexpected error{who}:\n{text}")
    note_traceback_file(err, run.log)


def train(
    cfg: RunConfig, out_dir: Path, *, resume: bool = False, overwrite: bool = False,
    progress: bool = True, console: Console | None = None,
) -> TrainResult:
    """Train ``cfg`` into ``out_dir/<cfg.name>``; returns the summary and the trained modules.

    ``resume`` continues the run's checkpoint, ``overwrite`` replaces the run; neither given,
    ``cfg.train.auto_resume`` chooses: resume a checkpoint, start when there is none, and return
    the saved summary, touching nothing, when the run has finished. Under ``torchrun`` or ``srun``
    this process joins the job's process group and leaves it when the run ends. An unexpected
    error's traceback goes to the run's ``train.log``.
    """
    cfg.name = cfg.name or cfg.preset or "run"
    run = RunDirectory(Path(out_dir) / cfg.name)
    ctx = distributed.setup(cfg.train.device, cfg.train.dist_timeout, resolve_workers(cfg.data.num_workers))
    claimed = False
    try:
        with contextlib.ExitStack() as held:
            start, finished = distributed.on_main(ctx, lambda: claim(run, cfg, resume, overwrite, held))
            if start == "finished":
                return TrainResult(finished, None, None, run)
            claimed = True
            held.enter_context(run_log(run.log if ctx.is_main else None))
            held.enter_context(deterministic_algorithms(cfg.train.deterministic))
            return _train(ctx, cfg, run, start == "resume", progress, console or Console(stderr=False))
    except Exception as err:
        if cfg.train.deterministic and NO_DETERMINISTIC_VERSION in str(err):
            raise distributed.error_for_rank(ctx, UserError(
                f"train.deterministic: {str(err).split(',')[0]} on {ctx.device.type}; set train.deterministic=false "
                "to train this network")) from None
        if claimed and not isinstance(err, MsgsnnError) and run.path.is_dir():
            keep_traceback(err, run, ctx)
        raise
    finally:
        distributed.teardown(ctx)


def claim(run: RunDirectory, cfg: RunConfig, resume: bool, overwrite: bool,
          held: contextlib.ExitStack) -> tuple[str, dict[str, Any] | None]:
    """Rank 0: decide how the run starts and hold its directory for the run's life (``held``).

    Returns ``("finished", summary)`` (auto-resume of a finished run: nothing is touched),
    ``("resume", None)`` or ``("start", None)``; raises :class:`RunInUse` at once when another
    process holds the directory, before anything in it changes.
    """
    auto = cfg.train.auto_resume and not (resume or overwrite)
    if auto and run.status() == "finished":
        return "finished", run.read_summary()
    held.enter_context(run.hold())
    if auto:
        if run.status() == "finished":  # it finished while this process waited for the lock
            return "finished", run.read_summary()
        resume = run.last.exists()
    run.prepare(resume=resume, overwrite=overwrite)
    config_io.save(cfg, run.config)
    return ("resume" if resume else "start"), None


@dataclass
class Trainer:
    """What the epochs of one process share: the config, where it writes, its loader and the modules."""

    cfg: RunConfig
    ctx: distributed.DistContext
    run: RunDirectory
    loader: DataLoader  # this rank's training batches; its sampler picks the epoch
    model: nn.Module  # DDP-wrapped under torchrun or srun
    state: TrainState
    model_args: dict[str, Any]
    last_saved: float = field(default_factory=time.monotonic)

    @property
    def pin(self) -> bool:
        return self.ctx.device.type == "cuda"

    def save_checkpoint(self, path: Path) -> None:
        """Every rank calls it; rank 0 writes the shared state and what each rank needs back."""
        ranks = distributed.gather_to_main(self.state.rank_state(self.ctx.device), self.ctx)
        if self.ctx.is_main:
            checkpoint.save(self.state.state_dict(ranks) | {"config": config_io.to_dict(self.cfg),
                                                            "model_args": self.model_args}, path)
        self.last_saved = time.monotonic()

    def checkpoint_due(self) -> bool:
        """Rank 0's clock: ``train.checkpoint_minutes`` since the last checkpoint (the others follow it in :func:`agree`)."""
        minutes = self.cfg.train.checkpoint_minutes
        return self.ctx.is_main and minutes > 0 and time.monotonic() - self.last_saved >= 60 * minutes


def train_loader(bundle: DataBundle, cfg: RunConfig, ctx: distributed.DistContext, pin: bool) -> DataLoader:
    """This rank's training batches for the whole run: one loader whose workers persist across epochs, its
    :class:`EpochSampler` set to each epoch (and to the batches a mid-epoch resume skips) before it runs."""
    workers = resolve_workers(cfg.data.num_workers)
    sampler = EpochSampler(len(bundle.train), cfg.train.seed, 0, ctx.rank, ctx.world_size, bundle.sample_weights)
    return DataLoader(SeededDataset(bundle.train), batch_size=cfg.train.batch_size, sampler=sampler,
                      **worker_processes(workers), persistent_workers=workers > 0, pin_memory=pin,
                      drop_last=True,  # as the release
                      worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(cfg.train.seed))  # keeps the global RNG (MSG masks) untouched


def _train(
    ctx: distributed.DistContext, cfg: RunConfig, run: RunDirectory, resume: bool, progress: bool, console: Console,
) -> TrainResult:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    # ---- data: rank 0 builds (and caches) first while the others wait outside any collective; then they read it
    bundle = distributed.main_first(ctx, lambda: build_datasets(cfg, progress=progress and ctx.is_main))
    info = bundle.info
    log.info("data %s: %d train / %d val / %d test samples, input %s, %d classes", info.name, info.n_train, info.n_val,
             info.n_test, info.input_shape, info.num_classes)
    pin = ctx.device.type == "cuda"
    test_batches = test_loader(bundle.test, cfg, ctx, pin)
    val_batches = test_loader(bundle.val, cfg, ctx, pin) if bundle.val is not None else None

    # ---- model, decoder, optimizer: the same on every rank; then each rank's own random streams
    seed_everything(cfg.train.seed)
    model = build_model_from_config(cfg, info.in_channels, info.num_classes).to(ctx.device)
    if cfg.train.sync_bn:
        sync_batchnorm(model)
    two = build_two(cfg).to(ctx.device)
    if ctx.enabled:
        seed_rank(cfg.train.seed, ctx.rank)
    raw_model = model
    if ctx.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if pin else None)
    optimizer = build_optimizer(cfg, model.parameters(), ctx.world_size)
    if cfg.train.compile:
        model = compile_model(model, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=cfg.train.amp == "fp16")
    state = TrainState(raw_model, two, optimizer, scaler)

    # ---- resume: shared state from rank 0, and each rank's own RNG streams, partial sums and TWO counts
    if resume and run.last.exists():
        state.load_state_dict(resumable(checkpoint.load(run.last), run.last, ctx.world_size), ctx.rank, ctx.device)
        if ctx.is_main:
            console.print(f"resuming {run.path} at epoch {state.epoch + 1}, batch {state.batch}", soft_wrap=True)
    trainer = Trainer(cfg, ctx, run, train_loader(bundle, cfg, ctx, pin), model, state,
                      model_args(cfg, info.in_channels, info.num_classes))

    # ---- the epochs: train, then evaluate, update TWO, write the checkpoint and the metrics row
    layers = list(spiking_layers(raw_model))
    started = time.time() - state.seconds
    with (StopSignals() as stop, make_progress(console, progress and ctx.is_main and console.is_terminal) as bar,
          loggers.MetricLoggers(cfg.train.loggers if ctx.is_main else [], run.path, state.rows) as extra):
        for epoch in range(state.epoch, cfg.train.epochs):
            epoch_start = time.time()
            lr = lr_at(epoch, cfg, ctx.world_size)
            for group in optimizer.param_groups:
                group["lr"] = lr
            factors_used = two.factors.tolist()
            counts = train_epoch(trainer, epoch, stop, bar, started)
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
            end_epoch(trainer, row, started)
            if ctx.is_main:
                extra.log(row)
            message = (f"epoch {epoch + 1}/{cfg.train.epochs}  lr {lr:.2e}  train loss {row['train_loss']:.4f} "
                       f"acc {row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  "
                       f"({row['epoch_seconds']:.1f}s)")
            log.info(message)
            if ctx.is_main and progress:  # one line an epoch in logs and pipes, however long
                console.print(message, soft_wrap=not console.is_terminal)
            if agree(ctx, stop=stop.requested).stop and epoch + 1 < cfg.train.epochs:
                raise distributed.error_for_rank(ctx, Interrupted(
                    f"interrupted after epoch {epoch + 1}; checkpoint saved, continue with --resume"))

    summary = {
        "status": "finished", "name": cfg.name, "preset": cfg.preset, "dataset": cfg.data.name, "model": cfg.model.name,
        "surrogate": cfg.model.neuron.surrogate, "mask_p": cfg.model.neuron.mask_p, "two": cfg.two.enabled,
        "seed": cfg.train.seed, "epochs": len(state.rows), "best_test_acc": state.best,
        "final_test_acc": state.rows[-1]["test_acc"] if state.rows else float("nan"),
        "best_val_acc": state.best_val if bundle.val is not None else None,
        "test_acc_at_best_val": state.test_at_best_val if bundle.val is not None else None,
        "seconds": round(state.seconds, 2), "world_size": ctx.world_size, "run_dir": str(run.path),
    }
    if ctx.is_main:
        run.write_summary(summary)
        append_row_locked(run.path.parent / "runs.csv", summary)
    log.info("finished: best %.2f%%, final %.2f%%", summary["best_test_acc"], summary["final_test_acc"])
    return TrainResult(summary, raw_model, two, run)


def resumable(saved: dict[str, Any], path: Path, world_size: int) -> dict[str, Any]:
    """``saved`` if this job can continue it exactly, else a UserError saying why not."""
    if "ranks" not in saved:
        raise UserError(f"{path} was written by an older msgsnn that did not save each rank's state; "
                        f"it cannot be resumed exactly, start the run again with --overwrite")
    saved_world = len(saved["ranks"])
    if saved_world != world_size:
        raise UserError(f"{path} was written by {saved_world} process(es) and this run has {world_size}; "
                        f"resume with as many (torchrun --nproc_per_node {saved_world}, or srun -n {saved_world}): "
                        "the shards, the lr and the random streams depend on it")
    return saved


def train_epoch(trainer: Trainer, epoch: int, stop: StopSignals, bar: Progress, started: float) -> torch.Tensor:
    """This rank's batches of ``epoch`` (after those a resumed run already did); returns ``[loss sum, correct,
    seen, batches]`` over every rank. A stop request saves a checkpoint and raises Interrupted, a due
    checkpoint (``train.checkpoint_minutes``) is the same checkpoint without the stop; a NaN loss raises
    NonFiniteLoss and leaves the last checkpoint as it is."""
    cfg, ctx, state, two, loader = trainer.cfg, trainer.ctx, trainer.state, trainer.state.two, trainer.loader
    skip = state.batch if epoch == state.epoch else 0
    saved = state.sums if skip else None
    sums = torch.tensor([saved[k] for k in SUM_KEYS] if saved else [0.0] * len(SUM_KEYS), dtype=torch.float64,
                        device=ctx.device)
    loader.sampler.set_epoch(epoch, skip=skip * cfg.train.batch_size)
    total = len(loader) + skip
    if total == 0:
        raise UserError(f"train.batch_size: {cfg.train.batch_size} is more than the {loader.sampler.per_rank} training "
                        "samples of each process; the last partial batch is dropped, so no batch would remain")
    if cfg.train.limit_batches:
        total = min(total, cfg.train.limit_batches)
    task = bar.add_task(f"epoch {epoch + 1}/{cfg.train.epochs}", total=total, completed=skip, stats="")
    trainer.model.train()
    two.train()
    for step, (inputs, targets) in enumerate(start_loading(loader), start=skip):
        if step >= total:
            break
        inputs = inputs.to(ctx.device, non_blocking=trainer.pin)
        targets = targets.to(ctx.device, non_blocking=trainer.pin)
        if cfg.train.compile:
            torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA graphs may reuse the last one's outputs
        with autocast(ctx.device, cfg.train.amp):
            logits = trainer.model(inputs)
        loss = compute_loss(logits.float(), targets, two, cfg)
        with torch.no_grad():  # on the device: the step's one host synchronisation is agree()'s
            sums[0] += loss.detach().double()
            sums[1] += (two(logits.detach().float()).argmax(-1) == targets).sum()
            sums[2] += targets.numel()
            sums[3] += 1
        agreed = agree(ctx, stop=stop.requested, checkpoint_due=trainer.checkpoint_due(), loss=loss, sums=sums)
        if agreed.nonfinite_ranks:
            where = f" on rank {', '.join(map(str, agreed.nonfinite_ranks))}" if ctx.enabled else ""
            raise distributed.error_for_rank(ctx, NonFiniteLoss(
                f"the loss became NaN or infinite{where} at epoch {epoch + 1}, batch {step + 1}; stopped, "
                f"the last good checkpoint is {trainer.run.last} (try a lower lr or --amp none)"
            ))
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        two.observe(logits.detach().float(), targets)
        everyone = dict(zip(SUM_KEYS, agreed.sums))
        bar.update(task, advance=1, stats=f"loss {everyone['loss'] / everyone['batches']:.4f} "
                                          f"acc {100 * everyone['correct'] / everyone['seen']:.2f}%")
        if (agreed.stop or agreed.checkpoint) and step + 1 < total:
            state.epoch, state.batch, state.seconds = epoch, step + 1, time.time() - started
            state.sums = dict(zip(SUM_KEYS, sums.tolist()))
            trainer.save_checkpoint(trainer.run.last)
            if agreed.stop:
                raise distributed.error_for_rank(ctx, Interrupted(
                    f"interrupted at epoch {epoch + 1}, batch {step + 1}; checkpoint saved, continue with --resume"))
    bar.remove_task(task)

    distributed.all_reduce_sum(sums, ctx)
    distributed.all_reduce_sum(two.correct, ctx)
    distributed.all_reduce_sum(two.seen, ctx)
    return sums


def end_epoch(trainer: Trainer, row: dict[str, Any], started: float) -> None:
    """Record a finished epoch: its metrics row, the checkpoints (``best.pt`` a copy of ``last.pt`` when the
    validation accuracy improved, or without a validation split the test accuracy, as the release) and metrics.csv."""
    state = trainer.state
    state.rows.append(row)
    state.epoch, state.batch, state.sums, state.seconds = row["epoch"], 0, None, time.time() - started
    improved = row["test_acc"] > state.best
    if "val_acc" in row:
        improved = row["val_acc"] > state.best_val
        if improved:
            state.best_val, state.test_at_best_val = row["val_acc"], row["test_acc"]
    state.best = max(state.best, row["test_acc"])
    trainer.save_checkpoint(trainer.run.last)
    if trainer.ctx.is_main:
        if improved:
            checkpoint.copy(trainer.run.last, trainer.run.best)
        trainer.run.write_metrics(state.rows)
