"""Multi-day runs on clusters, as a user meets them on the CPU: srun's tasks (SLURM's variables in two plain
processes), torchrun over gloo, real signals, ``kill -9`` and ``--auto-resume``, one process per run directory,
a cold cache slower than ``train.dist_timeout``, and an unexpected error's traceback in ``train.log``."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from msgcli import config as config_io
from msgcli.data import registry
from msgcli.engine import checkpoint, distributed
from msgcli.engine import train as train_module
from msgcli.engine.launch import Launch, detect_launch, first_host
from msgcli.engine.results import RunDirectory
from msgcli.engine.train import train
from msgcli.errors import RunInUse, UserError
from tests.conftest import group_of_one, tiny_cli_args, tiny_config
from tests.launch import (clean_environment, finish, finish_all, msgsnn, same_metrics, srun, torchrun)

TWO_EPOCHS = {"train.epochs": 2, "train.limit_batches": 0, "data.num_workers": 1}  # 7 steps an epoch a rank on 2 ranks


def sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]


def train_args(base: Path, *extra: str, overrides: dict = TWO_EPOCHS) -> list[str]:
    return ["train", *tiny_cli_args(base), *sets(overrides), "--quiet", "--out", str(base / "out"), *extra]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "error:" in line]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: what "touched nothing" compares."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- who is who: launchers, devices, CPUs


def test_torchrun_wins_then_srun_then_one_process():
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_NODELIST": "gpu[07-08]", "SLURM_STEP_ID": "0"}
    assert detect_launch(slurm) == Launch(3, 4, 1, "gpu07", 15000 + 123456 % 20000, "srun")
    assert detect_launch(dict(slurm, MASTER_ADDR="head", MASTER_PORT="29400")) == Launch(3, 4, 1, "head", 29400, "srun")
    torchrun_env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "a", "MASTER_PORT": "1"}
    assert detect_launch(dict(slurm, **torchrun_env)) == Launch(1, 2, 1, "a", 1, "torchrun")  # torchrun inside srun
    assert detect_launch(dict(slurm, SLURM_NTASKS="1")) == Launch()  # one task: a plain process
    assert detect_launch({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "1"}) == Launch()  # a batch script, not an srun task
    batch_shell = {k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}  # sbatch --ntasks 4, the script's own shell
    assert detect_launch(dict(batch_shell, SLURM_PROCID="0")) == Launch()
    with pytest.raises(UserError, match="MASTER_ADDR:MASTER_PORT"):
        detect_launch({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    assert [first_host(n) for n in ("node5", "gpu[07-09,12],cpu1", "rack[1-2]-n[03-04]")] == ["node5", "gpu07", "rack1-n03"]


def test_a_sweeps_points_are_jobs_of_their_own_inside_a_slurm_job(monkeypatch):
    """`msgsnn sweep` in a batch script of `sbatch -n 4` (or an srun task): its points must not take SLURM's
    tasks for their own and wait for ranks that never come."""
    from msgcli.engine.sweep import point_environment

    for name, value in {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "77",
                        "SLURM_NODELIST": "gpu07", "RANK": "0", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    env = point_environment({"CUDA_VISIBLE_DEVICES": "1"})
    assert detect_launch(env) == Launch() and env["CUDA_VISIBLE_DEVICES"] == "1" and env["SLURM_JOB_ID"] == "77"


def test_loader_workers_default_to_the_cpus_of_each_process(monkeypatch):
    def workers(affinity: int = 32, **env: str) -> int:
        for name in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        return registry.resolve_workers(None)

    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert workers() == 16  # 31 CPUs left, capped
    assert registry.resolve_workers(3) == 3  # data.num_workers as given
    assert workers(LOCAL_WORLD_SIZE="4") == 7  # torchrun's 4 processes share the node's 32 CPUs
    assert workers(SLURM_CPUS_PER_TASK="6") == 5  # srun --cpus-per-task 6
    assert workers(SLURM_CPUS_PER_TASK="32", LOCAL_WORLD_SIZE="4") == 7  # torchrun's 4 ranks in one srun task
    assert workers(SLURM_NTASKS_PER_NODE="4(x2)") == 7  # srun's 4 tasks a node, not bound to CPUs
    assert workers(affinity=8, SLURM_NTASKS_PER_NODE="4") == 7  # bound to 8 CPUs of its own
    assert workers(SLURM_CPUS_PER_TASK="1") == 0


def test_a_checkpoint_holds_and_restores_only_the_ranks_own_gpu_stream(monkeypatch):
    """Saved on cuda:1 of a 2-GPU node, resumed where one GPU is visible (cuda:0): no IndexError, the stream moves."""
    streams = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: streams[torch.device(device).index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update({torch.device(device).index: state}))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's stream was read"))
    saved = checkpoint.rng_state(torch.device("cuda:1"))
    assert torch.equal(saved["cuda"], streams[1])
    checkpoint.set_rng_state(saved, torch.device("cuda:0"))
    assert list(restored) == [0] and torch.equal(restored[0], streams[1])
    assert "cuda" not in checkpoint.rng_state(torch.device("cpu"))


# ---------------------------------------------------------------- inside one process: workers, syncs, determinism


def test_loader_workers_persist_across_epochs(tmp_path, monkeypatch):
    """One worker for training and one for testing, started once for 3 epochs (not once an epoch)."""
    started = tmp_path / "workers"
    started.mkdir()
    real_init = train_module.ignore_stop_signals

    def record(worker_id: int) -> None:
        (started / str(os.getpid())).touch()
        real_init(worker_id)

    monkeypatch.setattr(train_module, "ignore_stop_signals", record)
    monkeypatch.setattr("msgcli.engine.evaluate.ignore_stop_signals", record)
    train(tiny_config(tmp_path, train__epochs=3, data__num_workers=1), tmp_path / "out", progress=False)
    assert len(list(started.iterdir())) == 2


class ParentOfTheWorker(torch.utils.data.Dataset):
    """Item ``i``: ``i`` and the process id of the parent of the worker that loaded it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, os.getppid()


