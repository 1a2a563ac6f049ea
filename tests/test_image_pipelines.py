"""The CIFAR and ImageNet training pipelines as the release builds them, and the options that switch each part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tv

from msgcli.config import AugmentConfig
from msgcli.data.cifar_policy import CIFAR10_POLICY, GREY, OPERATIONS, ReleaseCIFAR10Policy
from msgcli.data.images import CIFARS, Cutout, cifar_transforms, imagenet_transforms

CIFAR10_RELEASE_STD = (0.2023, 0.1994, 0.2010)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def bar_image() -> Image.Image:
    """A black 32x32 RGB image with a white horizontal bar through the middle."""
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[15:17, 4:28] = 255
    return Image.fromarray(a)


def test_policy_table_is_the_autoaugment_papers_cifar10_policy():
    """The 25 sub-policies as torchvision lists them, except the equalize-equalize pair, whose second
    probability is 0.8 in the release (0.6 in torchvision); torchvision omits the unused levels of
    level-free operations."""
    names = {"ShearX": "shear_x", "ShearY": "shear_y", "TranslateX": "translate_x", "TranslateY": "translate_y",
             "AutoContrast": "autocontrast"}
    theirs = tv.AutoAugment(tv.AutoAugmentPolicy.CIFAR10).policies
    assert len(CIFAR10_POLICY) == len(theirs) == 25
    differences = []
    for i, (ours, reference) in enumerate(zip(CIFAR10_POLICY, theirs)):
        for (name, p, level), (tv_name, tv_p, tv_level) in zip(ours, reference):
            assert name == names.get(tv_name, tv_name.lower()), i
            assert tv_level is None or level == tv_level, i
            if p != tv_p:
                differences.append((i, name, p, tv_p))
    assert differences == [(16, "equalize", 0.8, 0.6)]


def test_rotate_turns_counter_clockwise_every_time_and_fills_grey():
    rotated = []
    for seed in range(6):
        torch.manual_seed(seed)
        rotated.append(pixels(OPERATIONS["rotate"](bar_image(), 9)))  # level 9: 30 degrees
    assert all(np.array_equal(r, rotated[0]) for r in rotated)  # no random direction
    image = rotated[0]
    assert tuple(image[0, 0]) == tuple(image[31, 31]) == GREY  # uncovered corners
    white_rows, white_cols = np.nonzero(image[..., 0] == 255)
    right = white_cols > 16
    assert white_rows[right].mean() < 15 < white_rows[~right].mean()  # the right end rose: counter-clockwise


def test_translate_fills_grey_in_both_directions():
    image = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    grey_sides = set()
    for seed in range(12):
        torch.manual_seed(seed)
        shifted = pixels(OPERATIONS["translate_x"](image, 9))  # 150/331 of the width: 14.5 pixels
        grey_columns = np.nonzero((shifted == 128).all(axis=(0, 2)))[0]
        assert len(grey_columns) in (14, 15) and (shifted[:, :, 0] != 128).sum() == 32 * (32 - len(grey_columns))
        grey_sides.add("left" if grey_columns[0] == 0 else "right")
    assert grey_sides == {"left", "right"}


def test_solarize_and_posterize_levels():
    ramp = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
    solarized = pixels(OPERATIONS["solarize"](ramp, 2))[0, :, 0]  # threshold 256 * 7 / 9 = 199.1
    assert solarized[199] == 199 and solarized[200] == 55 and solarized[255] == 0
    assert pixels(OPERATIONS["solarize"](ramp, 0))[0, 255, 0] == 255  # level 0: threshold 256, nothing inverted
    posterized = pixels(OPERATIONS["posterize"](ramp, 7))[0, :, 0]  # 8 - 4 * 7 / 9 -> 5 bits kept
    assert posterized[255] == 248 and posterized[7] == 0 and posterized[8] == 8


def test_the_policy_draws_a_sub_policy_and_keeps_the_image_format():
    image = bar_image()
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        out = ReleaseCIFAR10Policy()(image)
        assert out.size == image.size and out.mode == "RGB"
        seen.add(pixels(out).tobytes())
    assert len(seen) > 10


def transform_names(transform) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_cifar_pipeline_is_the_releases_by_default():
    mean, std = CIFARS[0].normalize["release"]
    assert std == CIFAR10_RELEASE_STD and CIFARS[1].normalize["release"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    train, test = cifar_transforms(AugmentConfig(), mean, std)
    assert transform_names(train) == ["RandomCrop", "RandomHorizontalFlip", "ReleaseCIFAR10Policy", "ToTensor", "Cutout", "Normalize"]
    assert transform_names(test) == ["ToTensor", "Normalize"]
    switched = AugmentConfig(autoaugment_policy="torchvision", cutout_fill="mean")
    assert transform_names(cifar_transforms(switched, mean, std)[0]) == [
        "RandomCrop", "RandomHorizontalFlip", "AutoAugment", "ToTensor", "Normalize", "Cutout"]
    assert "AutoAugment" not in transform_names(cifar_transforms(AugmentConfig(autoaugment=False), mean, std)[0])


@pytest.mark.parametrize("fill", ["black", "mean"])
def test_cutout_patch_is_black_before_normalize_or_the_mean_after(fill):
    """The release cuts the [0, 1] image, so its patch is black, (0 - mean) / std after Normalize; cut after
    Normalize, the patch is 0 there: the dataset's mean colour."""
    mean, std = CIFARS[0].normalize["release"]
    augment = AugmentConfig(crop=False, flip=False, autoaugment=False, cutout=16, cutout_fill=fill)
    train, _ = cifar_transforms(augment, mean, std)
    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    torch.manual_seed(0)
    out = train(image)
    untouched = (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    patch = ((out - untouched[:, None, None]).abs() > 1e-4).any(0)
    assert 64 <= patch.sum() <= 256  # one square of side 16, clipped at the border
    expected = -torch.tensor(mean) / torch.tensor(std) if fill == "black" else torch.zeros(3)
    torch.testing.assert_close(out[:, patch], expected[:, None].expand(3, int(patch.sum())))


def test_imagenet_pipeline_has_the_releases_color_jitter_and_cutout():
    augment = AugmentConfig(color_jitter=True, cutout=16, autoaugment=False)
    train, test = imagenet_transforms(augment)
    assert transform_names(train) == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Cutout", "Normalize"]
    jitter = train.transforms[2]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.8, 1.2), (0.8, 1.2), (0.8, 1.2), (-0.1, 0.1))
    assert transform_names(test) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    plain = imagenet_transforms(AugmentConfig(color_jitter=False, cutout=0, autoaugment=False))[0]
    assert transform_names(plain) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]


def test_cutout_square_is_clipped_at_the_border():
    image = torch.ones(3, 32, 32)
    for seed in range(20):
        torch.manual_seed(seed)
        zeros = (Cutout(16)(image) == 0).all(0)
        rows, cols = zeros.any(1).sum().item(), zeros.any(0).sum().item()
        assert 8 <= rows <= 16 and 8 <= cols <= 16 and zeros.sum() == rows * cols
