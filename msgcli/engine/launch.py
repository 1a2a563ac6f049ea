"""Who this process is in its job, read from the launcher's environment alone (no torch: the command line asks
before it imports anything heavy).

torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; else, when SLURM says this is a task of an ``srun`` job step
(``SLURM_STEP_ID``, which a batch script's own shell and a bare ``salloc`` lack) with several tasks (``SLURM_NTASKS``,
``SLURM_PROCID``, ``SLURM_LOCALID``), each task is one rank, and the ranks meet at
``MASTER_ADDR:MASTER_PORT`` when set, else on the job's first node at a port derived from the job id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

from msgcli.errors import UserError

# What makes a process one rank of a launcher's job (detect_launch): a process that starts runs of its own
# (a sweep's points) leaves them out of their environment.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID")
SLURM_PORTS = (15000, 20000)  # a job's port: first + job id mod count, the same on every node of the job


@dataclass
class Launch:
    """Who this process is in its job: ``launcher`` is ``torchrun``, ``srun`` or ``""`` (one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    address: str = ""
    port: int = 0
    launcher: str = ""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``gpu[07-09,12],cpu1`` -> ``gpu07``; ``rack[1-2]-n[3-4]`` -> ``rack1-n3``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def slurm_port(job_id: str) -> int:
    first, count = SLURM_PORTS
    return first + int(re.sub(r"\D", "", job_id) or 0) % count


def detect_launch(env: Mapping[str, str] = os.environ) -> Launch:
    """torchrun's variables when present; else SLURM's when this is a task of an srun step of several tasks; else one
    process (a batch script's shell has SLURM_NTASKS and SLURM_PROCID too, but no step: ``msgsnn train`` run there
    directly is one run, not rank 0 of ranks that never come)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                      env.get("MASTER_ADDR", ""), int(env.get("MASTER_PORT", "0")), "torchrun")
    tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        address = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "")
        port = env.get("MASTER_PORT") or (str(slurm_port(env["SLURM_JOB_ID"])) if "SLURM_JOB_ID" in env else "")
        if not address or not port:
            raise UserError(f"SLURM_NTASKS={tasks}: the ranks of an srun job meet at MASTER_ADDR:MASTER_PORT, or on the "
                            "job's first node (SLURM_NODELIST) at a port from SLURM_JOB_ID; neither is set")
        return Launch(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", "0")), address, int(port), "srun")
    return Launch()