def test_a_ranks_loader_workers_start_from_a_fork_server_not_as_forks_of_the_rank():
    """A fork of a rank can hang before its first line: the group's threads take Python's runtime lock for an
    instant whenever they release a tensor (python/cpython#112275). Outside a group, workers stay forks."""

    def parents(options: dict) -> set[int]:
        loader = torch.utils.data.DataLoader(ParentOfTheWorker(), batch_size=2, **options)
        batches = list(loader)
        assert [batch[0].tolist() for batch in batches] == [[0, 1], [2, 3]]
        return {pid for batch in batches for pid in batch[1].tolist()}

    assert registry.worker_processes(0) == {"num_workers": 0}
    assert registry.worker_processes(2) == {"num_workers": 2}
    assert parents(registry.worker_processes(2)) == {os.getpid()}
    with group_of_one():
        assert registry.worker_processes(0) == {"num_workers": 0}
        options = registry.worker_processes(2)
        assert options["multiprocessing_context"].get_start_method() == "forkserver"
        server = parents(options)
    assert len(server) == 1 and os.getpid() not in server


A_RANKS_WORKERS_AND_THEIR_SERVER = """
import multiprocessing.forkserver, os, signal, time, torch
from msgcli.data.registry import worker_processes
from msgcli.engine import distributed
from msgcli.engine.sampling import ignore_stop_signals
torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
os.environ.update(RANK="0", WORLD_SIZE="2")  # torchrun's rank 0 of 2 to setup(), which takes the group made here
distributed.setup("cpu", workers=1)
loader = torch.utils.data.DataLoader(list(range(40)), batch_size=2, persistent_workers=True,
                                     worker_init_fn=ignore_stop_signals, **worker_processes(1))
batches = iter(loader)
first = next(batches).tolist()
server = multiprocessing.forkserver._forkserver._forkserver_pid
for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    os.kill(server, sig)
time.sleep(1)
print(first, os.waitpid(server, os.WNOHANG) == (0, 0), sum(len(batch) for batch in batches))
batches = iter(loader)
next(batches)
print(server, batches._workers[0].pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_ranks_workers_and_their_fork_server_outlive_the_stop_signals_and_end_with_the_rank():
    """SLURM's or torchrun's stop signal reaches every process of the group, the server too: were it to end,
    its workers would end with it (their parent gone) while the rank finishes its step and saves. A rank
    killed outright takes them with it, or they would run for good."""
    done = subprocess.run([sys.executable, "-c", A_RANKS_WORKERS_AND_THEIR_SERVER], env=clean_environment(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    served, pids = done.stdout.splitlines()
    assert served == "[0, 1] True 38", done.stdout + done.stderr
    deadline = time.monotonic() + 30
    while any(running(int(pid)) for pid in pids.split()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(running(int(pid)) for pid in pids.split()), pids


HOST_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
PACKAGE = str(Path(train_module.__file__).parents[1])


def syncs_of_a_run(tmp_path, monkeypatch, batches: int) -> int:
    """How many times msgsnn's code read a tensor's value (a host synchronisation on a GPU) during a 2-epoch run
    with one loader worker (the data is read in its process). torch's own reads are its business: AdamW, for
    one, keeps its step count on the CPU for that reason."""
    count = {"n": 0}
    for name in HOST_SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            count["n"] += sys._getframe(1).f_code.co_filename.startswith(PACKAGE)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    folder = tmp_path / str(batches)
    train(tiny_config(folder, train__epochs=2, train__limit_batches=batches, data__num_workers=1), folder, progress=False)
    monkeypatch.undo()
    return count["n"]


def test_a_training_step_reads_the_device_once(tmp_path, monkeypatch):
    """Four more steps an epoch, over two epochs, cost exactly 8 more reads: agree()'s one, per step."""
    assert syncs_of_a_run(tmp_path, monkeypatch, 6) - syncs_of_a_run(tmp_path, monkeypatch, 2) == 2 * 4


