"""The ``msgsnn`` command line with one fault injected, for the tests only: ``python tests/faulty_cli.py train ...``
or ``torchrun ... tests/faulty_cli.py train ...``.

``MSGSNN_TEST_FAULT=<kind>@<rank>:<n>`` acts at the n-th training loss of that rank (counted from 1):
``nan``: that loss and every later one become NaN; ``sigterm``: SIGTERM to torchrun (which passes it on
to every rank's process group, DataLoader workers included), or without torchrun to this process's
own group from a child process (start it in a session of its own), as a user or a scheduler would.
"""

from __future__ import annotations

import os
import signal

from msgcli.cli import main
from msgcli.engine import train as train_module


def send_from_another_process(sig: int) -> None:
    """``sig`` to this process's group, sent by a child: DataLoader workers take a SIGTERM from the
    process that started them for a shutdown, one from anywhere else (a terminal, a scheduler) kills them."""
    child = os.fork()
    if child == 0:
        os.killpg(0, sig)
        os._exit(0)
    os.waitpid(child, 0)


def inject(kind: str, at: int) -> None:
    real_loss = train_module.compute_loss
    calls = 0

    def compute_loss(*args, **kwargs):
        nonlocal calls
        calls += 1
        loss = real_loss(*args, **kwargs)
        if kind == "nan" and calls >= at:
            return loss * float("nan")
        if kind == "sigterm" and calls == at:
            if "WORLD_SIZE" in os.environ:
                os.kill(os.getppid(), signal.SIGTERM)
            else:
                send_from_another_process(signal.SIGTERM)
        return loss

    train_module.compute_loss = compute_loss


if __name__ == "__main__":
    kind, where = os.environ["MSGSNN_TEST_FAULT"].split("@")
    rank, at = map(int, where.split(":"))
    if int(os.environ.get("RANK", "0")) == rank:
        inject(kind, at)
    main()
