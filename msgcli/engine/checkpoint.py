"""Checkpoints are plain dicts written atomically; RNG states travel with them for exact resume."""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msgcli.errors import UserError


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random streams: python, numpy, torch's CPU generator and, on CUDA, its own GPU's
    generator only, so that a resume may see fewer or other GPUs than the run that saved it."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`; the saved GPU stream goes to this process's GPU, whichever index it has now."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def copy(source: Path, path: Path) -> None:
    """``source``'s bytes at ``path``, atomically as :func:`save` writes (``best.pt`` from ``last.pt``)."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)


try:
    from numpy._core.multiarray import _reconstruct  # numpy 2
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

# What a checkpoint holds beyond tensors and plain containers: numpy's random state (an ndarray).
NUMPY_STATE_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct]


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint, unpickled with ``weights_only=True``: a file that asks to run any other code is refused."""
    if not path.exists():
        raise UserError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_STATE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(err))
        what = found.group(1) if found else "objects only code can rebuild"
        raise UserError(f"cannot read checkpoint {path}: it holds {what}, and msgsnn loads only weights and "
                        "plain data (torch.load with weights_only=True)") from None
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {err}") from None
