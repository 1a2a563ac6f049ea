"""A user's own datasets: ``register_dataset(name, build)``, and the event files msgsnn frames for it.

``build(cfg)`` returns either :class:`EventFiles` (recordings on disk, labelled, and how to read one):
msgsnn then frames, caches and augments them exactly as its built-in event datasets; or a
:class:`DataBundle` of ready datasets (images or anything else), used as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from msgcli.config import RunConfig
from msgcli.errors import BadSample, UserError

from .clips import EventSplit, cache_dir, event_bundle, frame_spec
from .events import fingerprint
from .registry import SPLITS, Check, DataBundle, register

log = logging.getLogger(__name__)

POLARITIES = 2  # when neither data.sensor_size nor the dataset says


@dataclass
class EventFiles:
    """What a dataset's ``build(cfg)`` returns for event recordings stored one a file.

    ``train`` and ``test`` are ``(file, label)`` pairs, ``label`` an index into ``classes``.
    ``read(path)`` returns one recording's events as a structured array with fields ``x, y, t, p``
    (tonic's convention; ``t`` in any unit, ``p`` 0 or 1); it raises :class:`~msgcli.errors.BadSample`
    naming the file for an unusable one (any other exception is reported as the file being unreadable).
    ``sensor_size`` is ``(W, H, P)``; ``None`` takes the recordings' extent (every file is read once more to
    find it, and the result is cached) with ``P = 2``. ``data.sensor_size``, when set, overrides it.
    """

    classes: list[str]
    train: list[tuple[str | Path, int]]
    test: list[tuple[str | Path, int]]
    read: Callable[[str], np.ndarray]
    sensor_size: tuple[int, int, int] | None = None


class FileRecordings:
    """The recordings of one split, one file each, read by ``read``."""

    def __init__(self, paths: list[str], read: Callable[[str], np.ndarray]):
        self.paths = paths
        self.read_file = read

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def read(self, index: int) -> np.ndarray:
        path = self.paths[index]
        if not os.path.exists(path):
            raise BadSample(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            raise BadSample(f"{path}: empty file")
        return self.read_file(path)


def _root(paths: list[str]) -> Path:
    return Path(os.path.commonpath(paths)) if paths else Path(".")


def recordings_extent(name: str, files: EventFiles, cfg: RunConfig, progress: bool) -> tuple[int, int, int]:
    """``(W, H, 2)``: one past the largest x and y over every recording, cached under the files' fingerprint.

    Files that cannot be read are left out here; the framing that follows names them.
    """
    paths = sorted(str(p) for p, _ in files.train + files.test)
    key = hashlib.sha256(json.dumps(fingerprint(paths, _root(paths)), sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir(cfg.data)
    cached = directory / f"{name}-extent-{key}.json"
    if cached.exists():
        return tuple(json.loads(cached.read_text())["sensor_size"])
    width = height = 0
    for path in track(paths, description=f"{name}: sensor extent", disable=not (progress and sys.stdout.isatty())):
        try:
            events = files.read(path)
        except Exception:  # noqa: BLE001 - reported by the framing, with the file's name
            continue
        if len(events):
            width, height = max(width, int(events["x"].max()) + 1), max(height, int(events["y"].max()) + 1)
    if not width:
        raise BadSample(f"{name}: no readable events in any of its {len(paths)} files")
    sensor_size = (width, height, POLARITIES)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sensor_size": sensor_size, "files": len(paths)}))
    os.replace(tmp, cached)
    log.info("%s: sensor size %dx%d from the recordings' extent (set data.sensor_size to skip this pass)", name, width, height)
    return sensor_size


def files_bundle(name: str, files: EventFiles, cfg: RunConfig, progress: bool, wanted: tuple[str, ...] = SPLITS) -> DataBundle:
    """Frame, cache and augment the ``wanted`` splits of ``files`` as the built-in event datasets (the cache keyed by
    every file's path, size and modification time)."""
    configured = cfg.data.sensor_size
    if configured:
        sensor_size = (*configured, POLARITIES)[:3]
    else:
        sensor_size = files.sensor_size or recordings_extent(name, files, cfg, progress)
    splits = {}
    for split, pairs in (("train", files.train), ("test", files.test)):
        pairs = sorted((str(path), int(label)) for path, label in pairs)
        if not pairs:
            raise UserError(f"{name}: no {split} recordings")
        paths = [path for path, _ in pairs]
        labels = np.array([label for _, label in pairs], dtype=np.int64)
        splits[split] = EventSplit(lambda paths=paths: FileRecordings(paths, files.read), labels,
                                   fingerprint(paths, _root(paths)))
    return event_bundle(cfg, list(files.classes), frame_spec(cfg, tuple(int(n) for n in sensor_size)), splits, progress,
                        wanted)


def register_dataset(name: str, build: Callable[[RunConfig], EventFiles | DataBundle],
                     check: Check | None = None) -> None:
    """Make ``build`` the dataset ``data.name: <name>``; a second dataset of the same name replaces the first, with
    a warning.

    ``build(cfg)`` gets the run's :class:`~msgcli.config.RunConfig` (``cfg.data.root`` through
    :func:`~msgcli.data.resolve_root`, ``cfg.data.train_fraction``, ``cfg.T``...) and returns
    :class:`EventFiles` (msgsnn frames them at ``cfg.T`` bins, caches the frames under a key of every file's
    path, size and modification time and of every framing parameter, and augments them) or a
    :class:`~msgcli.data.DataBundle` (its datasets used as they are; each needs ``targets``). A dataset
    that is not on disk raises :class:`~msgcli.errors.DatasetMissing` saying what is expected where: one
    ``error:`` line. ``check(cfg)``, if given, does the same from file tests alone, so that a sweep stops
    before its first run.
    """

    def builder(cfg: RunConfig, progress: bool, splits: tuple[str, ...]) -> DataBundle:
        built = build(cfg)
        if isinstance(built, EventFiles):
            return files_bundle(name, built, cfg, progress, splits)
        if isinstance(built, DataBundle):
            return built
        raise UserError(f"dataset {name}: its build function returned {type(built).__name__}; "
                        "expected EventFiles or DataBundle (msgcli.data)")

    register(name, builder, check)
