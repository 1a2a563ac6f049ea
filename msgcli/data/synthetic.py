"""``synthetic``: tiny generated event clips for tests, learnable and identical on every run.

Class ``c`` (of 4) is a cloud of events around a point in quadrant ``c`` of a
``size`` x ``size`` sensor that drifts during the recording, plus uniform noise
events. The clips go through the same framing as real data but stay in memory.
"""

from __future__ import annotations

import numpy as np
from tonic.io import events_struct

from msgcli.config import RunConfig

from .clips import EventSplit, event_bundle, frame_spec
from .frames import EventList
from .registry import SPLITS, DataBundle, register
from .split import split_per_class

CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]
PER_CLASS = 32
EVENTS = 400
NOISE_EVENTS = 50
DURATION_US = 100_000
SEED = 0


def synthetic_recordings(size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """``PER_CLASS`` recordings a class on a ``size`` x ``size`` sensor, and their labels."""
    rng = np.random.default_rng(SEED)
    labels = np.repeat(np.arange(len(CLASSES)), PER_CLASS)
    recordings = []
    for label in labels:
        row, col = divmod(int(label), 2)
        start = (np.array([col, row]) + 0.25 + 0.5 * rng.random(2)) * size / 2
        drift = rng.normal(0, size / 16, 2)
        t = np.sort(rng.integers(0, DURATION_US, EVENTS + NOISE_EVENTS))
        centre = start + np.outer(t / DURATION_US, drift)
        xy = centre + rng.normal(0, size / 16, (len(t), 2))
        xy[rng.choice(len(t), NOISE_EVENTS, replace=False)] = rng.uniform(0, size, (NOISE_EVENTS, 2))
        events = np.empty(len(t), dtype=events_struct)
        events["x"], events["y"] = np.clip(xy, 0, size - 1).astype(np.int16).T
        events["t"], events["p"] = t, rng.random(len(t)) < 0.5
        recordings.append(events)
    return recordings, labels


def build_synthetic(cfg: RunConfig, progress: bool = False, splits: tuple[str, ...] = SPLITS) -> DataBundle:
    size = cfg.data.size
    recordings, labels = synthetic_recordings(size)
    train, test = split_per_class([f"{i:04d}" for i in range(len(labels))], labels, cfg.data.train_fraction)
    source = {"generator": "synthetic", "seed": SEED}

    def split(indices: np.ndarray) -> EventSplit:
        return EventSplit(lambda: EventList(recordings, indices, "synthetic"), labels[indices], source)

    spec = frame_spec(cfg, (size, size, 2))
    return event_bundle(cfg, CLASSES, spec, {"train": split(train), "test": split(test)}, progress, splits, cached=False)


register("synthetic", build_synthetic)
