"""Multi-step leaky integrate-and-fire neuron over a whole ``[T, B, ...]`` sequence.

A neuron step is three named parts, as in docs/method.md:

* charge: ``H[t] = V[t-1] + (I[t] - V[t-1]) / tau``
* fire:   ``S[t] = H(H[t] - V_th)`` with a (masked) surrogate derivative
* reset:  hard ``V[t] = H[t] (1 - S[t])`` or soft ``V[t] = H[t] - V_th S[t]``;
  the release keeps the gradient through ``S`` in the reset (``detach_reset=False``).

The membrane starts at 0 on every call: the module keeps no state between calls.
Two implementations sit behind :class:`LIF`: a plain-autograd reference written
for reading, and a fused torch operator (``torch.ops.msgcli.lif``, with its own
autograd, so ``torch.compile`` sees one node) that runs the time loop itself and
saves only ``H`` (one tensor of activation size per timestep) for backward. Its
loops are the device's operations of :mod:`msgcli.snn.kernels` (C kernels on CPU,
Triton kernels on CUDA, torch operators wherever those do not run). Spikes leave the module marked as such (:func:`mark_levels`), so the next
convolution may keep them as bytes.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from msgcli.snn import kernels, options
from msgcli.snn.kernels.ops import spec_args
from msgcli.snn.msg import SpikeSpec


def charge(v: torch.Tensor | float, current: torch.Tensor, tau: float) -> torch.Tensor:
    return v + (current - v) / tau


def reset(h: torch.Tensor, spike: torch.Tensor, mode: str, v_threshold: float) -> torch.Tensor:
    if mode == "hard":
        return h * (1.0 - spike)
    return h - v_threshold * spike


class _SpikeFunction(torch.autograd.Function):
    """Heaviside forward, MSG surrogate backward, for one timestep (reference path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: SpikeSpec) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.spec = spec
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_spike: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_spike * ctx.spec.masked_derivative(x), None


def lif_reference(
    current: torch.Tensor, tau: float, v_threshold: float, spec: SpikeSpec, reset_mode: str, detach_reset: bool
) -> torch.Tensor:
    """Readable LIF with autograd through every step; the yardstick for the fused path."""
    v: torch.Tensor | float = 0.0
    spikes = []
    for t in range(current.shape[0]):
        h = charge(v, current[t], tau)
        s = _SpikeFunction.apply(h - v_threshold, spec)
        v = reset(h, s.detach() if detach_reset else s, reset_mode, v_threshold)
        spikes.append(s)
    return torch.stack(spikes)


def fused_lif(current, ops: kernels.Kernels, tau, v_threshold, spec, reset_mode, detach_reset) -> torch.Tensor:
    """Spikes of the whole time loop on ``ops``, as one torch operator (``torch.ops.msgcli.lif``, see
    :mod:`msgcli.snn.kernels.ops`) whose gradient runs the loop backward from the saved pre-spike membrane ``H``;
    ``H`` is kept only when a gradient is wanted. The MSG mask is drawn in backward, timestep T-1 first, as the
    reference's autograd draws it (on CPU the C kernel draws torch's own random stream, see ``kernels/cpu.py``)."""
    keep = torch.is_grad_enabled() and current.requires_grad
    return torch.ops.msgcli.lif(current, ops.key, tau, v_threshold, reset_mode, detach_reset, *spec_args(spec), keep)[0]


_LEVELS = "_msgsnn_levels"


def mark_levels(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Note on ``x`` that its entries are multiples of ``1 / levels`` (spikes: 1), valid while ``x`` is unmodified.

    Consumers (``Folded`` convolutions) may then save ``x`` for backward as uint8 codes
    instead of floats; an in-place change of ``x`` bumps its version and voids the note.
    Not under ``torch.compile``, which decides itself what a graph saves.
    """
    if not torch.compiler.is_compiling():
        setattr(x, _LEVELS, (int(levels), x._version))
    return x


def levels_of(x: torch.Tensor) -> int | None:
    if torch.compiler.is_compiling():
        return None
    note = getattr(x, _LEVELS, None)
    return note[0] if note is not None and note[1] == x._version else None


class LIF(nn.Module):
    """Leaky integrate-and-fire neurons over ``[T, B, ...]``, returning spikes of the same shape.

    ``mask_p`` is MSG's probability of dropping a surrogate-gradient entry
    (0: plain surrogate gradient). ``surrogate`` and ``mask_fill`` name a
    surrogate of :mod:`msgcli.snn.surrogate` (built in, or added by
    ``register_surrogate``). ``backend``: ``reference`` (autograd per step),
    ``fused`` (one autograd Function: C kernels on CPU, torch operators
    elsewhere), ``triton`` (the CUDA kernels or an error), or ``auto`` (the
    device's fused kernels: Triton on CUDA, C on CPU, each falling back to torch
    operators, see :mod:`msgcli.snn.kernels`).
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 0.5,
        surrogate: str = "piecewise_linear",
        alpha: float = 2.0,
        mask_p: float = 0.0,
        reset: str = "hard",
        detach_reset: bool = False,
        mask_mode: str = "element",
        mask_fill: str = "zero",
        rescale: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not (isinstance(tau, (int, float)) and tau >= 1.0):
            raise ValueError(f"tau: must be a number >= 1, got {tau!r}")
        if not isinstance(v_threshold, (int, float)):
            raise ValueError(f"v_threshold: must be a number, got {v_threshold!r}")
        options.check("reset", reset, options.RESETS)
        options.check("backend", backend, options.BACKENDS)
        self.tau = float(tau)
        self.v_threshold = float(v_threshold)
        self.reset = reset
        self.detach_reset = bool(detach_reset)
        self.backend = backend
        spec = SpikeSpec(surrogate, alpha, mask_p, mask_mode, mask_fill, bool(rescale))  # validates before converting
        self.spec = dataclasses.replace(spec, alpha=float(alpha), mask_p=float(mask_p))

    @property
    def mask_p(self) -> float:
        return self.spec.mask_p

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"tau={self.tau}, v_threshold={self.v_threshold}, surrogate={s.surrogate}, alpha={s.alpha}, "
            f"mask_p={s.mask_p}, mask_mode={s.mask_mode}, reset={self.reset}, detach_reset={self.detach_reset}"
        )

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if current.dim() < 2:
            raise ValueError(f"LIF input: expected a tensor [T, B, ...] with at least 2 dims, got shape {tuple(current.shape)}")
        return mark_levels(self._spikes(current), 1)

    def kernels(self, device: torch.device) -> kernels.Kernels | None:
        """The operations this neuron's fused path runs on ``device``; None for the reference backend."""
        if self.backend == "reference":
            return None
        if self.backend == "triton":
            return kernels.TRITON
        if self.backend == "fused" and device.type == "cuda":
            return kernels.TORCH
        return kernels.for_device(device)

    def _spikes(self, current: torch.Tensor) -> torch.Tensor:
        args = (self.tau, self.v_threshold, self.spec, self.reset, self.detach_reset)
        ops = self.kernels(current.device)
        if ops is None:
            return lif_reference(current, *args)
        return fused_lif(current, ops, *args)
