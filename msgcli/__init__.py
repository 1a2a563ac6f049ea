"""msgcli, the import package of the ``msgsnn`` command: spiking neural networks trained with Masked
Surrogate Gradients and TWO.

The public API, ``from msgcli import LIF, TWO, build_model, register_model, register_surrogate,
register_dataset, EventFiles``, is imported at first use, so that ``msgsnn --help`` answers without loading torch.
"""

import os

# The one environment default set on import, because determinism needs it (docs/environment.md lists
# every variable msgsnn reads or sets): MKL's matrix products (torch's CPU GEMM, e.g. a Linear layer's
# weight gradient, a sum over the batch) split their sums by thread count unless its strict
# reproducibility mode is on; with it, a run gives the same numbers at any number of threads. Read at
# MKL's first call, so it is set here, before msgsnn computes anything; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

_API = {"LIF": "msgcli.snn", "TWO": "msgcli.snn", "build_model": "msgcli.snn", "register_model": "msgcli.snn",
        "register_surrogate": "msgcli.snn", "register_dataset": "msgcli.data", "EventFiles": "msgcli.data"}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
