"""Spikes kept for backward in as few bits as hold them exactly.

A tensor whose entries are multiples of ``1 / levels`` in ``[0, 1]`` (spikes: ``levels = 1``; their 2x2
averages: 4) takes ``levels + 1`` values, so ``bits(levels)`` bit planes restore it exactly: one bit a
spike, three an average of four. The planes follow the tensor's memory order, so any dense layout
(contiguous or channels-last) packs without a copy and unpacks into the same strides. The device's
``pack_bits``/``unpack_bits`` of :mod:`msgcli.snn.kernels` do it: one kernel each way, Triton on CUDA and C
on the CPU, elsewhere (or without a C compiler) the codes (``x * levels`` as bytes) of its
``encode``/``decode`` and their planes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from msgcli.snn import kernels


def bits(levels: int) -> int:
    """Bits per entry for the values ``0, 1/levels, ..., 1``."""
    return int(levels).bit_length()


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


@dataclass
class Packed:
    """``planes`` (uint8 ``[bits, ceil(n / 8)]``, bit ``i`` of plane ``b`` = bit ``b`` of entry ``i``'s code) and
    what :func:`unpack` needs to rebuild the tensor."""

    planes: torch.Tensor
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    levels: int

    @property
    def nbytes(self) -> int:
        return self.planes.numel()


def pack(x: torch.Tensor, levels: int) -> Packed:
    """Pack a dense ``x`` of multiples of ``1 / levels`` in ``[0, 1]`` (exact; no check of the values)."""
    if not _dense(x):
        x = x.contiguous()
    planes = kernels.for_device(x.device).pack_bits(x.detach(), levels)
    return Packed(planes, tuple(x.shape), tuple(x.stride()), levels)


def unpack(packed: Packed, dtype: torch.dtype) -> torch.Tensor:
    """The tensor :func:`pack` was given, as ``dtype``, laid out as it was."""
    return kernels.for_device(packed.planes.device).unpack_bits(packed.planes, packed.shape, packed.stride,
                                                                packed.levels, dtype)
