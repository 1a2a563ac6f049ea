"""Static image datasets (CIFAR10/100, ImageNet) through torchvision, never downloaded.

Samples are ``(image float32 [C, H, W], label)``; the model repeats an image over T
(direct encoding). Training pipelines follow the release by default, each part switchable
(``data.augment``): CIFAR RandomCrop(32, pad 4) + flip + its CIFAR10 AutoAugment policy +
Cutout(16) on the [0, 1] image + Normalize with its constants; ImageNet RandomResizedCrop(224)
+ flip + ColorJitter(0.2, 0.2, 0.2, 0.1) + Cutout(16) + Normalize.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from msgcli.config import AugmentConfig, RunConfig

from .cifar_policy import ReleaseCIFAR10Policy
from msgcli.errors import DatasetMissing

from .registry import SPLITS, DataBundle, DatasetInfo, register, resolve_root

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RELEASE_COLOR_JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)


def torchvision():
    """torchvision, imported on first use: importing it loads torch._dynamo and triton (about 3 s of every
    command's start here), which event datasets never need."""
    import torchvision

    return torchvision


class Cutout:
    """Zero one ``length`` x ``length`` square at a random centre of a ``[C, H, W]`` tensor (clipped at the border)."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        cy, cx = torch.randint(0, height, ()).item(), torch.randint(0, width, ()).item()
        half = self.length // 2
        image = image.clone()
        image[..., max(cy - half, 0) : cy + half, max(cx - half, 0) : cx + half] = 0
        return image

    def __repr__(self) -> str:
        return f"Cutout(length={self.length})"


def train_transform(augment: AugmentConfig, geometry: list[Callable], mean: tuple, std: tuple,
                    policy: Callable | None = None) -> Callable:
    """``geometry`` (crop), flip, ColorJitter and ``policy`` on the PIL image, then to a tensor with
    Cutout before Normalize (``cutout_fill: black``: a black patch, the release) or after it
    (``mean``: a patch at the dataset's mean colour)."""
    tv = torchvision().transforms
    steps = list(geometry)
    if augment.flip:
        steps.append(tv.RandomHorizontalFlip())
    if augment.color_jitter:
        steps.append(tv.ColorJitter(**RELEASE_COLOR_JITTER))
    if policy is not None:
        steps.append(policy)
    steps.append(tv.ToTensor())
    cutout = [Cutout(augment.cutout)] if augment.cutout else []
    normalise = [tv.Normalize(mean, std)]
    steps += cutout + normalise if augment.cutout_fill == "black" else normalise + cutout
    return tv.Compose(steps)


def cifar_policy(augment: AugmentConfig) -> Callable | None:
    """The configured CIFAR10 AutoAugment policy: the release's own, or torchvision's."""
    tv = torchvision().transforms
    if not augment.autoaugment:
        return None
    if augment.autoaugment_policy == "release":
        return ReleaseCIFAR10Policy()
    return tv.AutoAugment(tv.AutoAugmentPolicy.CIFAR10)


def cifar_transforms(augment: AugmentConfig, mean: tuple, std: tuple) -> tuple[Callable, Callable]:
    """Train: RandomCrop(32, pad) + flip + AutoAugment + Cutout + normalise; test: normalise."""
    tv = torchvision().transforms
    crop = [tv.RandomCrop(32, padding=augment.crop_padding)] if augment.crop else []
    test = tv.Compose([tv.ToTensor(), tv.Normalize(mean, std)])
    return train_transform(augment, crop, mean, std, cifar_policy(augment)), test


def imagenet_transforms(augment: AugmentConfig) -> tuple[Callable, Callable]:
    """Train: RandomResizedCrop(224) + flip + ColorJitter + Cutout + normalise; test: Resize(256) + CenterCrop(224) + normalise."""
    tv = torchvision().transforms
    normalise = [tv.ToTensor(), tv.Normalize(*IMAGENET_MEAN_STD)]
    train = train_transform(augment, [tv.RandomResizedCrop(224)], *IMAGENET_MEAN_STD)
    return train, tv.Compose([tv.Resize(256), tv.CenterCrop(224)] + normalise)


@dataclass(frozen=True)
class CifarSource:
    """A CIFAR dataset and its normalisation constants: ``release`` (the authors' code) and
    ``measured`` (per-channel mean and std of the training set's pixels), each ``(mean, std)``."""

    name: str
    torchvision_name: str  # the class in torchvision.datasets
    normalize: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]]

    @property
    def torchvision_class(self) -> type:
        return getattr(torchvision().datasets, self.torchvision_name)

    def files(self) -> list[str]:
        cls = self.torchvision_class
        return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


