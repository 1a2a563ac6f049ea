"""Layers of spike inputs that save little for backward: the convolution keeps its input as bits, not floats,
and the average pool keeps nothing.

The weight gradient needs the input; spikes are 0/1 and their 2x2 averages multiples of 1/4,
so one bit per spike (three per average) restores them exactly (:func:`pooled_levels` says which
averages stay exact; :mod:`msgcli.snn.packing` packs them).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from msgcli.snn import packing


def unhooked(module: nn.Module, cls: type) -> bool:
    """``module`` runs ``cls``'s own forward with no hook of its own or of every module to call: a path that
    computes its output without calling it (a fused kernel) gives what calling it would."""
    from torch.nn.modules import module as module_globals

    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
             module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
             module_globals._global_backward_hooks, module_globals._global_backward_pre_hooks)
    return type(module).forward is cls.forward and not any(hooks)


def takes_spike_codes(conv: nn.Conv2d) -> bool:
    """:class:`SpikeInputConv` reproduces ``conv(x)`` exactly: a plain ``Conv2d`` forward, zero padding
    given as numbers, no hooks."""
    return (unhooked(conv, nn.Conv2d) and type(conv)._conv_forward is nn.Conv2d._conv_forward
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def pooled_levels(pool: nn.AvgPool2d, levels: int) -> int | None:
    """Levels of an average of spikes over k x k windows; only where the division by k*k is exact."""
    k = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size, pool.kernel_size)
    window = k[0] * k[1]
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding, pool.padding)
    exact = window & (window - 1) == 0 and padding == (0, 0) and not pool.ceil_mode and pool.divisor_override is None
    return levels * window if exact and levels * window <= 128 else None


class SpikeInputConv(torch.autograd.Function):
    """``conv(x)`` for an input of spikes (or averaged spikes) ``[N, C, H, W]``: saves ``x`` as bits.

    Backward decodes them and calls the same ``convolution_backward`` that autograd would. Under
    autocast the forward's compute dtype is kept for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv, levels):
        y = conv._conv_forward(x, weight, bias)
        packed = packing.pack(x, levels)
        ctx.save_for_backward(packed.planes, weight)
        ctx.conv, ctx.packed, ctx.dtype, ctx.x_dtype = conv, packed, y.dtype, x.dtype
        packed.planes = None  # held by autograd's saved tensors
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        planes, weight = ctx.saved_tensors
        conv, dtype = ctx.conv, ctx.dtype
        x = packing.unpack(dataclasses.replace(ctx.packed, planes=planes), dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_shape is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y.to(dtype), x, weight.to(dtype), ctx.bias_shape, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0, 0], conv.groups, mask)
        return (None if gx is None else gx.to(ctx.x_dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None, None)


class SpikeInputPool(torch.autograd.Function):
    """``avg_pool2d`` of ``x [N, C, H, W]``, saving nothing: torch's own autograd keeps the whole input for its
    shape, a float tensor as large as the layer's spikes."""

    @staticmethod
    def forward(ctx, x, pool: nn.AvgPool2d):
        y = pool(x)
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.shape, ctx.pool = x.shape, pool
        ctx.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        out = torch.empty(ctx.shape, dtype=grad_y.dtype, device=grad_y.device, memory_format=ctx.memory_format)
        return avg_pool_backward(ctx.pool, grad_y, out, out), None  # one tensor gives the shape and takes the result


def avg_pool_backward(pool: nn.AvgPool2d, grad_y: torch.Tensor, like: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The input gradient of ``pool`` from ``grad_y [N, C, h, w]``, shaped and laid out like ``like`` (into ``out``,
    laid out so, where given): torch's own backward reads its input for the shape and layout alone, so any tensor
    of both serves (an unwritten one, another of the same shape).

    Where the windows tile the input (stride = kernel, no padding, the input a whole number of windows: VGG's
    2x2 pools) each window's entries get ``grad_y / (kh * kw)``, the very division torch makes, in one broadcast
    copy: torch's backward runs several times slower on a contiguous gradient for a channels-last input."""
    kernel, stride, padding = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding)
    N, C, H, W = like.shape
    kh, kw = kernel
    if (stride == kernel and padding == [0, 0] and pool.divisor_override is None and H % kh == 0 and W % kw == 0
            and tuple(grad_y.shape) == (N, C, H // kh, W // kw)):
        out = torch.empty_like(like, dtype=grad_y.dtype) if out is None else out
        s = out.stride()
        windows = out.as_strided((N, C, H // kh, kh, W // kw, kw), (s[0], s[1], kh * s[2], s[2], kw * s[3], s[3]),
                                 out.storage_offset())
        windows.copy_((grad_y / (kh * kw))[:, :, :, None, :, None].expand(windows.shape))
        return out
    grad = torch.ops.aten.avg_pool2d_backward(grad_y, like, kernel, stride, padding, pool.ceil_mode,
                                              pool.count_include_pad, pool.divisor_override)
    return grad if out is None else out.copy_(grad)


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]
