"""Errors a user can act on, and the one-line hint that names the closest valid choice.

Every such error derives from :class:`MsgsnnError`; the CLI prints its message as one
``error: ...`` line and exits with its ``exit_code``. This module imports nothing from
msgcli, so every layer (``snn`` included) may raise these errors.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MsgsnnError(Exception):
    """A problem the user must fix; its message says what and how. Exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class ConfigError(MsgsnnError, ValueError):
    """A configuration value the user must fix; the message names the key."""

    exit_code = 2  # a usage error


class DatasetMissing(MsgsnnError):
    """The dataset is not on disk in the layout msgsnn reads; the message says where to get it."""

    exit_code = 2  # a usage error


class BadSample(MsgsnnError):
    """A recording msgsnn cannot turn into frames; the message names the file and the fault."""


class UserError(MsgsnnError):
    """A problem the user must fix (bad path, existing run, ...)."""


class RunExists(UserError):
    exit_code = 2


class RunInUse(UserError):
    """Another process holds the run directory (a second ``train`` on the same ``--out``/``--name``)."""

    exit_code = 2


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(UserError):
    """SIGINT, SIGTERM or SIGUSR1: a checkpoint was saved; ``--resume`` continues exactly."""

    exit_code = 130


class PeerFailed(UserError):
    """Another process of a ``torchrun`` job stopped with an error (it printed it); this one exits quietly."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


TRACEBACK_NOTE = "full traceback in "


def note_traceback_file(err: BaseException, path: object) -> None:
    """Say on ``err`` where its full traceback was written (the CLI's one line names the file)."""
    err.add_note(f"{TRACEBACK_NOTE}{path}")


def traceback_file(err: BaseException) -> str | None:
    """Where :func:`note_traceback_file` said ``err``'s traceback is, or None."""
    notes = [n for n in getattr(err, "__notes__", ()) if n.startswith(TRACEBACK_NOTE)]
    return notes[-1][len(TRACEBACK_NOTE):] if notes else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a mistyped ``name``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
