"""The convolution of a spike input, which saves that input for backward as uint8 codes, not floats.

The weight gradient needs the input; spikes are 0/1 and their 2x2 averages multiples of 1/4,
so one byte per entry restores them exactly (:func:`pooled_levels` says which averages stay
exact). The codes are written and read by the device's ``encode``/``decode`` of
:mod:`msgcli.snn.kernels`.
"""

from __future__ import annotations

import torch
from torch import nn

from msgcli.snn import kernels


def takes_spike_codes(conv: nn.Conv2d) -> bool:
    """:class:`SpikeInputConv` reproduces ``conv(x)`` exactly: a plain ``Conv2d`` forward, zero padding
    given as numbers, no hooks."""
    from torch.nn.modules import module as module_globals

    return (type(conv).forward is nn.Conv2d.forward and type(conv)._conv_forward is nn.Conv2d._conv_forward
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not conv._forward_hooks
            and not conv._forward_pre_hooks and not module_globals._global_forward_hooks
            and not module_globals._global_forward_pre_hooks)


def pooled_levels(pool: nn.AvgPool2d, levels: int) -> int | None:
    """Levels of an average of spikes over k x k windows; only where the division by k*k is exact."""
    k = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size, pool.kernel_size)
    window = k[0] * k[1]
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding, pool.padding)
    exact = window & (window - 1) == 0 and padding == (0, 0) and not pool.ceil_mode and pool.divisor_override is None
    return levels * window if exact and levels * window <= 128 else None


class SpikeInputConv(torch.autograd.Function):
    """``conv(x)`` for an input of spikes (or averaged spikes) ``[N, C, H, W]``: saves ``x`` as uint8 codes.

    Backward decodes them and calls the same ``convolution_backward`` that autograd would. Under
    autocast the forward's compute dtype is kept for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv, levels):
        y = conv._conv_forward(x, weight, bias)
        ops = kernels.for_device(x.device)
        ctx.save_for_backward(ops.encode(x, levels), weight)
        ctx.conv, ctx.levels, ctx.dtype, ctx.x_dtype, ctx.ops = conv, levels, y.dtype, x.dtype, ops
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        codes, weight = ctx.saved_tensors
        conv, dtype = ctx.conv, ctx.dtype
        x = ctx.ops.decode(codes, ctx.levels, dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_shape is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y.to(dtype), x, weight.to(dtype), ctx.bias_shape, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0, 0], conv.groups, mask)
        return (None if gx is None else gx.to(ctx.x_dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None, None)
