"""Sweeps: a grid of ordinary train runs under ``<out>/sweeps/<sweep-name>/<run-name>/``.

Planning resolves and validates every point's config before anything runs.
Each point is its own ``python -m msgcli train`` process: locally N at a time
(one GPU each when several are visible), or as Ray tasks on a cluster. A crash
in one point is a ``failed`` row, never a dead sweep. Rerunning the same sweep
skips finished points and resumes interrupted ones. Only the coordinating
process writes ``sweep.csv``, whole and atomically after every point, and a
lock keeps a second coordinator out of the same sweep directory. A stop signal
to the coordinator (Ctrl-C, SIGTERM, SLURM's SIGUSR1) reaches every running
local point, which saves and stops; the coordinator then writes ``sweep.csv``
and exits 130, and the same command resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import math
import os
import queue
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from msgcli import config as config_io
from msgcli.config import ConfigError, RunConfig
from msgcli.errors import Interrupted, UserError
from msgcli.engine.launch import LAUNCH_VARIABLES
from msgcli.engine.stops import OnStopSignals
from msgcli.engine.results import RunDirectory, csv_text, write_atomic

DEFAULT_STEP = 0.1
SWEEP_CSV = "sweep.csv"
BASE_CONFIG = "base-config.yaml"
RESULT_COLUMNS = ("best_test_acc", "final_test_acc", "epochs", "seconds")
# Keys that say where or how a run executes, not what it computes.
PLACEMENT_KEYS = ("data.root", "data.cache_dir", "data.num_workers", "train.device", "train.threads", "train.loggers",
                  "train.dist_timeout", "train.auto_resume", "train.checkpoint_minutes")
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def parse_values(key: str, text: str) -> list[Any]:
    """``start:stop[:step]`` (numbers, stop included, step 0.1 by default) or ``v1,v2,...``.

    List entries stay strings; the config schema types and checks them.
    """
    if ":" in text:
        try:
            numbers = [float(part) for part in text.split(":")]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3):
            raise ConfigError(f"{key}: {text!r} is not a range start:stop[:step] of numbers")
        start, stop, step = (*numbers, DEFAULT_STEP)[:3]
        if step <= 0 or stop < start:
            raise ConfigError(f"{key}: range {text!r} needs start <= stop and a positive step")
        count = math.floor(round((stop - start) / step, 9))
        return [round(start + i * step, 10) for i in range(count + 1)]
    values = [value.strip() for value in text.split(",")]
    if not all(values):
        raise ConfigError(f"{key}: empty value in {text!r}")
    return list(dict.fromkeys(values))


def config_value(cfg: RunConfig, key: str) -> Any:
    return functools.reduce(getattr, key.split("."), cfg)


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """Every dotted key of the schema with its value."""
    return {key: config_value(cfg, key) for key in config_io.all_keys()}


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Point:
    name: str
    values: dict[str, Any]  # swept key -> value as the config typed it, train.seed last
    config: RunConfig


@dataclass
class Sweep:
    name: str
    directory: Path
    base: RunConfig
    points: list[Point]


def plan_sweep(base: RunConfig, axes: dict[str, list[Any]], seeds: int, out: Path, name: str | None = None) -> Sweep:
    """Every combination of ``axes`` values times ``seeds`` seeds (base seed, +1, ...), validated.

    Run names join the swept keys' last parts and values (``mask_p=0.3_two=false_seed=42``;
    a switch ``x.enabled`` is named ``x``);
    the default sweep name is the preset and those parts (``digits-dvs-mask_p``).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {seeds}")
    if "train.seed" in axes and seeds > 1:
        raise ConfigError("train.seed: sweep it with --grid or with --seeds, not both")
    grid = dict(axes)
    grid.setdefault("train.seed", [base.train.seed + i for i in range(seeds)])
    leaves = [key.split(".")[-2] if key.endswith(".enabled") else key.rsplit(".", 1)[-1] for key in grid]
    labels = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(grid, leaves)]
    points: dict[str, Point] = {}
    for combo in itertools.product(*grid.values()):
        cfg = config_io.apply_overrides(base, dict(zip(grid, combo)))
        values = {key: config_value(cfg, key) for key in grid}
        cfg.name = "_".join(f"{label}={format_value(v)}" for label, v in zip(labels, values.values()))
        points.setdefault(cfg.name, Point(cfg.name, values, cfg))
    name = name or "-".join([base.preset or "run", *(labels[:-1] or ["seeds"])])
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"--name: {name!r} is not a folder name")
    return Sweep(name, Path(out).resolve() / name, base, list(points.values()))


def setting_keys() -> list[str]:
    """The keys that change what a run computes: not where it runs (PLACEMENT_KEYS), not the paper's numbers it quotes."""
    return [key for key in config_io.all_keys() if key not in PLACEMENT_KEYS and not key.startswith("paper.")]


