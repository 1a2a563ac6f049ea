"""Datasets with no code: a folder of event recordings (``event-folder``) or of images (``image-folder``).

``--data-root`` names the folder itself. Either ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``,
or only ``<root>/<class>/*``, split per class by ``data.train_fraction`` (the first files by path train).
Event files: ``.npy`` (a structured array with fields x, y, t, p, as tonic stores events), ``.npz``
(arrays x, y, t, p), ``.aedat4`` and ``.h5``/``.hdf5`` (datasets x, y, t, p, at the top or in a group
``events``, or one table ``events`` with those fields). Images: whatever torchvision's ``ImageFolder``
reads (png, jpg, ...), resized to ``data.size`` and encoded directly, as CIFAR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from msgcli.config import RunConfig
from msgcli.errors import BadSample, ConfigError, DatasetMissing

from .custom import EventFiles, register_dataset
from .images import IMAGENET_MEAN_STD, torchvision, train_transform
from .registry import SPLITS, DataBundle, DatasetInfo, LabelledSubset, register, resolve_root
from .split import split_per_class

log = logging.getLogger(__name__)

FIELDS = ("x", "y", "t", "p")
EVENTS = np.dtype([("x", "<i4"), ("y", "<i4"), ("t", "<i8"), ("p", "<i1")])


def _events(path: str, columns: dict[str, np.ndarray], what: str) -> np.ndarray:
    """A structured array of ``columns`` x, y, t, p; polarities -1/1 are read as 0/1."""
    missing = [f for f in FIELDS if f not in columns]
    if missing:
        raise BadSample(f"{path}: {what} has no {', '.join(missing)}; expected fields x, y, t, p")
    lengths = {len(np.asarray(columns[f]).reshape(-1)) for f in FIELDS}
    if len(lengths) != 1:
        raise BadSample(f"{path}: the fields x, y, t, p have different lengths")
    events = np.empty(lengths.pop(), dtype=EVENTS)
    for f in FIELDS:
        events[f] = np.asarray(columns[f]).reshape(-1)
    if len(events) and events["p"].min() == -1 and events["p"].max() <= 1:
        events["p"] = events["p"] > 0
    return events


def read_npy(path: str) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if array.dtype.names is None:
        raise BadSample(f"{path}: a {array.dtype} array of shape {array.shape}; expected a structured array with "
                        "fields x, y, t, p (as tonic stores events)")
    return _events(path, {f: array[f] for f in array.dtype.names}, "its structured array")


def read_npz(path: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as arrays:
        return _events(path, {f: arrays[f] for f in arrays.files}, "the archive")


def read_aedat4(path: str) -> np.ndarray:
    from tonic.io import read_aedat4 as tonic_read_aedat4

    events = tonic_read_aedat4(path)
    return _events(path, {"t": events["t"], "x": events["x"], "y": events["y"], "p": events["on"]}, "its event stream")


def read_hdf5(path: str) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as fh:
        table = fh.get("events")
        if isinstance(table, h5py.Dataset) and table.dtype.names:
            return _events(path, {f: table[f] for f in table.dtype.names}, "its table 'events'")
        group = table if isinstance(table, h5py.Group) else fh
        return _events(path, {f: group[f][()] for f in FIELDS if isinstance(group.get(f), h5py.Dataset)},
                       "group 'events'" if group is table else "the file")


READERS: dict[str, Callable[[str], np.ndarray]] = {
    ".npy": read_npy, ".npz": read_npz, ".aedat4": read_aedat4, ".h5": read_hdf5, ".hdf5": read_hdf5,
}


def read_events(path: str) -> np.ndarray:
    """The events of one file, read by its suffix."""
    return READERS[Path(path).suffix.lower()](path)


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def folder_layout(name: str, cfg: RunConfig, expected: str) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """The classes and ``(file, label)`` pairs of ``train``/``test`` (or ``all``, to be split) under ``--data-root``."""
    root = resolve_root(cfg.data.root)
    layout = (f"--data-root names the folder itself, holding <class>/{expected} or train/<class>/{expected} and "
              f"test/<class>/{expected}")
    if not root.is_dir():
        raise DatasetMissing(f"{name}: {root} not found; {layout}")
    parts = {"train": root / "train", "test": root / "test"}
    if not all(p.is_dir() for p in parts.values()):
        parts = {"all": root}
    class_folders = {split: [p for p in _visible(folder) if p.is_dir()] for split, folder in parts.items()}
    classes = sorted({p.name for folders in class_folders.values() for p in folders})
    if not classes:
        raise DatasetMissing(f"{name}: no class folders in {root}; {layout}")
    label = {c: i for i, c in enumerate(classes)}
    files = {split: [(f, label[folder.name]) for folder in folders for f in _visible(folder) if f.is_file()]
             for split, folders in class_folders.items()}
    for split, pairs in files.items():
        if not pairs:
            raise DatasetMissing(f"{name}: no files in the class folders of {parts[split]}; {layout}")
    return classes, files


def split_files(pairs: list[tuple[Path, int]], fraction: float) -> tuple[list, list]:
    keys = [str(path) for path, _ in pairs]
    train, test = split_per_class(keys, [label for _, label in pairs], fraction)
    return [pairs[i] for i in train], [pairs[i] for i in test]


def check_event_folder(cfg: RunConfig) -> None:
    folder_layout("event-folder", cfg, "*.npy|npz|aedat4|h5")


def event_folder_files(cfg: RunConfig) -> EventFiles:
    """The event folder's recordings; a file of another format stops with its name, or is left out with a warning
    under ``data.skip_bad_samples``."""
    classes, files = folder_layout("event-folder", cfg, "*.npy|npz|aedat4|h5")
    for split, pairs in files.items():
        foreign = [path for path, _ in pairs if path.suffix.lower() not in READERS]
        if foreign and not cfg.data.skip_bad_samples:
            raise BadSample(f"{foreign[0]}: not an event file (msgsnn reads {', '.join(READERS)}); remove it, "
                            f"or pass --skip-bad-samples to leave such files out ({len(foreign)} in all)")
        for path in foreign:
            log.warning("skipping %s: not an event file", path)
        files[split] = [(path, label) for path, label in pairs if path.suffix.lower() in READERS]
    if "all" not in files:
        return EventFiles(classes, files["train"], files["test"], read_events)
    train, test = split_files(files["all"], cfg.data.train_fraction)
    if not (train and test):
        raise ConfigError(f"data.train_fraction: {cfg.data.train_fraction} of the {len(files['all'])} recordings in "
                          f"{resolve_root(cfg.data.root)} leaves no {'test' if train else 'training'} recording")
    return EventFiles(classes, train, test, read_events)


def check_image_folder(cfg: RunConfig) -> None:
    folder_layout("image-folder", cfg, "*.png|jpg")


def build_image_folder(cfg: RunConfig, progress: bool = False, splits: tuple[str, ...] = SPLITS) -> DataBundle:
    """Images resized to ``data.size`` and normalised with ImageNet's mean and std; training adds crop (with
    padding), flip and Cutout as ``data.augment`` says (AutoAugment and ColorJitter off unless asked). The
    folders are listed whole (nothing is rendered); a split not in ``splits`` is left out."""
    augment, size = cfg.data.augment, cfg.data.size
    if augment.normalize != "release":
        raise ConfigError("data.augment.normalize: image-folder normalises with ImageNet's mean and std; "
                          "'measured' applies to CIFAR only")
    classes, files = folder_layout("image-folder", cfg, "*.png|jpg")
    tv, image_folder = torchvision().transforms, torchvision().datasets.ImageFolder
    resize = tv.Resize((size, size))
    geometry = [resize] + ([tv.RandomCrop(size, padding=augment.crop_padding)] if augment.crop else [])
    train_tf = train_transform(augment, geometry, *IMAGENET_MEAN_STD)
    test_tf = tv.Compose([resize, tv.ToTensor(), tv.Normalize(*IMAGENET_MEAN_STD)])
    root = resolve_root(cfg.data.root)

    def folder(path: Path, transform):
        try:
            return image_folder(str(path), transform=transform)
        except (FileNotFoundError, OSError) as err:
            raise DatasetMissing(f"image-folder: {err}") from None

    if "all" in files:
        every, plain, test_view = folder(root, train_tf), folder(root, test_tf), folder(root, test_tf)
        train_idx, test_idx = split_per_class([p for p, _ in every.samples], every.targets, cfg.data.train_fraction)
        train, train_plain, test = (LabelledSubset(every, train_idx), LabelledSubset(plain, train_idx),
                                    LabelledSubset(test_view, test_idx))
        names = every.classes
    else:
        train, train_plain, test = folder(root / "train", train_tf), folder(root / "train", test_tf), folder(root / "test", test_tf)
        if test.classes != train.classes:
            raise DatasetMissing(f"image-folder: {root}/train and {root}/test hold different class folders "
                                 f"({', '.join(train.classes)} / {', '.join(test.classes)})")
        names = train.classes
    info = DatasetInfo("image-folder", "images", list(names), 3, (size, size, 3), (3, size, size), len(train), len(test))
    if "train" not in splits:
        train = train_plain = None
    return DataBundle(train, test if "test" in splits else None, info, train_plain=train_plain)


register_dataset("event-folder", event_folder_files, check_event_folder)  # the contract a plugin's dataset uses
register("image-folder", build_image_folder, check_image_folder)
