"""Layers over time, one file per family: stateless modules run on the folded ``[T*B, ...]`` batch
(:mod:`.folded`, with the convolution that keeps spike inputs as bytes, :mod:`.spike_conv`), and
the BatchNorm over ``[T, B, C, ...]`` (:mod:`.batchnorm`, synchronised over processes by
:mod:`.sync`), and the conv-BN-LIF blocks recomputed in backward (:mod:`.recompute`).

Activations of 2-D convolutions travel channels-last (``[T, B, H, W, C]`` in memory, shape
``[T, B, C, H, W]``): what the CPU and GPU convolution libraries prefer, and a layout in which
the per-timestep statistics are a reduction over the middle axis of ``[T, B*H*W, C]``, with no
transposition.
"""

from msgcli.snn.layers.batchnorm import TemporalBatchNorm, sync_batchnorm
from msgcli.snn.layers.folded import Folded
from msgcli.snn.layers.recompute import SpikingSequential, set_recompute

__all__ = ["Folded", "SpikingSequential", "TemporalBatchNorm", "set_recompute", "sync_batchnorm"]
