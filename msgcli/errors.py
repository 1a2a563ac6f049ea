"""Errors a user can act on, and the one-line hint that names the closest valid choice.

Every such error derives from :class:`MsgsnnError`; the CLI prints its message as one
``error: ...`` line and exits with its ``exit_code``. This module imports nothing from
msgsnn, so every layer (``snn`` included) may raise these errors.
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


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(UserError):
    """SIGINT/SIGTERM: a checkpoint was saved; ``--resume`` continues exactly."""

    exit_code = 130


class PeerFailed(UserError):
    """Another process of a ``torchrun`` job stopped with an error (it printed it); this one exits quietly."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a mistyped ``name``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
