"""The spike and its surrogates' derivatives by hand, the formulas of docs/method.md written again here so that the
library is checked against them, not against itself."""

import math

import torch

DERIVATIVES = {
    "piecewise_linear": lambda x, a: torch.where(x.abs() < 1 / a, a - a * a * x.abs(), torch.zeros_like(x)),
    "arctan": lambda x, a: a / (1 + (math.pi / 2 * a * x) ** 2),
    "sigmoid": lambda x, a: a * torch.sigmoid(a * x) * (1 - torch.sigmoid(a * x)),
    "rectangular": lambda x, a: a * (x.abs() < 1 / a).to(x.dtype),
    "zero": lambda x, a: torch.zeros_like(x),
}


class Spike(torch.autograd.Function):
    """Heaviside forward of ``x``; backward: the upstream gradient times ``spec``'s (a ``SpikeSpec``, or any object
    with its ``surrogate``, ``alpha`` and ``mask_*`` fields; "zero" is a surrogate here) surrogate derivative, or its
    fill's where the MSG mask (drawn with ``torch.rand`` for ``spec.mask_mode``) drops the entry. ``derivatives``:
    the table to read them in (a test adds the surrogates it registers)."""

    @staticmethod
    def forward(ctx, x, spec, derivatives=DERIVATIVES):
        ctx.save_for_backward(x)
        ctx.spec, ctx.derivatives = spec, derivatives
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        spec, derivatives = ctx.spec, ctx.derivatives
        g = derivatives[spec.surrogate](x, spec.alpha)
        if spec.mask_p > 0:
            shape = {"element": x.shape, "channel": x.shape[:2] + (1,) * (x.dim() - 2),
                     "timestep": x.shape[:1] + (1,) * (x.dim() - 1)}[spec.mask_mode]
            keep = torch.rand(shape, dtype=torch.float32) >= spec.mask_p
            g = torch.where(keep, g, derivatives[spec.mask_fill](x, spec.alpha))
        return grad * g, None, None
