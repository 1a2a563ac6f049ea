"""The CIFAR10 AutoAugment policy as the authors' release applies it (not torchvision's).

Both use the 25 sub-policies of the AutoAugment paper's CIFAR10 policy, each two operations
with a probability and a magnitude level 0-9. The release's version changes the images in
ways torchvision's ``AutoAugment(CIFAR10)`` does not:

- pixels that rotate, shear and translate uncover are grey (128, 128, 128), not black;
- rotate always turns counter-clockwise (torchvision draws the direction);
- shear resamples bicubically (torchvision: nearest);
- solarize thresholds run from 256 down to 0 over the levels (torchvision: 255 to 0);
- the equalize-then-equalize sub-policy applies its second equalize with probability 0.8
  (torchvision: 0.6).

Random draws come from torch's generator, which msgsnn seeds per sample.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageEnhance, ImageOps

GREY = (128, 128, 128)
LEVELS = 9  # magnitude levels 0..9 scale each operation's range linearly

# (operation, probability, level) pairs, in the release's order.
CIFAR10_POLICY = (
    (("invert", 0.1, 7), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translate_x", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shear_y", 0.5, 8), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.5, 8), ("equalize", 0.9, 2)),
    (("shear_y", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 5), ("equalize", 0.5, 1)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translate_x", 0.5, 8)),
    (("equalize", 0.3, 7), ("autocontrast", 0.4, 8)),
    (("translate_y", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 3)),
    (("equalize", 0.2, 0), ("autocontrast", 0.6, 0)),
    (("equalize", 0.2, 8), ("equalize", 0.8, 4)),
    (("color", 0.9, 9), ("equalize", 0.6, 6)),
    (("autocontrast", 0.8, 4), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, 3)),
    (("translate_y", 0.9, 9), ("translate_y", 0.7, 9)),
    (("autocontrast", 0.9, 2), ("solarize", 0.8, 3)),
    (("equalize", 0.8, 8), ("invert", 0.1, 3)),
    (("translate_y", 0.7, 9), ("autocontrast", 0.9, 1)),
)


def _scale(maximum: float, level: int) -> float:
    """Level 0..9 of the range [0, maximum], bit for bit the release's ``numpy.linspace(0, maximum, 10)[level]``."""
    return maximum / LEVELS * level


def _sign() -> int:
    return 1 if torch.rand(()).item() < 0.5 else -1


def _affine(image: Image.Image, coefficients: tuple, resample=Image.Resampling.NEAREST) -> Image.Image:
    """``image`` through the affine map (output pixel -> input pixel), uncovered pixels grey."""
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample, fillcolor=GREY)


def _shear_x(image, level):
    return _affine(image, (1, _scale(0.3, level) * _sign(), 0, 0, 1, 0), Image.Resampling.BICUBIC)


def _shear_y(image, level):
    return _affine(image, (1, 0, 0, _scale(0.3, level) * _sign(), 1, 0), Image.Resampling.BICUBIC)


def _translate_x(image, level):
    return _affine(image, (1, 0, _scale(150 / 331, level) * image.size[0] * _sign(), 0, 1, 0))


def _translate_y(image, level):
    return _affine(image, (1, 0, 0, 0, 1, _scale(150 / 331, level) * image.size[1] * _sign()))


def _rotate(image, level):
    return image.rotate(_scale(30, level), fillcolor=GREY)


def _enhance(kind):
    def apply(image, level):
        return kind(image).enhance(1 + _scale(0.9, level) * _sign())

    return apply


def _posterize(image, level):
    return ImageOps.posterize(image, round(8 - _scale(4, level)))


def _solarize(image, level):
    return ImageOps.solarize(image, 256 - _scale(256, level))


OPERATIONS = {
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
    "rotate": _rotate,
    "color": _enhance(ImageEnhance.Color),
    "contrast": _enhance(ImageEnhance.Contrast),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "brightness": _enhance(ImageEnhance.Brightness),
    "posterize": _posterize,
    "solarize": _solarize,
    "autocontrast": lambda image, level: ImageOps.autocontrast(image),
    "equalize": lambda image, level: ImageOps.equalize(image),
    "invert": lambda image, level: ImageOps.invert(image),
}


class ReleaseCIFAR10Policy:
    """Pick one sub-policy uniformly; apply each of its two operations with its probability (PIL RGB in and out)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        sub_policy = CIFAR10_POLICY[int(torch.randint(len(CIFAR10_POLICY), ()))]
        for name, probability, level in sub_policy:
            if torch.rand(()).item() < probability:
                image = OPERATIONS[name](image, level)
        return image

    def __repr__(self) -> str:
        return "ReleaseCIFAR10Policy()"
