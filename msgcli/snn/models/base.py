"""Shared pieces of the spiking backbones: input encoding, conv-BN units, initialisation."""

from __future__ import annotations

import torch
from torch import nn

from msgcli.snn.layers import Folded, SpikingSequential, TemporalBatchNorm
from msgcli.snn.neuron import LIF

INITS = ("release", "kaiming")


class SpikingNet(nn.Module):
    """Base class: turns the input into ``[T, B, C, H, W]`` and returns ``[T, B, K]``.

    Event clips arrive as ``[B, T, C, H, W]``; static images as ``[B, C, H, W]``
    are repeated T times (direct encoding: the first conv+BN+LIF is the encoder), as
    a view whose T steps share one image, so the first :class:`Folded` convolution runs
    once on the B images instead of T*B times.
    Subclasses implement :meth:`forward_time` on ``[T, B, ...]``.
    """

    def __init__(self, T: int, in_channels: int) -> None:
        super().__init__()
        self.T = T
        self.in_channels = in_channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            if x.shape[1] != self.T:
                raise ValueError(f"input T: the model was built for T={self.T}, got clips with T={x.shape[1]} (shape {tuple(x.shape)})")
            seq = x.transpose(0, 1).contiguous()
        elif x.dim() == 4:
            seq = x.unsqueeze(0).expand(self.T, *x.shape)
        else:
            raise ValueError(f"input: expected [B, T, C, H, W] events or [B, C, H, W] images, got shape {tuple(x.shape)}")
        if seq.shape[2] != self.in_channels:
            raise ValueError(f"input channels: the model expects {self.in_channels}, got {seq.shape[2]} (shape {tuple(x.shape)})")
        return seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_time(self.encode(x))

    def forward_time(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, bn_mode: str = "per_step") -> nn.Sequential:
    """Conv (no bias) on the folded batch, then BatchNorm over time."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(Folded(conv), TemporalBatchNorm(out_ch, mode=bn_mode))


def conv_bn_lif(in_ch: int, out_ch: int, neuron: dict, kernel: int = 3, stride: int = 1, bn_mode: str = "per_step") -> nn.Sequential:
    """Conv, BatchNorm and LIF in a :class:`SpikingSequential`, so ``recompute`` can take them as one block."""
    return SpikingSequential(*conv_bn(in_ch, out_ch, kernel, stride, bn_mode), LIF(**neuron))


def init_weights(model: SpikingNet, init: str, release_kaiming: bool) -> SpikingNet:
    """Initialise the convolutions of a freshly built ``model`` (BatchNorm stays at weight 1, bias 0,
    the linear readout at PyTorch's default, under both rules).

    ``kaiming``: Kaiming-normal (fan_out, ReLU gain) for every convolution, std sqrt(2 / (C_out k k)).
    ``release``: what the authors' code leaves them with. Its VGGNet, CIFARConvNet and ResNet18 have
    no init code, so PyTorch's default stays (kaiming-uniform with a = sqrt(5), std 1/sqrt(3 C_in k k));
    its SEW-ResNets (``release_kaiming``) apply Kaiming-normal (fan_out) to every convolution, except
    that for inputs of other than 3 channels its network wrapper swaps the first convolution for a
    fresh, default-initialised one.
    """
    if init not in INITS:
        raise ValueError(f"init: unknown '{init}'; choose one of {', '.join(INITS)}")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if init == "release":
        if not release_kaiming:
            return model
        if model.in_channels != 3:
            convs = convs[1:]
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return model
