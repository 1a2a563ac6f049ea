"""``digits-dvs``: scikit-learn's handwritten digits recorded by the emulated DVS, fully offline.

The 1797 8x8 digits that ship with scikit-learn become N-MNIST-like recordings
(:class:`~msgcli.data.emulator.SaccadeDVS`), then take the same frame, cache and
augmentation path as the real event datasets. ``digits-dvs-hard`` keeps 30% of the
training samples and adds background noise and hot pixels, so a plain SNN stays
clearly below the ceiling; its test split holds the same digits as ``digits-dvs``'s.
The recordings are fixed (the emulator's seed is part of the dataset, not of a run).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from msgcli.config import RunConfig

from .clips import EventSplit, event_bundle, frame_spec
from .emulator import EMULATOR_VERSION, SaccadeDVS
from .frames import EventList
from .registry import SPLITS, DataBundle, register
from .split import split_per_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DigitsVariant:
    """A sensor and the share of each class's training samples kept."""

    name: str
    sensor: SaccadeDVS
    train_share: float = 1.0


VARIANTS = [
    DigitsVariant("digits-dvs", SaccadeDVS()),
    DigitsVariant("digits-dvs-hard", SaccadeDVS(noise_hz=4.0, hot_pixels=12, hot_pixel_hz=150.0), train_share=0.3),
]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, ``images [N, 8, 8]`` (float64, 0 to 16) and ``labels`` (int64), equal to what
    ``sklearn.datasets.load_digits`` returns: read from the file scikit-learn ships as it reads it, without
    importing scikit-learn, whose import (scipy's) costs every training process seconds."""
    spec = importlib.util.find_spec("sklearn")
    folders = spec.submodule_search_locations if spec is not None else None
    path = Path(folders[0], "datasets", "data", "digits.csv.gz") if folders else None
    if path is None or not path.is_file():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits as sklearn_load_digits

        digits = sklearn_load_digits()
        return digits.images, digits.target.astype(np.int64)
    with gzip.open(path, mode="rt", encoding="utf-8") as file:
        data = np.loadtxt(file, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def build_digits(variant: DigitsVariant, cfg: RunConfig, progress: bool, splits: tuple[str, ...] = SPLITS) -> DataBundle:
    """Split the digits per class in index order, emulate the recordings only if not cached."""
    images, labels = load_digits()
    keys = [f"{index:04d}" for index in range(len(labels))]
    train, test = split_per_class(keys, labels, cfg.data.train_fraction)
    if variant.train_share < 1:
        kept, _ = split_per_class([keys[i] for i in train], labels[train], variant.train_share)
        train = train[kept]

    @functools.cache
    def record_all() -> list[np.ndarray]:
        log.info("%s: recording %d digits with the emulated DVS", variant.name, len(labels))
        return variant.sensor.record(images / 16.0)

    source = {
        "images": "sklearn.datasets.load_digits",
        "count": len(labels),
        "emulator": EMULATOR_VERSION,
        "sensor": asdict(variant.sensor),
        "train_share": variant.train_share,
    }

    def split(indices: np.ndarray) -> EventSplit:
        return EventSplit(lambda: EventList(record_all(), indices, variant.name), labels[indices], source)

    spec = frame_spec(cfg, variant.sensor.sensor_size)
    return event_bundle(cfg, [str(d) for d in range(10)], spec, {"train": split(train), "test": split(test)}, progress, splits)


for _variant in VARIANTS:
    register(_variant.name, functools.partial(build_digits, _variant))
