"""msgcli, the import package of the ``msgsnn`` command: spiking neural networks trained with Masked
Surrogate Gradients and TWO.

The public API, ``from msgcli import LIF, TWO, build_model, register_model, register_surrogate,
register_dataset, EventFiles``, is imported at first use, so that ``msgsnn --help`` answers without loading torch.
"""

import os

# MKL's matrix products (torch's CPU GEMM, e.g. a Linear layer's weight gradient, a sum over the
# batch) split their sums by thread count unless its strict reproducibility mode is on: with it,
# a run gives the same numbers at any number of threads. Read at MKL's first call, so it is set
# here, before msgsnn computes anything; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

# OpenMP threads that wait for work sleep instead of spinning (read when torch loads OpenMP, so set
# here, before torch is imported). On a machine busy with other work a spinning thread takes the
# core that its peer in a static-schedule loop needs: measured on 2 cores with 2 other busy
# processes, a 3-epoch main job took 22-52 s spinning and 15-16 s sleeping (8.4 s vs 8.9-9.4 s
# quiet). benchmarks/busy.py measures it. A value the user set (or GOMP_SPINCOUNT) is kept.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_API = {"LIF": "msgcli.snn", "TWO": "msgcli.snn", "build_model": "msgcli.snn", "register_model": "msgcli.snn",
        "register_surrogate": "msgcli.snn", "register_dataset": "msgcli.data", "EventFiles": "msgcli.data"}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
