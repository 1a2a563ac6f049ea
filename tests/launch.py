"""Launching ``msgsnn`` processes as a cluster would, for the tests: torchrun, srun's environment, and ending
a launch (with every process below it) when it runs past its time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from msgcli.engine.launch import slurm_port

NONDETERMINISTIC_COLUMNS = ["epoch_seconds"]
FAULTY_CLI = str(Path(__file__).with_name("faulty_cli.py"))
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "MSGSNN_TEST_FAULT", "MSGSNN_TEST_RELEASE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_slurm_job_id() -> str:
    """A job id whose derived port (the ranks' meeting point when MASTER_PORT is unset) is free here."""
    job = 4_000_000 + os.getpid() % 10_000
    while not port_is_free(slurm_port(str(job))):
        job += 1
    return str(job)


def clean_environment(**extra: str) -> dict[str, str]:
    """This environment without any launcher's or test fault's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    # a launch killed for its time first prints every thread's stack (faulthandler on SIGABRT): where it waited
    return dict(env, PYTHONPATH=os.getcwd(), PYTHONFAULTHANDLER="1", **extra)


def msgsnn(*args: str, fault: str | None = None) -> list[str]:
    """The command line of ``msgsnn ...``, through tests/faulty_cli.py when a fault is injected."""
    return [sys.executable, *([FAULTY_CLI] if fault else ["-m", "msgcli"]), *args]


def srun(args: list[str], tasks: int = 2, fault: str | None = None, job_id: str | None = None,
         **extra: str) -> list[subprocess.Popen]:
    """``srun -n tasks msgsnn <args>`` without srun: ``tasks`` processes with the variables srun sets for a job
    step on one node (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_JOB_ID``, ``SLURM_NODELIST``;
    no ``MASTER_ADDR``/``MASTER_PORT`` unless given in ``extra``), in one process group of their own, as
    SLURM signals a job step's tasks together."""
    job_id = job_id or free_slurm_job_id()
    processes: list[subprocess.Popen] = []
    for rank in range(tasks):
        env = clean_environment(SLURM_NTASKS=str(tasks), SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                                SLURM_JOB_ID=job_id, SLURM_STEP_ID="0", SLURM_NODELIST="localhost", **extra)
        if fault:
            env["MSGSNN_TEST_FAULT"] = fault
        group = {"process_group": processes[0].pid if processes else 0}  # rank 0 leads a new group, the others join it
        processes.append(subprocess.Popen(msgsnn(*args, fault=fault), env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, **group))
    return processes


def torchrun(args: list[str], nproc: int = 2, fault: str | None = None, options: tuple[str, ...] = (),
             **extra: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node nproc [options] -m msgcli <args>`` (through tests/faulty_cli.py for a fault)."""
    entry = [FAULTY_CLI] if fault else ["-m", "msgcli"]
    env = clean_environment(**extra)
    if fault:
        env["MSGSNN_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           *options, *entry, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts each rank in a session of its own, so killing
    torchrun's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.extend(kids := children.get(todo.pop(), []))
        todo.extend(kids)
    return found


def kill_all(processes: list[subprocess.Popen], dump_stacks: bool = False) -> None:
    """Kill ``processes`` and every process below them; ``dump_stacks``: after each has printed its threads'
    stacks (SIGABRT, which faulthandler answers in the processes of :func:`clean_environment`)."""
    pids = [pid for p in processes for pid in [*descendants(p.pid), p.pid]]  # before any dies and orphans the rest
    for sig in ([signal.SIGABRT] if dump_stacks else []) + [signal.SIGKILL]:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGABRT:
            time.sleep(5)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """The exit code and output of a launch; past ``timeout`` the launch and all its processes are killed
    (none is left behind to slow the rest of the suite) and the test fails with the output so far."""
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_all([process], dump_stacks=True)
        pytest.fail(f"{process.args[:4]}... did not finish within {timeout} s; output so far, with every process's "
                    f"stacks:\n{process.communicate()[0]}")
    return process.returncode, output


def finish_all(processes: list[subprocess.Popen], timeout: float) -> tuple[list[int], str]:
    """:func:`finish` for the tasks of one :func:`srun` launch: their exit codes and their outputs, task by task."""
    codes, outputs = [], []
    try:
        for rank, process in enumerate(processes):
            code, output = finish(process, timeout)
            codes.append(code)
            outputs.append(f"--- task {rank} (exit {code})\n{output}")
    finally:
        kill_all(processes)
    return codes, "\n".join(outputs)


def same_metrics(a: Path, b: Path) -> None:
    """metrics.csv of two runs, every column but timings."""
    pd.testing.assert_frame_equal(pd.read_csv(a / "metrics.csv").drop(columns=NONDETERMINISTIC_COLUMNS),
                                  pd.read_csv(b / "metrics.csv").drop(columns=NONDETERMINISTIC_COLUMNS))
