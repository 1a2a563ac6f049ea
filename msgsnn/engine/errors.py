"""Errors a user can act on: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A problem the user must fix (bad path, existing run, ...); exit code 1."""

    exit_code = 1


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
