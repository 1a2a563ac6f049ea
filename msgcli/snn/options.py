"""Every named option of the neuron and its layers, and the one integer encoding both kernels read.

The config's choices, the modules' checks, the C kernels (``cpu_kernels.c``) and the Triton
kernels (``triton_lif``) all read these tuples; a kernel receives an option as its index here.
Imports nothing (no torch), so the configuration schema and the command line can read it.

Adding a surrogate: append its name to :data:`SURROGATES` and write its formula in
``surrogate.py`` (torch), ``cpu_kernels.c`` (``surr_*``) and ``triton_lif.py`` (``_surrogate``),
each as the branch of the new index.
"""

from __future__ import annotations

SURROGATES = ("piecewise_linear", "arctan", "sigmoid", "rectangular")
MASK_MODES = ("element", "channel", "timestep")  # one MSG draw per element, per (sample, channel), per sample
MASK_FILLS = ("zero",) + SURROGATES  # what a masked entry of the surrogate derivative becomes
RESETS = ("hard", "soft")
BN_MODES = ("per_step", "joint")
BACKENDS = ("auto", "reference", "fused", "triton")

NO_MASK = -1  # the kernels' mask mode when MSG is off (p = 0)
ZERO_FILL = -1  # the kernels' fill for ``zero``


def check(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else ValueError naming ``option`` and the choices."""
    if value not in choices:
        raise ValueError(f"{option}: unknown '{value}'; choose one of {', '.join(choices)}")
    return value


def surrogate_id(name: str) -> int:
    return SURROGATES.index(name)


def mask_mode_id(name: str, mask_p: float) -> int:
    """The kernels' mask mode: the index of ``name``, or :data:`NO_MASK` when nothing is masked."""
    return MASK_MODES.index(name) if mask_p > 0 else NO_MASK


def fill_id(name: str) -> int:
    """The kernels' fill: :data:`ZERO_FILL`, or the index of the surrogate whose derivative fills masked entries."""
    return ZERO_FILL if name == "zero" else surrogate_id(name)
