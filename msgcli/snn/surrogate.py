"""Surrogate derivatives of the Heaviside spike and the MSG mask applied to them.

The spike is ``S = H(x)`` with ``x = V - V_th`` and ``H(x) = 1 if x >= 0``. Its
derivative is replaced by a smooth surrogate ``g(x)`` (formulas from docs/method.md,
``alpha`` sets height and width). MSG (masked surrogate gradient) drops each
entry of ``g`` with probability ``p`` at every backward call; nothing is stored
between forward and backward, the mask is drawn in backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from msgcli.snn import options

Derivative = Callable[[torch.Tensor, float], torch.Tensor]


def piecewise_linear(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Triangle of height alpha and half-width 1/alpha (the release's default)."""
    return (alpha - alpha * alpha * x.abs()).clamp_(min=0)


def arctan(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha / (1 + (math.pi / 2 * alpha * x).square())


def sigmoid(x: torch.Tensor, alpha: float) -> torch.Tensor:
    s = torch.sigmoid(alpha * x)
    return alpha * s * (1 - s)


def rectangular(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * (x.abs() < 1 / alpha).to(x.dtype)


SURROGATES: dict[str, Derivative] = {  # in the order of options.SURROGATES, whose indices the kernels use
    "piecewise_linear": piecewise_linear,
    "arctan": arctan,
    "sigmoid": sigmoid,
    "rectangular": rectangular,
}


def get_surrogate(name: str) -> Derivative:
    return SURROGATES[options.check("surrogate", name, options.SURROGATES)]


@dataclass(frozen=True)
class SpikeSpec:
    """Everything the spike's backward needs: surrogate, alpha and the MSG mask.

    ``mask_p`` is the probability of DROPPING an entry (paper's p). ``mask_mode``
    draws one Bernoulli per element (release), per (sample, channel) or per
    sample of a timestep (structured extensions). ``mask_fill`` names the
    derivative put in masked entries (``zero`` in the release). ``rescale``
    divides kept entries by 1 - p (the paper's variance form).
    """

    surrogate: str = "piecewise_linear"
    alpha: float = 2.0
    mask_p: float = 0.0
    mask_mode: str = "element"
    mask_fill: str = "zero"
    rescale: bool = False

    def __post_init__(self) -> None:
        get_surrogate(self.surrogate)
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.mask_p, (int, float)) and 0.0 <= self.mask_p <= 1.0):
            raise ValueError(f"mask_p: must be in [0, 1], got {self.mask_p!r}")
        options.check("mask_mode", self.mask_mode, options.MASK_MODES)
        options.check("mask_fill", self.mask_fill, options.MASK_FILLS)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Plain surrogate derivative dS/dV at ``x = V - V_th``, no mask."""
        return get_surrogate(self.surrogate)(x, self.alpha)

    def keep_mask(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh Bernoulli(1 - p) keep-mask for one timestep ``[B, C, ...]``, broadcastable to ``like``."""
        if self.mask_mode == "element":
            shape = like.shape
        elif self.mask_mode == "channel":
            shape = like.shape[:2] + (1,) * (like.dim() - 2)
        else:
            shape = like.shape[:1] + (1,) * (like.dim() - 1)
        return torch.rand(shape, device=like.device, dtype=torch.float32) >= self.mask_p

    def masked_derivative(self, x: torch.Tensor) -> torch.Tensor:
        """dS/dV under MSG for one timestep; ``mask_p == 0`` draws nothing and is the plain surrogate."""
        grad = self.derivative(x)
        if self.mask_p == 0.0:
            return grad
        keep = self.keep_mask(x)
        if self.rescale and self.mask_p < 1.0:
            grad = grad / (1.0 - self.mask_p)
        fill = 0.0 if self.mask_fill == "zero" else get_surrogate(self.mask_fill)(x, self.alpha)
        return torch.where(keep, grad, fill)
