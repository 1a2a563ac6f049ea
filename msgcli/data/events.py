"""Real event-camera datasets read by tonic's own classes and readers, never downloaded.

msgsnn checks the layout tonic expects under ``<root>`` before it builds anything,
and builds tonic's objects with ``download`` disabled, so a missing or partial
dataset stops with :class:`DatasetMissing` instead of a download attempt. Samples
are ordered by file path (tonic's listing order depends on the filesystem).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tonic

from msgcli.config import RunConfig

from .clips import EventSplit, event_bundle, frame_spec
from msgcli.errors import BadSample, DatasetMissing

from .registry import SPLITS, DataBundle, register, resolve_root
from .split import split_per_class


@dataclass(frozen=True)
class Part:
    """One archive of a dataset and the folder tonic extracts it to (relative to the dataset folder)."""

    archive: str
    folder: str
    tonic_args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class TonicDataset:
    """How one tonic dataset lies on disk and how msgsnn frames it.

    ``parts`` maps ``train``/``test`` to their archive for datasets with an official
    split, or ``all`` to the single archive split per class by ``data.train_fraction``.
    ``classes`` is ``None`` when the labels are class-folder names (N-Caltech101).
    """

    name: str
    tonic_class: type
    parts: dict[str, Part]
    suffix: str
    extracted: str
    sensor_size: tuple[int, int, int]
    url: str
    classes: tuple[str, ...] | None
    fit_extent: bool = False

    @property
    def folder(self) -> str:
        return self.tonic_class.__name__

    def layout(self) -> str:
        """The expected files, relative to the root, in words."""
        archives = " and ".join(f"{self.folder}/{part.archive}" for part in self.parts.values())
        return f"{archives} with the extracted {self.folder}/{self.extracted}"

    def missing(self, root: Path, problem: str) -> DatasetMissing:
        return DatasetMissing(
            f"{self.name}: {problem}; expected under {root}: {self.layout()}; "
            f"get it from {self.url} and extract it there (msgsnn never downloads)"
        )


SOURCES = [
    TonicDataset(
        "cifar10dvs",
        tonic.datasets.CIFAR10DVS,
        {"all": Part("CIFAR10DVS.zip", "")},
        ".aedat4",
        "<class>/*.aedat4 (airplane ... truck)",
        tonic.datasets.CIFAR10DVS.sensor_size,
        tonic.datasets.CIFAR10DVS.url,
        tuple(tonic.datasets.CIFAR10DVS.classes),
    ),
    TonicDataset(
        "ncaltech101",
        tonic.datasets.NCALTECH101,
        {"all": Part("N-Caltech101-archive.zip", "Caltech101")},
        ".bin",
        "Caltech101/<class>/*.bin",
        (304, 240, 2),  # the ATIS sensor; each recording is framed at its own extent, as the release
        tonic.datasets.NCALTECH101.url,
        None,
        fit_extent=True,
    ),
    TonicDataset(
        "dvsgesture",
        tonic.datasets.DVSGesture,
        {
            "train": Part("ibmGestureTrain.tar.gz", "ibmGestureTrain", (("train", True),)),
            "test": Part("ibmGestureTest.tar.gz", "ibmGestureTest", (("train", False),)),
        },
        ".npy",
        "ibmGesture{Train,Test}/user<NN>_<lighting>/<label>.npy (tonic's preprocessed release)",
        tonic.datasets.DVSGesture.sensor_size,
        f"{tonic.datasets.DVSGesture.train_url} and {tonic.datasets.DVSGesture.test_url}",
        tuple(tonic.datasets.DVSGesture.classes),
    ),
    TonicDataset(
        "nmnist",
        tonic.datasets.NMNIST,
        {
            "train": Part("train.zip", "Train", (("train", True),)),
            "test": Part("test.zip", "Test", (("train", False),)),
        },
        ".bin",
        "{Train,Test}/<digit>/*.bin",
        tonic.datasets.NMNIST.sensor_size,
        f"{tonic.datasets.NMNIST.train_url} and {tonic.datasets.NMNIST.test_url}",
        tuple(tonic.datasets.NMNIST.classes),
    ),
]


class TonicRecordings:
    """The recordings of a tonic dataset object at ``indices``, read by tonic's own reader."""

    def __init__(self, dataset: tonic.Dataset, indices: np.ndarray):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, index: int) -> str:
        return self.dataset.data[self.indices[index]]

    def read(self, index: int) -> np.ndarray:
        path = self.name(index)
        if os.path.getsize(path) == 0:
            raise BadSample(f"{path}: empty file")
        events, _ = self.dataset[int(self.indices[index])]
        return events


