"""Rendered clips kept on disk under a key made of every parameter that changes them.

One split is two files in the cache directory, named ``<dataset>-<split>-T<T>-s<size>-<hash>``:
``.npy`` holds the clips as float32 ``[N, T, P, size, size]`` (memory-mapped when read,
so workers share the page cache) and ``.json`` the labels, the skipped recordings and
the parameters hashed into the name. float32 after the resize keeps the clips exactly
as rendered (the release's numbers); tonic's counts before it would take 7x the disk
for DVS-CIFAR10 at 48x48 and cannot share one array when every recording has its own
extent (N-Caltech101). Both are written to a temporary file and renamed,
so a crash never leaves a half-written cache that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# The dtype of stored clips; a file of another dtype (an older msgsnn's float16) is rebuilt.
CLIP_DTYPE = np.float32


@dataclass
class Clips:
    """One split's clips ``[N, T, P, size, size]``, labels ``[N]`` and skipped recordings.

    ``path`` is the ``.npy`` file the frames are memory-mapped from (``None`` in memory).
    """

    frames: np.ndarray
    labels: np.ndarray
    skipped: list[str] = field(default_factory=list)
    path: Path | None = None


def cache_stem(params: dict[str, Any]) -> str:
    """Readable file stem ending in a hash of all ``params`` (which must be JSON-serialisable)."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return f"{params['dataset']}-{params['split']}-T{params['T']}-s{params['size']}-{digest}"


def _paths(directory: Path, params: dict[str, Any]) -> tuple[Path, Path]:
    """The ``.npy`` clips and ``.json`` metadata files of one cached split."""
    stem = cache_stem(params)
    return directory / f"{stem}.npy", directory / f"{stem}.json"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def open_frames(path: Path) -> np.ndarray:
    """Memory-map a cached ``.npy`` of clips (read-only)."""
    return np.load(path, mmap_mode="r")


def load_clips(directory: Path, params: dict[str, Any]) -> Clips | None:
    """The cached clips for ``params``, or ``None`` when absent or unreadable (with a warning)."""
    frames_path, meta_path = _paths(directory, params)
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        frames = open_frames(frames_path)
        labels = np.asarray(meta["labels"], dtype=np.int64)
        if meta["params"] != params:
            raise ValueError("it was written for other parameters")
        if frames.dtype != CLIP_DTYPE or frames.shape[0] != len(labels):
            raise ValueError(f"it holds {frames.shape[0]} {frames.dtype} clips for {len(labels)} labels")
        return Clips(frames, labels, list(meta["skipped"]), frames_path)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("frame cache %s is unreadable (%s); rebuilding it", frames_path, err)
        return None


def build_clips(
    directory: Path,
    params: dict[str, Any],
    shape: tuple[int, ...],
    render: Callable[[np.ndarray], tuple[np.ndarray, list[str]]],
) -> Clips:
    """Render a split straight into a memory-mapped file, then publish it atomically.

    ``render(out)`` fills ``out[:kept]`` (``out`` is float32 ``shape``, one row a
    recording) and returns the kept clips' labels and the skipped recordings' messages.
    """
    directory.mkdir(parents=True, exist_ok=True)
    frames_path, meta_path = _paths(directory, params)
    compact_path = frames_path.with_name(frames_path.name + ".compact")
    tmp_frames, tmp_compact, tmp_meta = (_temporary(p) for p in (frames_path, compact_path, meta_path))
    try:
        out = np.lib.format.open_memmap(tmp_frames, mode="w+", dtype=CLIP_DTYPE, shape=shape)
        labels, skipped = render(out)
        out.flush()
        if len(labels) < shape[0]:
            with open(tmp_compact, "wb") as fh:
                np.save(fh, out[: len(labels)])
            os.replace(tmp_compact, tmp_frames)
        del out
        os.replace(tmp_frames, frames_path)
        tmp_meta.write_text(json.dumps({"params": params, "labels": labels.tolist(), "skipped": skipped}))
        os.replace(tmp_meta, meta_path)
    finally:
        for tmp in (tmp_frames, tmp_compact, tmp_meta):
            tmp.unlink(missing_ok=True)
    return Clips(open_frames(frames_path), labels, skipped, frames_path)
