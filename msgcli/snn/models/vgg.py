"""Plain convolution stacks: VGGSNN (DVS, 48x48 in), CIFARNet (static images) and a tiny VGG for the demo."""

from __future__ import annotations

import torch
from torch import nn

from msgcli.snn.layers import Folded, SpikingSequential
from msgcli.snn.models.base import SpikingNet, conv_bn_lif, init_weights
from msgcli.snn.models.registry import register_model

POOL = "A"

VGGSNN = [64, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL]
CIFARNET = [256, 256, POOL, 256, 256, POOL, 512, 512, POOL, 1024, 1024]
VGG_TINY = [32, POOL, 64, POOL, 128, POOL]


class ConvStack(SpikingNet):
    """conv3x3-BN-LIF layers with 2x2 average pools, then a non-spiking linear readout.

    ``head="flatten"`` feeds the flattened last feature map to the classifier
    (VGGSNN: 512*3*3 at 48x48 input); ``head="avg"`` averages it globally first (CIFARNet).
    ``input_size`` (the input's height and width) sizes the flatten head; both heads check
    that every pooling stage keeps at least one pixel.
    ``init="release"`` keeps PyTorch's default initialisation, as the release's VGGNet and
    CIFARConvNet (no init code); ``"kaiming"``: see :func:`~msgcli.snn.models.base.init_weights`.
    """

    def __init__(self, layout, in_channels, num_classes, T, neuron, bn_mode="per_step", head="flatten", input_size=48, init="release"):
        super().__init__(T, in_channels)
        layers, channels, size = [], in_channels, input_size
        for item in layout:
            if item == POOL:
                layers.append(Folded(nn.AvgPool2d(2)))
                size //= 2
            else:
                layers.append(conv_bn_lif(channels, item, neuron, bn_mode=bn_mode))
                channels = item
        if size < 1:
            raise ValueError(f"input_size: {input_size} is too small for {sum(i == POOL for i in layout)} pooling stages")
        self.features = SpikingSequential(*layers)  # recompute runs each pool inside the block before it
        if head == "avg":
            self.pool = Folded(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
            features = channels
        else:
            self.pool = Folded(nn.Flatten())
            features = channels * size * size
        self.classifier = Folded(nn.Linear(features, num_classes))
        init_weights(self, init, release_kaiming=False)

    def forward_time(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@register_model
def vggsnn(in_channels=2, num_classes=10, T=10, neuron=None, bn_mode="per_step", input_size=48, init="release"):
    """VGGSNN of TET, the release's ``VGGNet``: 64c3-128c3-AP2-256c3-256c3-AP2-512c3-512c3-AP2-512c3-512c3-AP2-FC."""
    return ConvStack(VGGSNN, in_channels, num_classes, T, neuron or {}, bn_mode, "flatten", input_size, init)


@register_model
def vggsnn_tiny(in_channels=2, num_classes=10, T=10, neuron=None, bn_mode="per_step", input_size=32, init="release"):
    """32c3-AP2-64c3-AP2-128c3-AP2-FC: small enough to train the offline demo on a laptop CPU (not in the release)."""
    return ConvStack(VGG_TINY, in_channels, num_classes, T, neuron or {}, bn_mode, "flatten", input_size, init)


@register_model
def cifarnet(in_channels=3, num_classes=10, T=4, neuron=None, bn_mode="per_step", input_size=32, init="release"):
    """The release's ``CIFARConvNet``: 256c3-256c3-AP-256c3-256c3-AP-512c3-512c3-AP-1024c3-1024c3-GAP-FC."""
    return ConvStack(CIFARNET, in_channels, num_classes, T, neuron or {}, bn_mode, "avg", input_size, init)
