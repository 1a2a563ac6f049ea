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
import logging
from dataclasses import asdict, dataclass

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


def build_digits(variant: DigitsVariant, cfg: RunConfig, progress: bool, splits: tuple[str, ...] = SPLITS) -> DataBundle:
    """Split the digits per class in index order, emulate the recordings only if not cached."""
    from sklearn.datasets import load_digits  # slow to import, and only needed here

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    keys = [f"{index:04d}" for index in range(len(labels))]
    train, test = split_per_class(keys, labels, cfg.data.train_fraction)
    if variant.train_share < 1:
        kept, _ = split_per_class([keys[i] for i in train], labels[train], variant.train_share)
        train = train[kept]

    @functools.cache
    def record_all() -> list[np.ndarray]:
        log.info("%s: recording %d digits with the emulated DVS", variant.name, len(labels))
        return variant.sensor.record(digits.images / 16.0)

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