def test_deterministic_turns_on_torchs_deterministic_algorithms_for_the_run_only(tmp_path, monkeypatch):
    seen = []
    real_loss = train_module.compute_loss

    def looking(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", looking)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # restored after the test, whatever the run sets
    del os.environ["CUBLAS_WORKSPACE_CONFIG"]
    before = torch.are_deterministic_algorithms_enabled()
    train(tiny_config(tmp_path, train__epochs=1, train__deterministic=True), tmp_path / "out", progress=False)
    assert set(seen) == {(True, False)}  # raising, not warning, on an operator without a deterministic version
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() == before


def test_an_operator_without_a_deterministic_version_stops_a_deterministic_run_with_one_line(tmp_path, monkeypatch):
    real_loss = train_module.compute_loss

    def scattering(*args, **kwargs):
        torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))  # no deterministic version in torch
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "compute_loss", scattering)
    with pytest.raises(UserError, match=r"^train.deterministic: put_ does not have a deterministic implementation on cpu; "
                                        r"set train.deterministic=false"):
        train(tiny_config(tmp_path, train__epochs=1, train__deterministic=True), tmp_path / "out", progress=False)
    assert train(tiny_config(tmp_path, train__epochs=1), tmp_path / "out", overwrite=True, progress=False).model is not None


def test_eval_builds_only_the_test_split_and_leaves_the_process_group(tmp_path, monkeypatch):
    """On a cached dataset: ``msgsnn eval`` renders the test frames it needs, never the training frames."""
    from typer.testing import CliRunner

    from msgcli.cli import app

    cfg = tiny_config(tmp_path, data__name="digits-dvs", train__epochs=1, train__limit_batches=2)
    train(cfg, tmp_path / "out", progress=False)
    cache = Path(cfg.data.cache_dir)
    for path in cache.iterdir():
        path.unlink()
    left = []
    monkeypatch.setattr(distributed, "teardown", lambda ctx: left.append(ctx))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "out" / cfg.name), "--checkpoint", "last", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert [p.name.split("-T")[0] for p in cache.glob("*.npy")] == ["digits-dvs-test"]
    assert len(left) == 1


