"""Decoding per-timestep logits ``[T, B, K]`` into class scores ``[B, K]``.

TWO (temporally weighted output) weights each timestep by how often its output
alone was right. The factors are a registered buffer (saved with the model and
identical on every process); correctness is accumulated as integer counts so
that processes can all-reduce them before the once-per-epoch update.
"""

from __future__ import annotations

import torch
from torch import nn

TWO_RULES = ("release", "paper")


class TWO(nn.Module):
    """Temporally weighted output decoder with no trainable parameters.

    ``rule="release"``: factors start at 1 and stay 1 while the epoch index is
    ``<= warmup_epochs``; then, at each epoch start, ``new_t = acc_t / mean(acc)``
    from the previous epoch's per-timestep training accuracy and
    ``a <- momentum * a + (1 - momentum) * new``; output ``mean_t(a_t O[t])``.

    ``rule="paper"``: ``f_t = 1/T`` at start, ``f <- momentum f + (1 - momentum) delta``
    after every epoch, with ``delta_t`` the fraction of samples whose timestep-t
    output alone is correct; output ``sum_t f_t O[t]``.

    ``enabled=False`` gives the plain time mean (the baseline) with the same API.
    """

    def __init__(
        self, T: int, rule: str = "release", warmup_epochs: int = 5, momentum: float = 0.7, enabled: bool = True
    ) -> None:
        super().__init__()
        if not (isinstance(T, int) and T >= 1):
            raise ValueError(f"T: must be a positive integer, got {T!r}")
        if rule not in TWO_RULES:
            raise ValueError(f"rule: unknown '{rule}'; choose one of {', '.join(TWO_RULES)}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: must be in [0, 1], got {momentum!r}")
        self.T, self.rule, self.warmup_epochs, self.momentum, self.enabled = T, rule, warmup_epochs, momentum, enabled
        initial = torch.full((T,), 1.0 / T if rule == "paper" else 1.0)
        self.register_buffer("factors", initial)
        self.register_buffer("correct", torch.zeros(T, dtype=torch.long))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``[T, B, K]`` -> ``[B, K]``."""
        if logits.dim() != 3 or logits.shape[0] != self.T:
            raise ValueError(f"TWO input: expected logits [T={self.T}, B, K], got shape {tuple(logits.shape)}")
        if not self.enabled:
            return logits.mean(0)
        weighted = logits * self.factors.to(logits.dtype)[:, None, None]
        return weighted.sum(0) if self.rule == "paper" else weighted.mean(0)

    @torch.no_grad()
    def observe(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count, per timestep, the samples whose output at that timestep alone is correct."""
        self.correct += (logits.argmax(-1) == targets[None]).sum(1)
        self.seen += targets.numel()

    def timestep_accuracy(self) -> torch.Tensor:
        """Fraction correct per timestep over what was observed since the last update."""
        return self.correct.double() / self.seen.clamp(min=1).double()

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> None:
        """Update the factors after (zero-based) ``epoch`` for use in epoch + 1, then clear the counts."""
        if self.enabled and self.seen > 0:
            accuracy = self.timestep_accuracy()
            if self.rule == "paper":
                target = accuracy
            elif epoch + 1 > self.warmup_epochs:
                target = accuracy / accuracy.mean() if accuracy.mean() > 0 else torch.ones_like(accuracy)
            else:
                target = None
            if target is not None:
                self.factors.copy_(self.momentum * self.factors.double() + (1 - self.momentum) * target)
        self.correct.zero_()
        self.seen.zero_()

    def extra_repr(self) -> str:
        return f"T={self.T}, rule={self.rule}, enabled={self.enabled}, warmup_epochs={self.warmup_epochs}, momentum={self.momentum}"
