"""How the spiking layers' activations sit in memory: the per-timestep layout every kernel reads,
and the pool that recycles the large CPU buffers the kernels write.

Layouts. A ``[T, B, C, L]`` tensor (``L`` = the product of the trailing dims) whose timesteps
are dense blocks of ``N = B*C*L`` elements is stored either contiguous (``ncl``) or
channels-last (``nlc``: ``[T, B, L, C]`` in memory, what channels-last convolutions on the
folded batch produce).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch


def step_layout(x: torch.Tensor) -> str | None:
    """``ncl`` if each timestep of ``x [T, B, C, ...]`` is contiguous, ``nlc`` if channels-last, else None."""
    if x.is_contiguous():
        return "ncl"
    if x.dim() == 5:
        T, B, C, H, W = x.shape
        expected = (B * H * W * C, H * W * C, 1, W * C, C)
        if all(s == e or n == 1 for s, e, n in zip(x.stride(), expected, x.shape)):
            return "nlc"
    return None


class BufferPool:
    """Recycles the large output buffers of the CPU kernels instead of returning them to the OS.

    A fresh large CPU tensor costs a page fault per 4 KiB on first touch (glibc maps
    big blocks and unmaps them on free), about as much as the kernel that fills it.
    Buffers handed out here come back to the pool when torch frees their storage (the
    storage keeps a small owner object alive whose finaliser returns the block) and
    serve the next request of the same size: evaluation and inference, and the
    chunks inside one operator's forward, reuse their blocks. Training does not keep
    any: blocks freed while autograd records a graph (a training forward) or runs a
    backward go back to the system, since blocks kept across a step stay resident
    through the next step's forward and backward and raise its peak (VGGSNN on the
    CPU: 0.83x the ReLU network's activation memory with them, 0.44x without, at the
    same step time; ``benchmarks/memory.py``). Like CUDA's caching allocator, free
    blocks stay resident; :meth:`clear` drops them, and at most ``limit`` bytes are
    kept.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.cached = 0
        self._free: dict[int, list[torch.Tensor]] = {}
        self._types: dict[int, type] = {}
        self._lock = threading.Lock()

    def _lease_type(self, nbytes: int) -> type:
        kind = self._types.get(nbytes)
        if kind is None:
            pool = self

            def release(lease) -> None:
                block = lease.__dict__.pop("block", None)
                if block is not None:
                    pool._give_back(block)

            kind = type(f"_Lease{nbytes}", (ctypes.c_uint8 * nbytes,), {"__del__": release})
            self._types[nbytes] = kind
        return kind

    def _give_back(self, block: torch.Tensor) -> None:
        nbytes = block.numel()
        if torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return  # freed while a graph is recorded or autograd's backward runs: training keeps nothing
        with self._lock:
            if self.cached + nbytes <= self.limit:
                self._free.setdefault(nbytes, []).append(block)
                self.cached += nbytes

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """Uninitialised tensor with the shape, strides and dtype of the dense CPU tensor ``x``."""
        return self.empty_strided(x.shape, x.stride(), x.dtype)

    def empty_strided(self, shape, stride, dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised dense CPU tensor; ``shape``/``stride`` must cover their storage exactly."""
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * dtype.itemsize
        if nbytes < self.MIN_BYTES:
            return torch.empty_strided(shape, stride, dtype=dtype)
        with self._lock:
            blocks = self._free.get(nbytes)
            block = blocks.pop() if blocks else None
            if block is not None:
                self.cached -= nbytes
        if block is None:
            block = torch.empty(nbytes, dtype=torch.uint8)
        lease = self._lease_type(nbytes).from_address(block.data_ptr())
        lease.block = block
        raw = torch.from_numpy(np.frombuffer(lease, dtype=np.uint8))
        return raw.view(dtype).as_strided(shape, stride)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self.cached = 0


def _pool_limit() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(os.environ.get("MSGSNN_CPU_POOL_MB", total // 4 >> 20)) << 20


pool = BufferPool(_pool_limit())


def empty_strided(shape, stride, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor whose ``shape``/``stride`` cover its storage exactly: from :data:`pool` on the CPU."""
    if torch.device(device).type == "cpu":
        return pool.empty_strided(shape, stride, dtype)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; None elsewhere
    except OSError:
        return None


_TRIM = _malloc_trim()


def return_free_memory() -> None:
    """Hand the free pages of the C heap back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc serves blocks below its mmap threshold (which rises to 32 MiB as large blocks are freed) from a
    heap that keeps their pages resident after they are freed, so a backward that frees one layer's tensors
    and allocates the next layer's peaks at both. Recomputed conv-BN-LIF blocks call it before each backward, at
    the cost of the page faults of touching those pages again (BatchNorm-LIF pairs do not: there it raised the
    peak).
    """
    if _TRIM is not None:
        _TRIM(0)


def empty_cache() -> None:
    """Return the free buffers kept by the fused CPU kernels to the system."""
    pool.clear()


