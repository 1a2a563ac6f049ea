"""An msgsnn plugin: a spiking backbone and a surrogate gradient of its own, with no change to msgsnn.

    msgsnn train --plugin examples/plugin.py --set model.name=tiny_snn --set model.neuron.surrogate=triangle ...

The run records the plugin in its config.yaml, so `msgsnn eval`, `export`, `--resume` and every
sweep point load it again without the flag.
"""

import torch
from torch import nn

from msgcli import LIF, register_model, register_surrogate


class TinySpikingCNN(nn.Module):
    """Two conv-BN-LIF-pool stages and a linear readout at every timestep: ``[B, T, C, H, W]`` -> ``[T, B, classes]``.

    Convolutions, BatchNorm and pooling run once on the ``[T*B, ...]`` batch; each LIF takes the whole
    ``[T, B, ...]`` sequence (it keeps no state between calls), so MSG masks its surrogate gradient in backward.
    """

    def __init__(self, in_channels: int, num_classes: int, T: int, neuron: dict, input_size: int, channels: int = 16):
        super().__init__()
        self.T = T
        self.stage1 = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        self.stage2 = nn.Sequential(nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False), nn.BatchNorm2d(2 * channels))
        self.lif1, self.lif2 = LIF(**neuron), LIF(**neuron)
        self.pool = nn.AvgPool2d(2)
        self.readout = nn.Linear(2 * channels * (input_size // 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # an image [B, C, H, W]: the same frame at every timestep (direct encoding)
            x = x.unsqueeze(1).expand(-1, self.T, *x.shape[1:])
        B, T = x.shape[:2]
        y = x.transpose(0, 1).flatten(0, 1)  # [T*B, C, H, W]
        y = self.lif1(self.stage1(y).unflatten(0, (T, B)))  # spikes [T, B, C, H, W]
        y = self.pool(y.flatten(0, 1))
        y = self.lif2(self.stage2(y).unflatten(0, (T, B)))
        y = self.pool(y.flatten(0, 1)).flatten(1)  # [T*B, features]
        return self.readout(y).unflatten(0, (T, B))  # [T, B, classes]


@register_model
def tiny_snn(in_channels, num_classes, T, neuron, input_size=32, **options):
    """Ignores the model options it has no use for (bn_mode, init, stem, ...)."""
    return TinySpikingCNN(in_channels, num_classes, T, neuron, input_size)


def triangle(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """dS/dV at ``x = H - V_th``: a triangle of height ``alpha`` and half-width ``1 / alpha`` (area 1)."""
    return (alpha - alpha * alpha * x.abs()).clamp(min=0)


register_surrogate("triangle", triangle)  # model.neuron.surrogate: triangle (or mask_fill: triangle)
