"""Layers over time: stateless ops run once on the folded ``[T*B, ...]`` batch.

Convolutions, pooling and linear layers have no temporal dynamics, so
:class:`Folded` runs them in one call on ``[T*B, ...]`` instead of looping over
T. :class:`TemporalBatchNorm` normalises ``[T, B, C, ...]`` with statistics over
the B samples of each timestep (``per_step``: what the release computes by
calling its network once per timestep) or over all T*B samples (``joint``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MODES = ("per_step", "joint")


class Folded(nn.Module):
    """Apply a stateless module to ``[T, B, ...]`` as one ``[T*B, ...]`` batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.module(x.flatten(0, 1))
        return y.view(x.shape[0], x.shape[1], *y.shape[1:])


class TemporalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over ``[T, B, C, ...]`` with one set of affine parameters and running stats.

    In ``per_step`` mode, training normalises each timestep with its own batch
    statistics, and the running statistics receive T successive momentum
    updates per call, as T calls of the release's shared BatchNorm would.
    Evaluation uses the running statistics in both modes.
    """

    def __init__(self, num_features: int, mode: str = "per_step", eps: float = 1e-5, momentum: float = 0.1) -> None:
        if mode not in BN_MODES:
            raise ValueError(f"bn_mode: unknown '{mode}'; choose one of {', '.join(BN_MODES)}")
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.mode = mode

    def _check_input_dim(self, x: torch.Tensor) -> None:
        # Also called by _BatchNorm.forward on the folded [T*B, C, ...] batch, so one dim less.
        if x.dim() < 2:
            raise ValueError(f"TemporalBatchNorm input: expected [T, B, C, ...], got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.mode}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"TemporalBatchNorm input: expected [T, B, C, ...], got shape {tuple(x.shape)}")
        T, B = x.shape[:2]
        if self.mode == "joint" or not self.training:
            return super().forward(x.flatten(0, 1)).view_as(x)
        # [T, B, C, ...] -> [B, T*C, ...]: one native BN call whose channels are (t, c) pairs.
        per_step = x.transpose(0, 1).reshape(B, T * self.num_features, *x.shape[3:])
        running_mean = self.running_mean.repeat(T)
        running_var = self.running_var.repeat(T)
        y = F.batch_norm(
            per_step, running_mean, running_var, self.weight.repeat(T), self.bias.repeat(T),
            training=True, momentum=self.momentum, eps=self.eps,
        )
        self._sequential_running_update(running_mean.view(T, -1), running_var.view(T, -1))
        return y.view(B, T, *x.shape[2:]).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _sequential_running_update(self, after_mean: torch.Tensor, after_var: torch.Tensor) -> None:
        """Fold T one-step updates ``r <- (1-m) r + m s_t`` (made in parallel) into T sequential ones."""
        m = self.momentum
        T = after_mean.shape[0]
        decay = (1.0 - m) ** torch.arange(T - 1, -1, -1, device=after_mean.device, dtype=after_mean.dtype)
        for running, after in ((self.running_mean, after_mean), (self.running_var, after_var)):
            contribution = after - (1.0 - m) * running  # m * s_t for each timestep
            running.mul_((1.0 - m) ** T).add_((decay[:, None] * contribution).sum(0))
        self.num_batches_tracked.add_(T)
