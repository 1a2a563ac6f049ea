"""msgsnn: spiking neural networks trained with Masked Surrogate Gradients and TWO."""

import os

# MKL's matrix products (torch's CPU GEMM, e.g. a Linear layer's weight gradient, a sum over the
# batch) split their sums by thread count unless its strict reproducibility mode is on: with it,
# a run gives the same numbers at any number of threads. Read at MKL's first call, so it is set
# here, before msgsnn computes anything; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
