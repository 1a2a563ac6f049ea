"""Spikes kept for backward in as few bits as hold them exactly.

A tensor whose entries are multiples of ``1 / levels`` in ``[0, 1]`` (spikes: ``levels = 1``; their 2x2
averages: 4) takes ``levels + 1`` values, so ``bits(levels)`` bit planes restore it exactly: one bit a
spike, three an average of four. The planes follow the tensor's memory order, so any dense layout
(contiguous or channels-last) packs without a copy and unpacks into the same strides. The codes
(``x * levels`` as bytes) come from the device's ``encode``/``decode`` of :mod:`msgcli.snn.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """The entries of a dense ``x`` as a 1-D view in the order they sit in memory."""
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def pack(x: torch.Tensor, levels: int) -> Packed:
    """Pack a dense ``x`` of multiples of ``1 / levels`` in ``[0, 1]`` (exact; no check of the values)."""
    if not _dense(x):
        x = x.contiguous()
    codes = _memory_order(kernels.for_device(x.device).encode(x.detach(), levels))
    planes = _planes_numpy if codes.device.type == "cpu" else _planes_torch
    return Packed(planes(codes, bits(levels)), tuple(x.shape), tuple(x.stride()), levels)


def unpack(packed: Packed, dtype: torch.dtype) -> torch.Tensor:
    """The tensor :func:`pack` was given, as ``dtype``, laid out as it was."""
    planes = packed.planes
    codes = torch.empty_strided(packed.shape, packed.stride, dtype=torch.uint8, device=planes.device)
    read = _codes_numpy if planes.device.type == "cpu" else _codes_torch
    _memory_order(codes).copy_(read(planes, codes.numel()))
    return kernels.for_device(codes.device).decode(codes, packed.levels, dtype)


def _planes_numpy(codes: torch.Tensor, k: int) -> torch.Tensor:
    array = codes.numpy()
    return torch.from_numpy(np.stack([np.packbits((array >> b) & 1 if b else array & 1, bitorder="little")
                                      for b in range(k)]))


def _planes_torch(codes: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`_planes_numpy` in torch operators, for any device."""
    codes = torch.nn.functional.pad(codes, (0, -codes.numel() % 8)).view(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=codes.device)
    return torch.stack([(((codes >> b) & 1) * weights).sum(1, dtype=torch.uint8) for b in range(k)])


def _codes_numpy(planes: torch.Tensor, n: int) -> torch.Tensor:
    array = planes.numpy()
    codes = np.unpackbits(array[0], count=n, bitorder="little")
    for b in range(1, planes.shape[0]):
        codes |= np.unpackbits(array[b], count=n, bitorder="little") << b
    return torch.from_numpy(codes)


def _codes_torch(planes: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    return sum((((planes[b, :, None] >> shifts) & 1) << b) for b in range(planes.shape[0])).flatten()[:n]