def check_same_config(point: Point, run_dir: Path) -> None:
    """Refuse to skip or resume a run that was made with another config than the one planned now."""
    saved, planned = flat_config(RunDirectory(run_dir).read_config()), flat_config(point.config)
    changed = [f"{k}: {saved[k]!r} -> {planned[k]!r}" for k in setting_keys() if saved[k] != planned[k]]
    if changed:
        raise UserError(f"{run_dir} was trained with another config ({'; '.join(changed)}); "
                        "pass --overwrite to redo its runs, or write them elsewhere (--name or --out)")


@dataclass
class Outcome:
    status: str  # finished, failed or interrupted
    summary: dict | None
    error: str = ""


def point_environment(env: dict[str, str]) -> dict[str, str]:
    """This process's environment plus ``env``, without what would make the point a rank of this process's
    job: a sweep inside an ``srun`` task or a SLURM job of several tasks runs each point as a job of its own."""
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}, **env}


def run_point(command: list[str], run_dir: str, log_path: str, env: dict[str, str]) -> Outcome:
    """Run one point's train process to its end; its output goes to ``log_path``. Runs locally or in a Ray task."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=point_environment(env))
        RUNNING.add(process)
        try:
            code = process.wait()
        finally:
            RUNNING.discard(process)
    summary = RunDirectory(run_dir).read_summary()
    if code == 0 and summary and summary.get("status") == "finished":
        return Outcome("finished", summary)
    lines = [line.strip() for line in Path(log_path).read_text().splitlines() if line.strip()]
    status = "interrupted" if code == Interrupted.exit_code else "failed"
    return Outcome(status, summary, lines[-1] if lines else f"exit code {code}")


RUNNING: set[subprocess.Popen] = set()  # this process's running points, to pass stop signals on to


class ForwardedStops(OnStopSignals):
    """While the coordinator waits, a stop signal goes on to every running point (each saves a checkpoint and
    exits 130); the first also raises :class:`Interrupted` here, so that the coordinator waits for them, writes
    ``sweep.csv`` and stops with one line."""

    stopped = False

    def on_stop(self, signum: int) -> None:
        for process in list(RUNNING):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
        if not self.stopped:
            self.stopped = True
            raise Interrupted(f"{signal.Signals(signum).name}: the running points saved their checkpoints; "
                              "the same command resumes them")


@dataclass
class PointProcess:
    """How one point runs: its ``python -m msgcli train`` command, run directory, log and environment."""

    point: Point
    command: list[str]
    run_dir: str
    log: str
    env: dict[str, str]


def visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(processes: list[PointProcess], workers: int) -> Iterator[tuple[PointProcess, Outcome]]:
    """``workers`` processes at once; each holds a slot, and slot i gets GPU i mod #GPUs (or its share of the cores)."""
    gpus = visible_gpus()
    slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(workers):
        slots.put(slot)

    def work(process: PointProcess) -> Outcome:
        slot = slots.get()
        env = dict(process.env)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        elif workers > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        try:
            return run_point(process.command, process.run_dir, process.log, env)
        finally:
            slots.put(slot)

    pool = ThreadPoolExecutor(workers)
    try:
        futures = {pool.submit(work, process): process for process in processes}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_ray(processes: list[PointProcess], address: str | None) -> Iterator[tuple[PointProcess, Outcome]]:
    """Each point a Ray task (one GPU each when the cluster has GPUs) on the cluster at ``address``.

    An already initialised Ray is used as it is. Workers import msgcli from the
    same PYTHONPATH as the local processes; the sweep directory must be on
    storage the Ray nodes share.
    """
    # A Ray started here would report usage statistics, reaching out to the network (a cloud metadata
    # address first); a sweep sends nothing anywhere. Set RAY_USAGE_STATS_ENABLED=1 to allow it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray, an optional extra of msgsnn: pip install ray") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot reach a Ray cluster at {address or 'RAY_ADDRESS / local'}: {err}") from None
    pending: dict[Any, PointProcess] = {}
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=0)(run_point)
        pending = {task.options(runtime_env={"env_vars": process.env}).remote(
            process.command, process.run_dir, process.log, process.env): process for process in processes}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            process = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as err:
                outcome = Outcome("failed", None, f"Ray task failed: {str(err).strip().splitlines()[-1]}")
            yield process, outcome
    finally:
        for ref in pending:
            ray.cancel(ref)
        if started:
            ray.shutdown()


def sweep_row(point: Point, status: str, summary: dict | None = None, error: str = "") -> dict[str, Any]:
    row = {"run": point.name}
    row.update({("seed" if k == "train.seed" else k): v for k, v in point.values.items()})
    row["status"] = status
    row.update({k: (summary or {}).get(k) for k in RESULT_COLUMNS})
    row["error"] = error
    return row


