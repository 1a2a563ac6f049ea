"""The signals that stop a run or a sweep with its work saved: Ctrl-C, SIGTERM, and SIGUSR1 (what SLURM's
``--signal=USR1@<seconds>`` sends before a job's time limit)."""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class OnStopSignals:
    """While entered, each stop signal calls :meth:`on_stop` instead of ending the process. Python installs
    handlers only in the main thread; entered elsewhere (a library user's thread), it changes nothing."""

    def __enter__(self) -> "OnStopSignals":
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.on_stop(signum))
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_stop(self, signum: int) -> None:
        raise NotImplementedError
