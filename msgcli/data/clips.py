"""The event pipeline shared by every event dataset: render -> cache -> dataset of clips -> augment.

Real recordings (tonic), the digits emulator and the synthetic set all hand their
recordings to :func:`event_bundle`, so they are framed, cached and augmented alike.
A new event dataset does the same: ``frame_spec(cfg, sensor_size)``, one
:class:`EventSplit` per split, then :func:`event_bundle`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from msgcli.config import DataConfig, RunConfig

from .augment import ClipAugment, clip_augment
from .cache import CLIP_DTYPE, Clips, build_clips, load_clips, open_frames
from .frames import FRAME_FORMAT_VERSION, FrameSpec, Recordings, render
from msgcli.errors import BadSample

from .registry import SPLITS, DataBundle, DatasetInfo, resolve_root, resolve_workers

log = logging.getLogger(__name__)


class FrameClips(Dataset):
    """``(clip float32 [T, P, size, size], label)`` pairs from rendered clips, augmented if asked.

    Cached frames are memory-mapped, and re-mapped (not copied) in each worker process.
    """

    def __init__(self, clips: Clips, augment: ClipAugment | None = None):
        self._frames: np.ndarray | None = clips.frames
        self._path = clips.path
        self.targets = clips.labels
        self.augment = augment

    @property
    def frames(self) -> np.ndarray:
        if self._frames is None:
            self._frames = open_frames(self._path)
        return self._frames

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_frames"] = None
        return state

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        clip = np.array(self.frames[index], dtype=np.float32)  # a copy: the mapped file is read-only
        if self.augment is not None:
            clip = self.augment(clip)
        return torch.from_numpy(np.ascontiguousarray(clip)), int(self.targets[index])


@dataclass
class EventSplit:
    """One split before rendering: how to open its recordings, their labels ``[N]``, what identifies them.

    ``open_recordings`` is only called when the split is not cached (generating events
    costs time). ``source`` (JSON-serialisable) goes into the cache key: a digest of
    the file list for real data, the emulator's parameters for generated data.
    """

    open_recordings: Callable[[], Recordings]
    labels: np.ndarray
    source: dict[str, Any]


def cache_dir(data: DataConfig) -> Path:
    """``data.cache_dir``, else ``$MSGSNN_CACHE``, else ``<root>/.msgsnn-cache``."""
    chosen = data.cache_dir or os.environ.get("MSGSNN_CACHE")
    return Path(chosen).expanduser() if chosen else resolve_root(data.root) / ".msgsnn-cache"


def frame_spec(cfg: RunConfig, sensor_size: tuple[int, int, int], fit_extent: bool = False) -> FrameSpec:
    """The run's framing (``T``, ``data.size``, ``data.frame_tail``) for recordings from a ``(W, H, P)`` sensor."""
    return FrameSpec(cfg.T, cfg.data.size, tuple(sensor_size), fit_extent, cfg.data.frame_tail)


def _split_clips(
    name: str, split: str, part: EventSplit, spec: FrameSpec, data: DataConfig, directory: Path | None, progress: bool
) -> Clips:
    """Load one split's clips from the cache, or render them (into the cache when there is one)."""
    params = {
        "dataset": name,
        "split": split,
        "format": FRAME_FORMAT_VERSION,
        "T": spec.T,
        "size": spec.size,
        "sensor_size": list(spec.sensor_size),
        "fit_extent": spec.fit_extent,
        "tail": spec.tail,
        "train_fraction": data.train_fraction,
        "source": part.source,
    }
    clips = load_clips(directory, params) if directory is not None else None
    if clips is not None:
        if clips.skipped and not data.skip_bad_samples:
            raise BadSample(f"{clips.skipped[0]} (found when the frame cache was built)")
        return clips

    def fill(out: np.ndarray) -> tuple[np.ndarray, list[str]]:
        workers = resolve_workers(data.num_workers) if directory is not None else 0  # in-memory sets are too small to share out
        recordings = part.open_recordings()
        kept, skipped = render(recordings, spec, out, data.skip_bad_samples, workers, progress, f"{name} {split} frames")
        return part.labels[kept], skipped

    shape = (len(part.labels), spec.T, spec.sensor_size[2], spec.size, spec.size)
    if directory is not None:
        return build_clips(directory, params, shape, fill)
    out = np.empty(shape, dtype=CLIP_DTYPE)
    labels, skipped = fill(out)
    return Clips(out[: len(labels)], labels, skipped)


def event_bundle(
    cfg: RunConfig,
    classes: list[str],
    spec: FrameSpec,
    splits: dict[str, EventSplit],
    progress: bool,
    wanted: tuple[str, ...] = SPLITS,
    cached: bool = True,
) -> DataBundle:
    """Render (or load) the ``train`` and ``test`` splits that are ``wanted`` and wrap them as datasets.

    Only the train split is augmented. ``cached=False`` keeps the clips in memory
    (for tiny generated sets that are faster to make than to read).
    """
    name = cfg.data.name
    directory = cache_dir(cfg.data) if cached else None
    clips = {split: _split_clips(name, split, part, spec, cfg.data, directory, progress)
             for split, part in splits.items() if split in wanted}
    skipped = sum(len(c.skipped) for c in clips.values())
    if skipped:
        log.warning("%s: %d bad recordings skipped (data.skip_bad_samples)", name, skipped)
    channels = spec.sensor_size[2]
    info = DatasetInfo(
        name=name,
        kind="events",
        classes=classes,
        in_channels=channels,
        sensor_size=spec.sensor_size,
        input_shape=(spec.T, channels, spec.size, spec.size),
        n_train=len(clips["train"].labels) if "train" in clips else None,
        n_test=len(clips["test"].labels) if "test" in clips else None,
        skipped=skipped,
    )
    if "train" not in clips:
        return DataBundle(None, FrameClips(clips["test"]) if "test" in clips else None, info)
    return DataBundle(FrameClips(clips["train"], clip_augment(cfg.data.augment)),
                      FrameClips(clips["test"]) if "test" in clips else None, info, train_plain=FrameClips(clips["train"]))