@contextlib.contextmanager
def sweep_lock(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another msgsnn sweep is running in {directory}; wait for it or choose another --name") from None
        yield


def point_process(sweep: Sweep, point: Point, state: str, overwrite: bool) -> PointProcess:
    run_dir = sweep.directory / point.name
    command = [sys.executable, "-m", "msgcli", "train", "--config", str(sweep.directory / BASE_CONFIG),
               "--out", str(sweep.directory), "--name", point.name, "--quiet"]
    command += [f"--set={key}={value}" for key, value in point.values.items()]
    if overwrite or state == "broken":
        command.append("--overwrite")
    elif state == "interrupted":
        command.append("--resume")
    python_path = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    return PointProcess(point, command, str(run_dir), str(sweep.directory / "logs" / f"{point.name}.log"), {"PYTHONPATH": python_path})


def check_data(plans: list[Sweep], overwrite: bool) -> None:
    """Stop before any run starts if datasets that unfinished points need are not on disk, naming all of them at once."""
    from msgcli.data import check_datasets
    from msgcli.errors import DatasetMissing

    unfinished = [p.config for plan in plans for p in plan.points
                  if overwrite or RunDirectory(plan.directory / p.name).status() != "finished"]
    missing: dict[str, None] = {}
    for cfg in {repr(cfg.data): cfg for cfg in unfinished}.values():
        try:
            check_datasets(cfg)
        except DatasetMissing as err:
            missing.setdefault(str(err))
    if len(missing) > 1:
        listed = " ".join(f"[{i}] {message}" for i, message in enumerate(missing, start=1))
        raise DatasetMissing(f"{len(missing)} datasets are missing: {listed}")
    if missing:
        raise DatasetMissing(next(iter(missing)))


def sweep_running(directory: Path) -> bool:
    """Whether a coordinator holds the sweep's lock now, so its unfinished points are running or queued."""
    if not (directory / ".lock").exists():
        return False
    with open(directory / ".lock") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def run_sweep(sweep: Sweep, **options: Any) -> list[dict[str, Any]]:
    """Run every point that has not finished; returns the sweep.csv rows (one per point). Options: :func:`run_sweeps`."""
    return run_sweeps([sweep], **options)[0]


def run_sweeps(plans: list[Sweep], *, jobs: int = 1, backend: str = "local", ray_address: str | None = None,
               overwrite: bool = False, echo: Callable[[str], None] = print,
               on_result: Callable[[], None] = lambda: None) -> list[list[dict[str, Any]]]:
    """Run the unfinished points of several sweeps together, ``jobs`` at a time or as Ray tasks; each sweep keeps
    its own folder, lock and sweep.csv. ``on_result`` is called after each point ends. Returns each sweep's rows."""
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend: {backend!r} is not allowed; choose one of local, ray")
    if jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1, got {jobs}")
    if backend == "local":  # a Ray cluster's nodes may hold the data where this machine does not
        check_data(plans, overwrite)
    rows: dict[Path, dict[str, dict[str, Any]]] = {plan.directory: {} for plan in plans}

    def write(directory: Path) -> None:
        write_atomic(directory / SWEEP_CSV, csv_text(list(rows[directory].values())))

    with contextlib.ExitStack() as locks:
        todo: list[PointProcess] = []
        for plan in plans:
            plan.directory.mkdir(parents=True, exist_ok=True)
            locks.enter_context(sweep_lock(plan.directory))
            config_io.save(plan.base, plan.directory / BASE_CONFIG)
            queued_before = len(todo)
            for point in plan.points:
                run = RunDirectory(plan.directory / point.name)
                state = "new" if overwrite else run.status()
                if state in ("finished", "interrupted"):
                    check_same_config(point, run.path)
                rows[plan.directory][point.name] = sweep_row(point, "pending" if state in ("new", "broken") else state,
                                                             run.read_summary())
                if state != "finished":
                    todo.append(point_process(plan, point, state, overwrite))
            write(plan.directory)
            planned = len(plan.points)
            resumed = sum(row["status"] == "interrupted" for row in rows[plan.directory].values())
            echo(f"sweep {plan.directory}: {planned} runs, {planned - (len(todo) - queued_before)} finished already, "
                 f"{resumed} to resume, {len(todo) - queued_before - resumed} to start")
        if not todo:
            return [list(rows[plan.directory].values()) for plan in plans]
        outcomes = run_ray(todo, ray_address) if backend == "ray" else run_local(todo, min(jobs, len(todo)))
        try:
            locks.enter_context(ForwardedStops())
            for done, (process, outcome) in enumerate(outcomes, start=1):
                directory = Path(process.run_dir).parent
                rows[directory][process.point.name] = sweep_row(process.point, outcome.status, outcome.summary, outcome.error)
                write(directory)
                result = (f"best {outcome.summary['best_test_acc']:.2f}%" if outcome.status == "finished"
                          else f"{outcome.error} (log: {process.log})")
                label = process.point.name if len(plans) == 1 else f"{directory.name}/{process.point.name}"
                echo(f"[{done}/{len(todo)}] {label}: {outcome.status}, {result}")
                on_result()
        finally:
            outcomes.close()  # waits for the running points (a stop signal: until they have saved)
            for process in todo:
                row = rows[Path(process.run_dir).parent][process.point.name]
                if row["status"] in ("pending", "interrupted"):
                    row["status"] = "interrupted" if RunDirectory(process.run_dir).status() == "interrupted" else "pending"
            for directory in rows:
                write(directory)
    return [list(rows[plan.directory].values()) for plan in plans]
