"""The training core: pure torch, no I/O.

``LIF`` (multi-step neuron with MSG), ``TWO`` (decoder), ``build_model`` (backbones by name).
"""

from msgsnn.snn.decode import TWO
from msgsnn.snn.layers import Folded, TemporalBatchNorm
from msgsnn.snn.models import build_model, list_models, register_model
from msgsnn.snn.neuron import LIF, lif_reference
from msgsnn.snn.surrogate import SURROGATES, SpikeSpec

__all__ = [
    "LIF", "TWO", "Folded", "TemporalBatchNorm", "SpikeSpec", "SURROGATES",
    "build_model", "list_models", "register_model", "lif_reference",
]