# ---------------------------------------------------------------- one process per run directory


@pytest.mark.slow
def test_a_held_run_directory_is_refused_at_once_naming_its_holder_and_the_holder_finishes_intact(tmp_path):
    """The holder waits at its second step until released; meanwhile every kind of second `train` on the same
    run stops with one line naming the holder's process, and changes nothing."""
    release = tmp_path / "release"
    overrides = {"train.epochs": 2, "train.limit_batches": 3}
    holder = subprocess.Popen(msgsnn(*train_args(tmp_path, overrides=overrides), fault="hold@0:2"),
                              env=clean_environment(MSGSNN_TEST_FAULT="hold@0:2", MSGSNN_TEST_RELEASE=str(release)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = tmp_path / "out" / "digits-dvs"
    try:
        while not (tmp_path / "release.waiting").exists():
            assert holder.poll() is None, holder.communicate()[0]
            time.sleep(0.05)
        assert f"pid {holder.pid} " in (run / ".lock").read_text()
        before = snapshot(run)
        kinds = ([], ["--resume"], ["--overwrite"], ["--auto-resume"])
        seconds = [subprocess.Popen(msgsnn(*train_args(tmp_path, *extra, overrides=overrides)), env=clean_environment(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for extra in kinds]
        for extra, second in zip(kinds, seconds):
            stdout, stderr = second.communicate(timeout=120)
            assert second.returncode == 2, (extra, stdout, stderr)
            lines = stderr.strip().splitlines()
            assert len(lines) == 1 and re.fullmatch(
                rf"error: run directory {re.escape(str(run))} is in use by msgsnn train \(pid {holder.pid} on "
                rf"{re.escape(socket.gethostname())}, since [\d: -]+\); wait for it to end, or write this run "
                r"elsewhere \(--name or --out\)", lines[0]), (extra, lines)
            assert holder.poll() is None  # refused while the holder still runs: nobody waited for the lock
        for options in ({}, {"overwrite": True}):  # the library refuses as well (the command looks first, before torch loads)
            with pytest.raises(RunInUse, match=rf"is in use by msgsnn train \(pid {holder.pid} "):
                train(tiny_config(tmp_path, train__epochs=2, train__limit_batches=3), tmp_path / "out", progress=False,
                      **options)
        assert snapshot(run) == before
    finally:
        release.touch()
    code, output = finish(holder, timeout=240)
    assert code == 0, output
    assert len(pd.read_csv(run / "metrics.csv")) == 2 and json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert len(list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))) == 1


@pytest.mark.slow
def test_kill_9_mid_epoch_then_auto_resume_gives_the_uninterrupted_metrics(tmp_path):
    """train.checkpoint_minutes writes the mid-epoch checkpoint between batches; a killed run (its lock left
    behind, naming a dead process) resumes from it with --auto-resume, as a requeued job would."""
    overrides = {"train.epochs": 2, "train.limit_batches": 0, "data.num_workers": 1}  # 14 steps an epoch
    straight = train(tiny_config(tmp_path, name="straight", **{k.replace(".", "__"): v for k, v in overrides.items()}),
                     tmp_path / "out", progress=False)
    often = dict(overrides, **{"train.checkpoint_minutes": 1e-6})  # due before every step
    args = train_args(tmp_path, "--name", "killed", "--auto-resume", overrides=often)
    victim = subprocess.Popen(msgsnn(*args, fault="sigkill@0:17"), env=clean_environment(MSGSNN_TEST_FAULT="sigkill@0:17"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    code, output = finish(victim, timeout=240)
    assert code == -signal.SIGKILL, output
    run = RunDirectory(tmp_path / "out" / "killed")
    saved = checkpoint.load(run.last)
    assert (saved["epoch"], saved["batch"]) == (1, 2)  # epoch 2, after its 2nd batch: the 3rd was under way
    assert f"pid {victim.pid} " in (run.path / ".lock").read_text()  # the dead holder's lock
    resumed = subprocess.run(msgsnn(*args), env=clean_environment(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout and "at epoch 2, batch 2" in resumed.stdout
    same_metrics(straight.run.path, run.path)
    assert config_io.load(run.config).data.num_workers == 1


@pytest.mark.slow
def test_an_unexpected_error_is_one_line_naming_train_log_which_holds_the_traceback(tmp_path):
    done = subprocess.run(msgsnn(*train_args(tmp_path), fault="crash@0:3"),
                          env=clean_environment(MSGSNN_TEST_FAULT="crash@0:3"), capture_output=True, text=True, timeout=240)
    log = tmp_path / "out" / "digits-dvs" / "train.log"
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"internal error: RuntimeError: CUDA error: an illegal memory access was encountered (full traceback in {log})"]
    text = log.read_text()
    assert "ERROR unexpected error:" in text and "Traceback (most recent call last)" in text
    assert "in train_epoch" in text and "CUDA kernel errors might be asynchronously reported" in text


# ---------------------------------------------------------------- srun: SLURM's tasks, signals and requeues


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory) -> Path:
    """``srun -n 2 msgsnn train ...`` uninterrupted: 2 epochs of 7 steps a rank, 1 DataLoader worker a rank."""
    base = tmp_path_factory.mktemp("srun")
    codes, output = finish_all(srun(train_args(base, "--name", "straight")), timeout=300)
    assert codes == [0, 0], output
    return base


@pytest.mark.slow
def test_srun_tasks_train_one_run_as_the_ranks_of_one_process_group(slurm_run):
    """SLURM's two tasks form one job: one row in runs.csv, world_size 2 in summary.json, and the same
    metrics as torchrun's two ranks of the same run."""
    rows = list(csv.DictReader(open(slurm_run / "out" / "runs.csv")))
    assert [row["name"] for row in rows] == ["straight"]
    assert json.loads((slurm_run / "out" / "straight" / "summary.json").read_text())["world_size"] == 2
    code, output = finish(torchrun(train_args(slurm_run, "--name", "torchrun")), timeout=300)
    assert code == 0, output
    same_metrics(slurm_run / "out" / "straight", slurm_run / "out" / "torchrun")


@pytest.mark.slow
def test_sigusr1_to_every_task_saves_and_the_requeued_job_continues_exactly(slurm_run):
    """SLURM's --signal=USR1@120 reaches both tasks mid-epoch: they stop together after a checkpoint, say so
    once and exit 130; the same command again (--auto-resume) finishes the run as if nothing happened, and
    once more, it exits 0 touching nothing."""
    args = train_args(slurm_run, "--name", "requeued", "--auto-resume")
    codes, output = finish_all(srun(args, fault="sigusr1@0:10"), timeout=300)  # epoch 2, batch 3 of rank 0
    assert codes == [130, 130], output
    stops = [line for line in error_lines(output) if re.match(r"error: interrupted at epoch 2, batch \d+;", line)]
    assert len(stops) == 1 and len(error_lines(output)) == 1, output
    run = slurm_run / "out" / "requeued"
    assert checkpoint.load(run / "checkpoints" / "last.pt")["batch"] > 0
    codes, output = finish_all(srun(args), timeout=300)
    assert codes == [0, 0], output
    same_metrics(slurm_run / "out" / "straight", run)
    before, rows = snapshot(run), (slurm_run / "out" / "runs.csv").read_text()
    codes, output = finish_all(srun(args), timeout=300)
    assert codes == [0, 0] and "finished already" in output, output
    assert snapshot(run) == before and (slurm_run / "out" / "runs.csv").read_text() == rows


@pytest.mark.slow
def test_torchrun_passes_sigusr1_on_when_told_to_and_the_run_continues_exactly(slurm_run):
    """torchrun inside a SLURM job: with --signals-to-handle naming SIGUSR1 it passes the signal to every rank
    (without, SIGUSR1 would end torchrun itself); they save and stop, and --auto-resume finishes the run."""
    args = train_args(slurm_run, "--name", "torchrun-usr1", "--auto-resume")
    options = ("--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1")
    code, output = finish(torchrun(args, fault="sigusr1@0:9", options=options), timeout=300)
    assert code != 0 and "exited unexpectedly" not in output and "internal error" not in output, output
    assert len([line for line in error_lines(output) if "error: interrupted at epoch 2, batch" in line]) == 1, output
    run = slurm_run / "out" / "torchrun-usr1"
    assert checkpoint.load(run / "checkpoints" / "last.pt")["batch"] > 0
    code, output = finish(torchrun(args, options=options), timeout=300)
    assert code == 0, output
    same_metrics(slurm_run / "out" / "straight", run)


@pytest.mark.slow
def test_eval_under_srun_gives_the_single_process_accuracy(slurm_run):
    run = slurm_run / "out" / "straight"
    codes, output = finish_all(srun(["eval", str(run), "--workers", "0"]), timeout=300)
    assert codes == [0, 0], output
    assert output.count("saved ") == 1, output  # rank 0 alone reports and writes
    two_ranks = json.loads((run / "eval-best.json").read_text())
    done = subprocess.run(msgsnn("eval", str(run)), env=clean_environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    one = json.loads((run / "eval-best.json").read_text())
    assert (two_ranks["samples"], two_ranks["test_acc"]) == (one["samples"], one["test_acc"])


# ---------------------------------------------------------------- train.dist_timeout


@pytest.mark.slow
def test_a_cold_cache_slower_than_dist_timeout_keeps_two_gloo_ranks_training(tmp_path):
    """Rank 0 renders a cold frame cache for over 12 s (each split delayed 6 s) while rank 1 waits with
    train.dist_timeout=5: no collective waits on it, so both train to the end."""
    overrides = {"data.name": "digits-dvs", "train.epochs": 1, "train.limit_batches": 2, "train.dist_timeout": 5}
    code, output = finish(torchrun(train_args(tmp_path, overrides=overrides), fault="slowcache@0:6"), timeout=300)
    assert code == 0, output
    summary = json.loads((tmp_path / "out" / "digits-dvs" / "summary.json").read_text())
    assert (summary["status"], summary["world_size"]) == ("finished", 2)


@pytest.mark.slow
def test_dist_timeout_bounds_a_collective_and_the_traceback_reaches_train_log(tmp_path):
    """Rank 1 stops (held) at its 2nd step; rank 0 waits in that step's all-reduce for train.dist_timeout=5 s,
    then stops with one line naming train.log, where the traceback is."""
    overrides = {"train.epochs": 1, "train.limit_batches": 3, "train.dist_timeout": 5}
    release = tmp_path / "release"
    launch = torchrun(train_args(tmp_path, overrides=overrides), fault="hold@1:2", MSGSNN_TEST_RELEASE=str(release))
    log = tmp_path / "out" / "digits-dvs" / "train.log"
    while launch.poll() is None and "ERROR unexpected error" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    release.touch()  # rank 1 goes on, finds rank 0 gone and ends too (not torchrun's kill, 30 s later)
    code, output = finish(launch, timeout=300)
    assert code != 0
    assert any(line.startswith("internal error:") and f"(full traceback in {log})" in line for line in output.splitlines()), output
    assert "Traceback (most recent call last)" in log.read_text() and "in agree" in log.read_text()


def test_gpu_times_are_read_from_the_output_folder_not_the_working_directory(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from msgcli.cli import app

    measured = [{"preset": "dvs-vgg", "batch": 64, "T": 10, "amp": "none", "steps_per_epoch": 141, "epoch_min": 1.5,
                 "device": "NVIDIA H200"}]
    (tmp_path / "out" / "gpu").mkdir(parents=True)
    (tmp_path / "out" / "gpu" / "epoch.json").write_text(json.dumps(measured))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = CliRunner().invoke(app, ["reproduce", "dvs-vgg", "--epochs", "10", "--seeds", "1",
                                      "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output  # the dataset is missing, after the plan is printed
    assert "15 min" in result.output and "measured them on NVIDIA H200" in " ".join(result.output.split())
