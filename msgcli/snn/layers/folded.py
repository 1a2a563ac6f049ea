"""Stateless modules over time: convolutions, pooling and linear layers run once on ``[T*B, ...]``.

They have no temporal dynamics, so :class:`Folded` runs them in one call on the folded batch
instead of looping over T. A convolution whose input is known to hold spikes (see
:func:`msgcli.snn.neuron.mark_levels`) saves that input as bits, and an average pool of spikes saves
nothing (:mod:`.spike_conv`).
"""

from __future__ import annotations

import torch
from torch import nn

from msgcli.snn.layers.spike_conv import SpikeInputConv, SpikeInputPool, pooled_levels, takes_spike_codes
from msgcli.snn.neuron import levels_of, mark_levels


class Folded(nn.Module):
    """Apply a stateless module to ``[T, B, ...]`` as one ``[T*B, ...]`` batch; to the B frames alone when every
    step holds the same frames (a ``[T, B, ...]`` view of stride 0 over T: direct encoding), whose result is then
    repeated over T."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if isinstance(module, nn.Conv2d):
            module = module.to(memory_format=torch.channels_last)  # weights laid out like the activations
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1 and x.stride(0) == 0:
            return _repeated(self._folded(x[:1])[0], x.shape[0])
        return self._folded(x)

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        levels = levels_of(x)
        flat = x.flatten(0, 1)
        module = self.module
        if flat.dim() == 4 and isinstance(module, nn.Conv2d):
            flat = flat.contiguous(memory_format=torch.channels_last)  # no copy after the first layer
            if levels is not None and flat.device.type == "cpu" and torch.is_grad_enabled() and takes_spike_codes(module):
                y = SpikeInputConv.apply(flat, module.weight, module.bias, module, levels)
            else:
                y = module(flat)
        elif levels is not None and isinstance(module, nn.AvgPool2d) and flat.dim() == 4:
            y = SpikeInputPool.apply(flat, module) if torch.is_grad_enabled() and flat.requires_grad else module(flat)
        else:
            y = module(flat)
        out = y.view(x.shape[0], x.shape[1], *y.shape[1:])
        if levels is not None and isinstance(module, nn.AvgPool2d):
            pooled = pooled_levels(module, levels)
            if pooled is not None:
                mark_levels(out, pooled)
        return out


def _repeated(frames: torch.Tensor, T: int) -> torch.Tensor:
    """``frames [B, ...]`` repeated over T as a dense ``[T, B, ...]`` whose every step keeps the frames' layout
    (channels-last stays channels-last, so the layers after it copy nothing)."""
    channels_last = frames.dim() == 4 and not frames.is_contiguous() and frames.is_contiguous(
        memory_format=torch.channels_last)
    out = torch.empty((T * frames.shape[0], *frames.shape[1:]), dtype=frames.dtype, device=frames.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out = out.view(T, *frames.shape)
    out.copy_(frames.expand(T, *frames.shape))
    return out