CIFARS = [
    CifarSource("cifar10", "CIFAR10", {
        "release": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        "measured": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    }),
    CifarSource("cifar100", "CIFAR100", {
        "release": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
        "measured": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }),
]


def _length(split: Dataset | None) -> int | None:
    return None if split is None else len(split)


def _image_info(name: str, classes: list[str], image_size: int, sensor_size, n_train: int, n_test: int) -> DatasetInfo:
    return DatasetInfo(name, "images", classes, 3, sensor_size, (3, image_size, image_size), n_train, n_test)


def _cifar_expected(source: CifarSource, cfg: RunConfig) -> tuple[Path, Path, str]:
    root = resolve_root(cfg.data.root)
    folder = root / source.torchvision_class.base_folder
    return root, folder, f"{folder} holding {', '.join(source.files())} (torchvision's python version)"


def check_cifar(source: CifarSource, cfg: RunConfig) -> None:
    """Raise :class:`DatasetMissing` unless every pickled batch is in place."""
    root, folder, expected = _cifar_expected(source, cfg)
    absent = [name for name in source.files() if not (folder / name).is_file()]
    if absent:
        raise DatasetMissing(
            f"{source.name}: {folder / absent[0]} not found; expected {expected}; "
            f"get it from {source.torchvision_class.url} and extract it under {root} (msgsnn never downloads)"
        )


def build_cifar(source: CifarSource, cfg: RunConfig, progress: bool = False, splits: tuple[str, ...] = SPLITS) -> DataBundle:
    """CIFAR10/100 from torchvision's pickled batches under ``<root>/cifar-10(0)-...``."""
    check_cifar(source, cfg)
    root, folder, expected = _cifar_expected(source, cfg)
    cls = source.torchvision_class
    train_tf, test_tf = cifar_transforms(cfg.data.augment, *source.normalize[cfg.data.augment.normalize])
    try:
        train = cls(str(root), train=True, transform=train_tf, download=False) if "train" in splits else None
        test = cls(str(root), train=False, transform=test_tf, download=False) if "test" in splits else None
    except RuntimeError as err:
        raise DatasetMissing(
            f"{source.name}: torchvision rejects the files in {folder} ({err}); expected {expected}; get it from {cls.url}"
        ) from None
    plain = cls(str(root), train=True, transform=test_tf, download=False) if cfg.data.val_fraction and train else None
    classes = list((train or test).classes)
    return DataBundle(train, test, _image_info(source.name, classes, 32, (32, 32, 3), _length(train), _length(test)),
                      train_plain=plain)


def _imagenet_missing(cfg: RunConfig, problem: str) -> DatasetMissing:
    root = resolve_root(cfg.data.root) / "imagenet"
    return DatasetMissing(
        f"imagenet: {problem}; expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG "
        "(ILSVRC2012 from https://image-net.org, val sorted into class folders)"
    )


def check_imagenet(cfg: RunConfig) -> None:
    """Raise :class:`DatasetMissing` unless both split folders exist."""
    root = resolve_root(cfg.data.root) / "imagenet"
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise _imagenet_missing(cfg, f"{root / split} not found")


def build_imagenet(cfg: RunConfig, progress: bool = False, splits: tuple[str, ...] = SPLITS) -> DataBundle:
    """ImageNet as two torchvision ImageFolders, ``<root>/imagenet/{train,val}/<wnid>/*.JPEG``."""
    check_imagenet(cfg)
    root = resolve_root(cfg.data.root) / "imagenet"
    train_tf, test_tf = imagenet_transforms(cfg.data.augment)
    image_folder = torchvision().datasets.ImageFolder
    try:
        train = image_folder(str(root / "train"), transform=train_tf) if "train" in splits else None
        test = image_folder(str(root / "val"), transform=test_tf) if "test" in splits else None
    except OSError as err:
        raise _imagenet_missing(cfg, str(err)) from None
    plain = image_folder(str(root / "train"), transform=test_tf) if cfg.data.val_fraction and train else None
    classes = list((train or test).classes)
    return DataBundle(train, test, _image_info("imagenet", classes, 224, None, _length(train), _length(test)),
                      train_plain=plain)


for _source in CIFARS:
    register(_source.name, functools.partial(build_cifar, _source), functools.partial(check_cifar, _source))
register("imagenet", build_imagenet, check_imagenet)