def check_tonic(source: TonicDataset, cfg: RunConfig) -> None:
    """Raise :class:`DatasetMissing` unless every archive and some extracted files are present."""
    root = resolve_root(cfg.data.root)
    base = root / source.folder
    for part in source.parts.values():
        if not (base / part.archive).is_file():
            raise source.missing(root, f"{base / part.archive} not found")
        if next((base / part.folder).glob(f"**/*{source.suffix}"), None) is None:
            raise source.missing(root, f"no *{source.suffix} files under {base / part.folder}")


def open_offline(source: TonicDataset, root: Path, part: Part) -> tonic.Dataset:
    """tonic's dataset object for ``part``, built with its ``download`` turned into DatasetMissing.

    tonic downloads when it finds fewer files than the full dataset has; after
    :func:`check_tonic` that only happens for a partly extracted archive.
    """
    dataset = source.tonic_class.__new__(source.tonic_class)

    def refuse() -> None:
        found = sum(1 for _ in (root / source.folder / part.folder).glob(f"**/*{source.suffix}"))
        raise source.missing(root, f"tonic finds only {found} *{source.suffix} files (a partly extracted archive?)")

    dataset.download = refuse
    dataset.__init__(save_to=str(root), **dict(part.tonic_args))
    del dataset.download
    return dataset


def fingerprint(paths: list[str], root: Path) -> dict[str, Any]:
    """Identifies the recordings for the cache key (path, size and modification time of each), so changed data is re-read.

    The modification time catches a recording rewritten with other events of the same
    size; hashing the contents would mean reading the whole dataset on every run.
    """
    stats = [os.stat(p) for p in paths]
    listing = "\n".join(f"{os.path.relpath(p, root)}:{s.st_size}:{s.st_mtime_ns}" for p, s in zip(paths, stats))
    return {"root": str(root.resolve()), "files": len(paths), "digest": hashlib.sha256(listing.encode()).hexdigest()}


def _event_split(dataset: tonic.Dataset, indices: np.ndarray, labels: np.ndarray, root: Path) -> EventSplit:
    paths = [dataset.data[i] for i in indices]
    return EventSplit(lambda: TonicRecordings(dataset, indices), labels[indices], fingerprint(paths, root))


def build_tonic(source: TonicDataset, cfg: RunConfig, progress: bool, wanted: tuple[str, ...] = SPLITS) -> DataBundle:
    """Check the layout, list the files through tonic, split them and render the frames."""
    root = resolve_root(cfg.data.root)
    check_tonic(source, cfg)
    datasets = {split: open_offline(source, root, part) for split, part in source.parts.items()}
    if source.classes is None:
        classes = sorted({str(t) for d in datasets.values() for t in d.targets})
    else:
        classes = list(source.classes)
    label_of = {name: index for index, name in enumerate(classes)}
    splits: dict[str, EventSplit] = {}
    for split, dataset in datasets.items():
        # tonic's targets are class indices, except N-Caltech101's class names
        labels = np.array([label_of[t] if isinstance(t, str) else int(t) for t in dataset.targets], dtype=np.int64)
        if split == "all":
            train, test = split_per_class(dataset.data, labels, cfg.data.train_fraction)
            splits = {"train": _event_split(dataset, train, labels, root), "test": _event_split(dataset, test, labels, root)}
        else:
            in_path_order = np.array(sorted(range(len(dataset.data)), key=dataset.data.__getitem__), dtype=np.int64)
            splits[split] = _event_split(dataset, in_path_order, labels, root)
    return event_bundle(cfg, classes, frame_spec(cfg, source.sensor_size, source.fit_extent), splits, progress, wanted)


for _source in SOURCES:
    register(_source.name, functools.partial(build_tonic, _source), functools.partial(check_tonic, _source))
