"""The ``msgsnn`` command line with one fault injected, for the tests only: ``python tests/faulty_cli.py train ...``
or ``torchrun ... tests/faulty_cli.py train ...`` (or two such processes with SLURM's variables, as srun starts them).

``MSGSNN_TEST_FAULT=<kind>@<rank>:<n>`` acts at the n-th training loss of that rank (counted from 1; the rank is
torchrun's ``RANK`` or SLURM's ``SLURM_PROCID``):

- ``nan``: that loss and every later one become NaN;
- ``sigterm``: SIGTERM to torchrun (which passes it on to every rank's process group, DataLoader workers
  included), or without torchrun to this process's own group from a child process (start it in a session of
  its own), as a user or a scheduler would;
- ``sigusr1``: SIGUSR1 as ``sigterm`` sends SIGTERM: to torchrun, or to this process's group from a child
  process, as SLURM's ``--signal=USR1@...`` reaches every task of a job step (start the ranks in one process
  group of their own);
- ``sigkill``: ``kill -9`` of this process (a node lost, an OOM killer), no chance to save;
- ``crash``: an unexpected RuntimeError with a CUDA error's two-line message;
- ``hold``: create ``$MSGSNN_TEST_RELEASE.waiting``, then wait there until the file ``$MSGSNN_TEST_RELEASE``
  exists (the run holds its directory meanwhile).

``slowcache@<rank>:<seconds>`` instead delays every frame cache that rank renders by that many seconds (a
cold cache of a large dataset).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from msgcli.cli import main
from msgcli.data import clips
from msgcli.engine import train as train_module

CUDA_ERROR = ("CUDA error: an illegal memory access was encountered\n"
              "CUDA kernel errors might be asynchronously reported at some other API call")


def send_from_another_process(sig: int) -> None:
    """``sig`` to this process's group, sent by a child: DataLoader workers take a SIGTERM from the
    process that started them for a shutdown, one from anywhere else (a terminal, a scheduler) kills them."""
    child = os.fork()
    if child == 0:
        os.killpg(0, sig)
        os._exit(0)
    os.waitpid(child, 0)


def act(kind: str) -> None:
    if kind in ("sigterm", "sigusr1"):
        sig = signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1
        if "WORLD_SIZE" in os.environ:
            os.kill(os.getppid(), sig)
        else:
            send_from_another_process(sig)
    elif kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "crash":
        raise RuntimeError(CUDA_ERROR)
    elif kind == "hold":
        release = Path(os.environ["MSGSNN_TEST_RELEASE"])
        release.with_name(release.name + ".waiting").touch()
        while not release.exists():
            time.sleep(0.05)


def inject(kind: str, at: int) -> None:
    if kind == "slowcache":
        real_build = clips.build_clips

        def slow_build(*args, **kwargs):
            time.sleep(at)
            return real_build(*args, **kwargs)

        clips.build_clips = slow_build
        return
    real_loss = train_module.compute_loss
    calls = 0

    def compute_loss(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = real_loss(*args, **kwargs)
        if kind == "nan" and calls >= at:
            return loss * float("nan")
        if calls == at:
            act(kind)
        return loss

    train_module.compute_loss = compute_loss


if __name__ == "__main__":
    kind, where = os.environ["MSGSNN_TEST_FAULT"].split("@")
    rank, at = map(int, where.split(":"))
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == rank:
        inject(kind, at)
    main()
