"""Training augmentation of event clips, drawn once per clip and applied to all T frames alike.

Applied after the cache (so every epoch sees new draws) and to the train split only.
The release uses RandomCrop(48, padding 4) + HorizontalFlip + Rotation(15, nearest);
TET's roll is an option. The clip is a numpy ``[T, P, H, W]`` array: numpy's
single-threaded slicing and gathering cost a fraction of a millisecond, where torch's
threaded kernels on such small tensors cost ten times more in a busy training process.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from msgcli.config import AugmentConfig


def shift_with_zeros(clip: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``clip`` moved down ``dy`` and right ``dx`` pixels, zeros coming in: a padded random crop."""
    height, width = clip.shape[-2:]
    out = np.zeros_like(clip)
    out[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = clip[
        ..., max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def rotate_nearest(clip: np.ndarray, degrees: float) -> np.ndarray:
    """``clip`` rotated counter-clockwise by ``degrees`` about its centre, nearest pixel, zeros outside."""
    height, width = clip.shape[-2:]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    y, x = np.mgrid[0:height, 0:width]
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    source_x = np.rint(cos * (x - cx) - sin * (y - cy) + cx).astype(np.int64)
    source_y = np.rint(sin * (x - cx) + cos * (y - cy) + cy).astype(np.int64)
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    out = np.zeros_like(clip)
    out[..., inside] = clip[..., source_y[inside], source_x[inside]]
    return out


class ClipAugment:
    """Random crop with zero padding, horizontal flip, rotation and roll of a ``[T, P, H, W]`` clip.

    Random numbers come from torch's generator, which the DataLoader (and the
    trainer's per-sample seeding) seeds for every worker.
    """

    def __init__(self, crop_padding: int = 0, flip: bool = False, rotate: float = 0.0, roll: int = 0):
        self.crop_padding = crop_padding
        self.flip = flip
        self.rotate = rotate
        self.roll = roll

    def __call__(self, clip: np.ndarray) -> np.ndarray:
        if self.crop_padding:
            dy, dx = torch.randint(-self.crop_padding, self.crop_padding + 1, (2,)).tolist()
            clip = shift_with_zeros(clip, dy, dx)
        if self.flip and torch.rand(()).item() < 0.5:
            clip = clip[..., ::-1]
        if self.rotate:
            clip = rotate_nearest(clip, (torch.rand(()).item() * 2 - 1) * self.rotate)
        if self.roll:
            shifts = torch.randint(-self.roll, self.roll + 1, (2,)).tolist()
            clip = np.roll(clip, shifts, axis=(-2, -1))
        return clip

    def __repr__(self) -> str:
        return f"ClipAugment(crop_padding={self.crop_padding}, flip={self.flip}, rotate={self.rotate}, roll={self.roll})"


def clip_augment(augment: AugmentConfig) -> ClipAugment | None:
    """The configured clip augmentation, or ``None`` when every part is switched off."""
    parts = ClipAugment(augment.crop_padding if augment.crop else 0, augment.flip, augment.rotate, augment.roll)
    return parts if (parts.crop_padding or parts.flip or parts.rotate or parts.roll) else None
