"""The named options of the neuron and its layers (surrogates aside), and how the kernels number them.

The config's choices, the modules' checks and the kernels (``kernels/cpu.c``, ``kernels/cuda.py``)
read these tuples; a kernel receives a mask mode as its index here. The surrogates, which plugins
can add to, have a table of their own in :mod:`msgcli.snn.surrogate`. Imports nothing (no
torch), so the configuration schema and the command line can read it.
"""

from __future__ import annotations

MASK_MODES = ("element", "channel", "timestep")  # one MSG draw per element, per (sample, channel), per sample
RESETS = ("hard", "soft")
BN_MODES = ("per_step", "joint")
BACKENDS = ("auto", "reference", "fused", "triton")

NO_MASK = -1  # the kernels' mask mode when MSG is off (p = 0)


def check(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ValueError naming ``option`` and the choices."""
    if value not in choices:
        raise ValueError(f"{option}: unknown '{value}'; choose one of {', '.join(choices)}")
    return value


def mask_mode_id(name: str, mask_p: float) -> int:
    """The kernels' mask mode: the index of ``name``, or :data:`NO_MASK` when nothing is masked."""
    return MASK_MODES.index(name) if mask_p > 0 else NO_MASK
