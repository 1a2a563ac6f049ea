"""Surrogate derivatives of the Heaviside spike: one table, one entry per surrogate.

The spike is ``S = H(x)`` with ``x = H - V_th`` (the pre-spike membrane minus the threshold) and
``H(x) = 1 if x >= 0``. Its derivative is replaced by a smooth surrogate ``g(x, alpha)``
(formulas from docs/method.md; ``alpha`` sets height and width). Each :class:`Surrogate` names its
torch formula and, for a built-in one, the number by which the fused kernels know it: the branch
``sid == kernel_id`` of ``surr_*`` in ``kernels/cpu.c`` and ``KIND == kernel_id`` of ``_surrogate``
in ``kernels/cuda.py``. Adding a built-in surrogate: its formula and one line of
:data:`SURROGATES` here, and those two kernel branches; ``tests/test_surrogate.py`` checks that the
three agree. :func:`register_surrogate` adds one without a kernel, which torch operators run.

Imports nothing heavy (the formulas use tensor methods only), so that the configuration can check
a surrogate's name against this live table, plugins' surrogates included, without loading torch.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from msgcli.errors import did_you_mean

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Derivative = Callable[["torch.Tensor", float], "torch.Tensor"]


def piecewise_linear(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Triangle of height alpha and half-width 1/alpha (the release's default)."""
    return (alpha - alpha * alpha * x.abs()).clamp_(min=0)


def arctan(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha / (1 + (math.pi / 2 * alpha * x).square())


def sigmoid(x: torch.Tensor, alpha: float) -> torch.Tensor:
    s = (alpha * x).sigmoid()
    return alpha * s * (1 - s)


def rectangular(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * (x.abs() < 1 / alpha).to(x.dtype)


@dataclass(frozen=True)
class Surrogate:
    """dS/dV as ``derivative(x, alpha)`` at ``x = H - V_th``; calling the surrogate calls it.

    ``kernel_id``: the surrogate's number in the fused kernels (C and Triton), or None for a
    registered surrogate, whose LIF backward then runs on torch operators.
    """

    name: str
    derivative: Derivative
    kernel_id: int | None = None

    def __call__(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return self.derivative(x, alpha)


BUILTIN = (
    Surrogate("piecewise_linear", piecewise_linear, kernel_id=0),
    Surrogate("arctan", arctan, kernel_id=1),
    Surrogate("sigmoid", sigmoid, kernel_id=2),
    Surrogate("rectangular", rectangular, kernel_id=3),
)

SURROGATES: dict[str, Surrogate] = {s.name: s for s in BUILTIN}  # the live table: built-ins, then registered ones

ZERO_FILL = "zero"  # the mask fill that puts 0 in masked entries (the release); every other fill is a surrogate's name
ZERO_FILL_ID = -1  # its number in the kernels

_ON_TORCH_NOTED: set[str] = set()


def names() -> tuple[str, ...]:
    """Every surrogate's name, built-in ones first."""
    return tuple(SURROGATES)


def fill_names() -> tuple[str, ...]:
    """What a masked entry of dS/dV can become: 0, or any surrogate's derivative."""
    return (ZERO_FILL,) + names()


def _unknown(option: str, name: object, choices: tuple[str, ...]) -> ValueError:
    hint = did_you_mean(name, choices) if isinstance(name, str) else ""
    return ValueError(f"{option}: unknown '{name}'{hint}; choose one of {', '.join(choices)}")


def get_surrogate(name: str) -> Surrogate:
    """The surrogate called ``name``, or ValueError listing the choices."""
    if name not in SURROGATES:
        raise _unknown("surrogate", name, names())
    return SURROGATES[name]


def check_fill(name: str) -> str:
    """``name`` if it is a mask fill (``zero`` or a surrogate), else ValueError listing the choices."""
    if name != ZERO_FILL and name not in SURROGATES:
        raise _unknown("mask_fill", name, fill_names())
    return name


def register_surrogate(name: str, fn: Derivative) -> Derivative:
    """Make ``fn(x, alpha)``, dS/dV at ``x = H - V_th`` as a torch expression, usable by ``name``.

    Then ``LIF(surrogate=name)``, ``LIF(mask_fill=name)`` and the config's ``model.neuron.surrogate:
    name`` take it, with MSG and every mask mode and fill. The fused kernels know only the built-in
    surrogates: the LIF backward with this one runs on torch operators, which one info line says
    once per process. Registering a name again replaces the first, with a warning. Returns ``fn``.
    """
    if not isinstance(name, str) or not name or name == ZERO_FILL:
        raise ValueError(f"register_surrogate: the name must be a non-empty string other than '{ZERO_FILL}', got {name!r}")
    if not callable(fn):
        raise ValueError(f"register_surrogate: '{name}' needs a function fn(x, alpha), got {fn!r}")
    old = SURROGATES.get(name)
    if old is not None and old.derivative is not fn:
        warnings.warn(f"register_surrogate: '{name}' was already registered ({getattr(old.derivative, '__module__', '?')}); "
                      f"{getattr(fn, '__module__', '?')}'s replaces it", RuntimeWarning, stacklevel=2)
    SURROGATES[name] = Surrogate(name, fn)
    _ON_TORCH_NOTED.discard(name)
    return fn


def kernel_id(name: str) -> int | None:
    """The fused kernels' number of surrogate ``name``; None for a registered one, said once per process in
    an info line (its LIF backward runs on torch operators)."""
    found = get_surrogate(name).kernel_id
    if found is None and name not in _ON_TORCH_NOTED:
        _ON_TORCH_NOTED.add(name)
        log.info("surrogate '%s' is registered, not built in: the fused kernels cannot compute it, so the LIF "
                 "backward with it runs on torch operators (same results, slower)", name)
    return found
