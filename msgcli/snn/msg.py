"""MSG, the masked surrogate gradient: what the spike's backward needs, in one :class:`SpikeSpec`.

MSG drops each entry of the surrogate derivative ``g`` (:mod:`msgcli.snn.surrogate`) with
probability ``p`` at every backward call; nothing is stored between forward and backward, the
mask is drawn in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msgcli.snn import options, surrogate


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
        surrogate.get_surrogate(self.surrogate)
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.mask_p, (int, float)) and 0.0 <= self.mask_p <= 1.0):
            raise ValueError(f"mask_p: must be in [0, 1], got {self.mask_p!r}")
        options.check("mask_mode", self.mask_mode, options.MASK_MODES)
        surrogate.check_fill(self.mask_fill)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """Plain surrogate derivative dS/dV at ``x = V - V_th``, no mask."""
        return surrogate.get_surrogate(self.surrogate)(x, self.alpha)

    def kernel_ids(self) -> tuple[int, int] | None:
        """``(surrogate, fill)`` as the fused kernels number them (the fill ``zero`` is ``ZERO_FILL_ID``), or None
        where a registered surrogate is needed: torch operators then run the LIF backward."""
        surrogate_id = surrogate.kernel_id(self.surrogate)
        if self.mask_p == 0.0 or self.mask_fill == surrogate.ZERO_FILL:
            fill_id = surrogate.ZERO_FILL_ID
        else:
            fill_id = surrogate.kernel_id(self.mask_fill)
        return None if surrogate_id is None or fill_id is None else (surrogate_id, fill_id)

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
        fill = 0.0 if self.mask_fill == surrogate.ZERO_FILL else surrogate.get_surrogate(self.mask_fill)(x, self.alpha)
        return torch.where(keep, grad, fill)


def mask_seed(device: torch.device) -> torch.Tensor:
    """A fresh 62-bit key ``[1]`` (int64) for the Triton kernel's Philox mask, on ``device`` from its generator: no
    host sync, and drawn afresh at every replay of a CUDA graph that captured it."""
    return torch.randint(2**32, 2**62, (1,), dtype=torch.int64, device=device)
