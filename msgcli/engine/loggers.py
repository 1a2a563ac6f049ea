"""Per-epoch metrics beyond ``metrics.csv``: TensorBoard scalars under ``<run>/tb/`` (``train.loggers``).

``metrics.csv`` stays the source of truth; a logger only mirrors its rows. On resume
the TensorBoard run is rewritten from the rows the checkpoint carries (events from
epoch 1 on are purged first), so it holds exactly the CSV's epochs, once each, even
if the previous process died between writing the CSV and the events.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from msgcli.errors import UserError


def require(names: list[str]) -> None:
    """Stop at once, with the install command, if a chosen logger's package is missing."""
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("train.loggers: tensorboard needs the tensorboard package, an optional extra of msgsnn: "
                            "pip install tensorboard") from None


def scalar_tag(column: str) -> str:
    """A metrics.csv column as a TensorBoard tag; per-timestep columns are grouped (``two_t3`` -> ``two_t/3``)."""
    match = re.fullmatch(r"(test_acc_t|two_t)(\d+)", column)
    return f"{match[1]}/{match[2]}" if match else column


class TensorBoardLogger:
    """Every metrics.csv column of every epoch as a scalar at step = epoch."""

    def __init__(self, directory: Path, rows: list[dict[str, Any]]) -> None:
        require(["tensorboard"])
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory), purge_step=1 if rows else None)
        for row in rows:
            self.log(row)

    def log(self, row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        for column, value in row.items():
            if column != "epoch":
                self.writer.add_scalar(scalar_tag(column), float(value), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricLoggers:
    """The loggers named in ``train.loggers`` besides ``csv`` (the run directory writes that), as a context manager.

    ``rows`` are the epochs already on record (resume); pass ``names=[]`` on processes other than rank 0.
    """

    def __init__(self, names: list[str], run_dir: Path, rows: list[dict[str, Any]]) -> None:
        self.loggers = [TensorBoardLogger(Path(run_dir) / "tb", rows)] if "tensorboard" in names else []

    def log(self, row: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(row)

    def __enter__(self) -> "MetricLoggers":
        return self

    def __exit__(self, *exc) -> None:
        for logger in self.loggers:
            logger.close()
