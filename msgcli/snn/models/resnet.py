"""Spiking ResNets: the release's ResNet18 (LIF in place of every ReLU) and SEW-ResNet18/34.

A block works on ``[T, B, C, H, W]``. ``BasicBlock``: LIF(BN(conv(LIF(BN(conv x)))) + shortcut),
the spike after the sum, as the release's ResNet18. ``SEWBlock`` (Fang et al. 2021, the release's
``sew_resnet*`` with its default ADD connection): spikes at the end of the residual branch and of
the downsampling shortcut, then an ADD of the two, so the identity path stays an identity.
"""

from __future__ import annotations

import torch
from torch import nn

from msgcli.snn.layers import Folded, SpikingSequential, TemporalBatchNorm
from msgcli.snn.models.base import SpikingNet, conv_bn, init_weights
from msgcli.snn.models.registry import register_model
from msgcli.snn.neuron import LIF

STEMS = ("imagenet", "cifar")
STEM_POOLS = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: dict, bn_mode: str) -> None:
        super().__init__()
        self.branch = SpikingSequential(
            *conv_bn(in_ch, out_ch, 3, stride, bn_mode), LIF(**neuron), *conv_bn(out_ch, out_ch, 3, 1, bn_mode)
        )
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride, bn_mode) if stride != 1 or in_ch != out_ch else nn.Identity()
        self.spike = LIF(**neuron)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spike(self.branch(x) + self.shortcut(x))


class SEWBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: dict, bn_mode: str) -> None:
        super().__init__()
        self.branch = SpikingSequential(
            *conv_bn(in_ch, out_ch, 3, stride, bn_mode), LIF(**neuron), *conv_bn(out_ch, out_ch, 3, 1, bn_mode), LIF(**neuron)
        )
        if stride != 1 or in_ch != out_ch:
            self.shortcut = SpikingSequential(*conv_bn(in_ch, out_ch, 1, stride, bn_mode), LIF(**neuron))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x) + self.shortcut(x)


class SpikingResNet(SpikingNet):
    """Stem, four stages of blocks (64-128-256-512 channels), global average pool, linear readout.

    ``stem="imagenet"``: 7x7 stride-2 conv + BN + LIF, then a 3x3 stride-2 pool, ``stem_pool``
    ``"avg"`` or ``"max"``; ``stem="cifar"``: one 3x3 stride-1 conv + BN + LIF and no pool (for 32x32
    inputs; not a network of the release; ``stem_pool`` does not apply). ``init`` and
    ``release_kaiming``: see :func:`~msgcli.snn.models.base.init_weights`.
    """

    def __init__(self, block, depths, in_channels, num_classes, T, neuron, bn_mode, stem, stem_pool, init, release_kaiming):
        super().__init__(T, in_channels)
        if stem not in STEMS:
            raise ValueError(f"stem: unknown '{stem}'; choose one of {', '.join(STEMS)}")
        if stem_pool not in STEM_POOLS:
            raise ValueError(f"stem_pool: unknown '{stem_pool}'; choose one of {', '.join(STEM_POOLS)}")
        if stem == "imagenet":
            self.stem = SpikingSequential(
                Folded(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)),
                TemporalBatchNorm(64, mode=bn_mode),
                LIF(**neuron),
                Folded(STEM_POOLS[stem_pool](3, stride=2, padding=1)),
            )
        else:
            self.stem = SpikingSequential(*conv_bn(in_channels, 64, 3, 1, bn_mode), LIF(**neuron))
        stages, channels = [], 64
        for i, depth in enumerate(depths):
            width = 64 * 2**i
            for j in range(depth):
                stages.append(block(channels, width, 2 if (j == 0 and i > 0) else 1, neuron, bn_mode))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = Folded(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
        self.classifier = Folded(nn.Linear(channels, num_classes))
        init_weights(self, init, release_kaiming)

    def forward_time(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.stages(self.stem(x))))


@register_model
def resnet18(in_channels=2, num_classes=10, T=10, neuron=None, bn_mode="per_step", stem="imagenet", stem_pool="avg", init="release"):
    """The release's ResNet18 as its ``main.py`` builds it: ``ResNet18(pool='avg')`` (the class's own
    default would be max), no init code of its own."""
    return SpikingResNet(BasicBlock, (2, 2, 2, 2), in_channels, num_classes, T, neuron or {}, bn_mode, stem, stem_pool, init, False)


@register_model
def sew_resnet18(in_channels=3, num_classes=1000, T=4, neuron=None, bn_mode="per_step", stem="imagenet", stem_pool="max", init="release"):
    """The release's ``sew_resnet18()``: max-pooled stem, Kaiming-normal init; what its ``--model
    sewresnet34`` option builds too."""
    return SpikingResNet(SEWBlock, (2, 2, 2, 2), in_channels, num_classes, T, neuron or {}, bn_mode, stem, stem_pool, init, True)


@register_model
def sew_resnet34(in_channels=3, num_classes=1000, T=4, neuron=None, bn_mode="per_step", stem="imagenet", stem_pool="max", init="release"):
    """SEW-ResNet34, the paper's ImageNet network: the release's ``sew_resnet34()`` layout (3-4-6-3
    blocks), which its ``main.py`` never builds."""
    return SpikingResNet(SEWBlock, (3, 4, 6, 3), in_channels, num_classes, T, neuron or {}, bn_mode, stem, stem_pool, init, True)
