"""The training core: pure torch, no I/O.

``LIF`` (multi-step neuron with MSG), ``TWO`` (decoder), ``build_model`` (backbones by name),
``register_surrogate`` (a surrogate of one's own). The names below are imported at first use, so
that :mod:`msgcli.snn.options` and :mod:`msgcli.snn.surrogate` (no torch) can be read by the
configuration and the command line without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LIF": "neuron", "lif_reference": "neuron", "TWO": "decode", "Folded": "layers", "TemporalBatchNorm": "layers",
    "SpikeSpec": "msg", "SURROGATES": "surrogate", "register_surrogate": "surrogate",
    "build_model": "models", "list_models": "models", "register_model": "models",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
