"""The run directory: config, per-epoch metrics, checkpoints, log and summary.

Every file is replaced atomically (temporary file + rename), so a crash leaves
either the previous complete file or the new complete file, never half of one.
``<out>/runs.csv`` gets one appended row per finished run, under a file lock so
that parallel runs cannot interleave. One process at a time trains in a run
directory: it holds ``<run>/.lock`` (:meth:`RunDirectory.hold`) for the run's life.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from msgcli import config as config_io
from msgcli.config import RunConfig
from msgcli.errors import RunExists, RunInUse, UserError


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def csv_text(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def append_row_locked(path: Path, row: dict[str, Any]) -> None:
    """Append one CSV row (header first if the file is new) while holding an exclusive lock on ``.<name>.lock``.

    A row with columns the file lacks (one written by an older msgsnn) rewrites the file atomically with them added.
    """
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path, "a+", newline="") as fh:
            fh.seek(0)
            header = fh.readline().strip()
            columns = header.split(",") if header else list(row)
            if any(key not in columns for key in row):
                fh.seek(0)
                write_atomic(path, csv_text([*csv.DictReader(fh), row]))
                return
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            if not header:
                writer.writeheader()
            writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())


class RunDirectory:
    """The layout of one run, ``<out>/<name>/``: its paths, readers and writers, spelled out only here."""

    SUMMARY = "summary.json"  # written when the run finishes
    LOCK = ".lock"  # held by the process that trains in the directory; names it

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    name = property(lambda self: self.path.name)
    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.csv")
    summary = property(lambda self: self.path / RunDirectory.SUMMARY)
    log = property(lambda self: self.path / "train.log")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last = property(lambda self: self.checkpoint("last"))
    best = property(lambda self: self.checkpoint("best"))

    def checkpoint(self, which: str) -> Path:
        """``checkpoints/<which>.pt``: ``last`` (every epoch, and an interruption) or ``best`` (best test accuracy)."""
        return self.checkpoints / f"{which}.pt"

    def is_run(self) -> bool:
        return self.config.is_file()

    def read_config(self) -> RunConfig:
        if not self.is_run():
            raise UserError(f"{self.path} is not a run directory (no config.yaml); give a directory written by `msgsnn train`")
        return config_io.load(self.config)

    def status(self) -> str:
        """``finished``, ``interrupted`` (a checkpoint to resume), ``broken`` (a folder, nothing to resume) or ``new``."""
        summary = self.read_summary()
        if summary and summary.get("status") == "finished":
            return "finished"
        if self.last.exists():
            return "interrupted"
        return "broken" if self.path.exists() and any(p.name != self.LOCK for p in self.path.iterdir()) else "new"

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the directory for one process, or raise :class:`RunInUse` at once naming the one that holds it.

        An exclusive POSIX lock (``lockf``) on ``.lock``: the kernel releases it however the holder ends
        (``kill -9`` included), so a crashed run never blocks the next; unlike ``flock`` it is not shared
        with forked DataLoader workers, which may outlive a killed holder by seconds, and it works on NFS.
        The file stays, and says who holds it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write to output directory {self.path}: {err.strerror}") from None
        try:
            self._lock_or_refuse(fd)
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.pwrite(fd, f"msgsnn train (pid {os.getpid()} on {socket.gethostname()}, since {since})\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def refuse_if_held(self) -> None:
        """Raise :class:`RunInUse` now if a process holds the directory: a quick look, before a command imports
        anything heavy. :meth:`hold` is the guard; this process must not hold the directory itself (closing
        the look's file would release a POSIX lock of this process)."""
        try:
            fd = os.open(self.path / self.LOCK, os.O_RDWR)
        except OSError:  # no lock file (a new run), or one this user cannot open: hold() will say
            return
        try:
            self._lock_or_refuse(fd)
        finally:
            os.close(fd)

    def _lock_or_refuse(self, fd: int) -> None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise RunInUse(f"run directory {self.path} is in use by {holder}; wait for it to end, "
                           "or write this run elsewhere (--name or --out)") from None

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Create the folder, refusing to clobber a run that recorded an epoch unless asked to.

        A folder left by a run that stopped before its first epoch (e.g. its dataset was
        missing) holds nothing to lose and is reused, so the same command works once the
        problem is fixed.
        """
        if self.has_progress():
            if overwrite:
                self.clear()
            elif not resume:
                raise RunExists(f"run directory {self.path} already exists: pass --resume to continue it or --overwrite to replace it")
        elif resume:
            raise UserError(f"--resume: {self.path} holds no finished epoch to resume from; run without --resume")
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to output directory {self.path}: {err.strerror}") from None

    def clear(self) -> None:
        """Remove everything the run wrote (``--overwrite``), but the lock this process holds."""
        for entry in self.path.iterdir():
            if entry.name == self.LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def has_progress(self) -> bool:
        """True once an epoch is on record (metrics or a checkpoint; not a checkpoint's unfinished ``.tmp``)."""
        saved = self.checkpoints.is_dir() and any(p.suffix != ".tmp" for p in self.checkpoints.iterdir())
        return self.metrics.exists() or self.summary.exists() or saved

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        write_atomic(self.metrics, csv_text(rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.summary, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any] | None:
        return json.loads(self.summary.read_text()) if self.summary.exists() else None
