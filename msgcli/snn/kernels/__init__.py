"""The operations of the spiking layers, and which implementation runs them on each device.

Each operation has one entry point per device, a method of :class:`Kernels` (``[T, B, C, ...]``
tensors; ``[T, C]`` statistics):

* ``lif_forward(current, tau, v_threshold, reset_mode, keep_membrane)`` -> spikes, membrane ``H`` or None
* ``lif_backward(grad_spikes, membrane, tau, v_threshold, spec, reset_mode, detach_reset)`` -> input gradient
* ``lif_chunk_forward(current, state, ...)`` -> spikes, ``H`` or None; ``lif_chunk_backward(grad_spikes, membrane,
  grad_state, ...)`` -> input gradient: the same over a chunk of timesteps, the membrane (its gradient)
  carried in and out of the chunk by ``state`` (``grad_state``), updated in place
* ``bn_lif_chunk_forward(x, scale, shift, state, ...)`` -> spikes of the LIF fed ``x * scale + shift``;
  ``bn_lif_chunk_backward(grad_spikes, x, scale, shift, state, grad_state, ...)`` -> that current's gradient:
  a BatchNorm-LIF pair from the BatchNorm's input alone (``state`` read only in backward)
* ``bn_stats(x)`` -> mean, biased variance; ``bn_apply(x, scale, shift)`` -> ``x * scale + shift``
* ``bn_backward_sums(dy, x, mean)`` -> sums of ``dy`` and ``dy * (x - mean)``;
  ``bn_backward_input(dy, x, mean, q, a, r, out)`` -> ``(dy - (x - mean) q) a - r`` (into ``out`` if given)
* ``encode(x, levels)`` -> uint8 codes of ``x * levels``; ``decode(codes, levels, dtype)`` -> ``x``
* ``pack_bits(x, levels)`` -> bit planes of those codes in ``x``'s memory order;
  ``unpack_bits(planes, shape, stride, levels, dtype)`` -> ``x`` again, laid out by ``stride``

Three implementations, each with every operation: torch operators (:mod:`.torch_ops`, any
device, the yardstick), the C kernels (:mod:`.cpu`, CPU tensors, built at first use) and the
Triton kernels (:mod:`.cuda`, CUDA tensors). The BatchNorm-LIF pair (``bn_lif_chunk_*``) is one kernel in C
and in Triton; on torch operators :class:`Kernels` composes it from ``bn_apply`` and the LIF's chunk
operations, with the same numbers. :func:`for_device` gives the :class:`Kernels` of a
device: ``CPU`` (C kernels), ``CUDA`` (Triton), ``TORCH`` elsewhere.

The fallback rule, here and nowhere else. A family of fused kernels (C, Triton) that cannot be
had (no C compiler, a failed build or self-test, Triton's driver not starting, or a Triton
kernel that cannot be built for this GPU) is off for the rest of the process, with one loud
warning naming the kernel and the error; torch operators then run, with the same results. A
call the fused kernels do not take (a dtype, a layout, a registered surrogate) runs on torch
operators too. An error while running a kernel (a CUDA out-of-memory, say) propagates.
``MSGSNN_CPU_KERNELS=0`` switches the C kernels off.

The layers do not call these methods directly but the torch operators of :mod:`.ops`
(``torch.ops.msgcli.*``), which name their :class:`Kernels` by :attr:`Kernels.key`: to
``torch.compile`` each operation is then one opaque node, and the lock, the ctypes calls and
the generator reads of this module run inside it, never in traced code.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable

import torch

from msgcli.snn.kernels import cpu, torch_ops


class Family:
    """One family of fused kernels, loaded at first use by ``load`` (None: they do not apply here; an
    exception: they cannot be had), and off for the rest of the process after :meth:`turn_off`.

    A family's kernels are an object with the operations of this module, ``takes(op, *args)`` (do
    they run this call?) and ``build_errors`` (the exceptions of a kernel that cannot be built).
    """

    def __init__(self, name: str, load: Callable[[], object | None], consequence: str) -> None:
        self.name, self._load, self.consequence = name, load, consequence
        self._kernels = None
        self._loaded = False
        self._warned = False
        self._lock = threading.Lock()

    def get(self):
        """The kernels, or None: they do not apply here, or are off."""
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    try:
                        self._kernels = self._load()
                    except Exception as err:  # noqa: BLE001 - whatever stops them, torch operators run instead
                        self.turn_off(err)
                    self._loaded = True
        return self._kernels

    def turn_off(self, err: Exception) -> None:
        """Torch operators instead of these kernels for the rest of the process, because of ``err`` (which names
        the kernel); warns once, loudly."""
        self._kernels, self._loaded = None, True
        if not self._warned:
            self._warned = True
            warnings.warn(f"msgsnn: {err}. {self.consequence}", RuntimeWarning, stacklevel=4)


def _load_c_kernels():
    if os.environ.get("MSGSNN_CPU_KERNELS", "1") in ("0", "false", "off", "no"):
        return None
    return cpu.build()


def _load_triton_kernels():
    try:
        from msgcli.snn.kernels import cuda
    except ImportError:
        return None
    if not cuda.AVAILABLE:  # no triton package, or no CUDA
        return None
    err = cuda.driver_error()
    if err is not None:
        raise err
    return cuda


C_KERNELS = Family("C kernels", _load_c_kernels,
                   "The fused CPU kernels are off: torch operators run instead (same results, slower steps).")
TRITON_KERNELS = Family("Triton kernels", _load_triton_kernels,
                        "The LIF and BatchNorm layers now run on torch operators on CUDA for the rest of this process: "
                        "same results, slower steps. Please report this with your GPU and the torch and triton "
                        "versions; backend='fused' chooses torch operators from the start.")


_BY_KEY: dict[str, "Kernels"] = {}


def by_key(key: str) -> "Kernels":
    """The :class:`Kernels` whose :attr:`Kernels.key` is ``key`` (how the torch operators of :mod:`.ops` name them)."""
    return _BY_KEY[key]


class Kernels:
    """The operations on one kind of device: on the ``fused`` family's kernels where they take the call, else on
    torch operators (the rule of this module's docstring).

    ``strict`` (``LIF(backend='triton')``): the fused kernels or an error, never torch operators; a kernel that
    cannot be built raises, and a call they do not take raises ValueError.
    """

    def __init__(self, name: str, fused: Family | None = None, strict: bool = False) -> None:
        self.name, self.fused, self.strict = name, fused, strict
        self.key = name if name not in _BY_KEY else f"{name}#{len(_BY_KEY)}"
        _BY_KEY[self.key] = self

    def __repr__(self) -> str:
        return f"Kernels({self.name!r})"

    def fused_kernels(self):
        """The fused kernels that calls would reach now, or None (torch operators)."""
        return self.fused.get() if self.fused is not None else None

    def _run(self, op: str, *args, fallback: Callable | None = None):
        """``op`` on the fused kernels where they take the call, else on ``fallback`` (default: torch's ``op``)."""
        kernels = self.fused_kernels()
        if kernels is not None and kernels.takes(op, *args):
            try:
                return getattr(kernels, op)(*args)
            except kernels.build_errors as err:
                if self.strict:
                    raise
                self.fused.turn_off(err)
        elif self.strict:
            raise ValueError(f"backend: '{self.name}' has no kernel for this call ({op}); it needs a CUDA tensor of "
                             "float32/float16/bfloat16, the triton package and a built-in surrogate; use 'auto' to "
                             "fall back to torch operators")
        return (fallback or getattr(torch_ops, op))(*args)

    def lif_forward(self, current: torch.Tensor, tau: float, v_threshold: float, reset_mode: str,
                    keep_membrane: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Spikes ``[T, B, ...]`` of the time loop (no autograd) and, if asked, the pre-spike membrane ``H``."""
        return self._run("lif_forward", current, tau, v_threshold, reset_mode, keep_membrane)

    def lif_backward(self, grad_spikes: torch.Tensor, membrane: torch.Tensor, tau: float, v_threshold: float, spec,
                     reset_mode: str, detach_reset: bool, seed: torch.Tensor | None = None) -> torch.Tensor:
        """The time loop's input gradient from the saved ``H``, the MSG mask of ``spec`` drawn afresh: the Triton
        kernel from ``seed`` (an int64 tensor on the device, drawn afresh when None), the C kernel and torch
        operators from torch's generator, continuing its stream as ``torch.rand`` would."""
        return self._run("lif_backward", grad_spikes, membrane, tau, v_threshold, spec, reset_mode, detach_reset, seed)

    def lif_chunk_forward(self, current: torch.Tensor, state: torch.Tensor, tau: float, v_threshold: float,
                          reset_mode: str, keep_membrane: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`lif_forward` of a chunk of timesteps, starting from the membrane ``state`` (laid out like
        ``current[0]``, in :func:`carry_dtype`) and leaving the chunk's last membrane there."""
        return self._run("lif_chunk_forward", current, state, tau, v_threshold, reset_mode, keep_membrane)

    def lif_chunk_backward(self, grad_spikes: torch.Tensor, membrane: torch.Tensor, grad_state: torch.Tensor,
                           tau: float, v_threshold: float, spec, reset_mode: str, detach_reset: bool) -> torch.Tensor:
        """:meth:`lif_backward` of a chunk of timesteps (later chunks first, so the MSG masks are the whole
        sequence's), the membrane's gradient carried in and out by ``grad_state``."""
        return self._run("lif_chunk_backward", grad_spikes, membrane, grad_state, tau, v_threshold, spec, reset_mode,
                         detach_reset)

    def fuses_bn_lif(self, x: torch.Tensor) -> bool:
        """Whether :meth:`bn_lif_chunk_forward` and its backward run ``x`` (the BatchNorm's input) in one kernel."""
        kernels = self.fused_kernels()
        return kernels is not None and hasattr(kernels, "fuses_bn_lif") and kernels.fuses_bn_lif(x)

    def _fuses(self, op: str, *args) -> bool:
        kernels = self.fused_kernels()
        return kernels is not None and hasattr(kernels, op) and kernels.takes(op, *args)

    def bn_lif_chunk_forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, state: torch.Tensor,
                             tau: float, v_threshold: float, reset_mode: str, bn_ops: "Kernels | None" = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
        """Spikes of :meth:`lif_chunk_forward` fed ``bn_ops`` (default: these kernels)' :meth:`bn_apply` of ``x``:
        in one kernel where the fused family has it and both run here (the current and the membrane never
        written out), else those two operations. Written into ``out`` (laid out like ``x``) when given."""
        bn_ops = bn_ops or self

        def composed(x, scale, shift, state, tau, v_threshold, reset_mode, out):
            spikes = self.lif_chunk_forward(bn_ops.bn_apply(x, scale, shift), state, tau, v_threshold, reset_mode,
                                            False)[0]
            return spikes if out is None else out.copy_(spikes)

        args = x, scale, shift, state, tau, v_threshold, reset_mode, out
        if bn_ops is self and self._fuses("bn_lif_chunk_forward", x, scale, shift, state):
            return self._run("bn_lif_chunk_forward", *args, fallback=composed)  # composed if it cannot be built
        return composed(*args)

    def bn_lif_chunk_backward(self, grad_spikes: torch.Tensor, x: torch.Tensor, scale: torch.Tensor,
                              shift: torch.Tensor, state: torch.Tensor, grad_state: torch.Tensor, tau: float,
                              v_threshold: float, spec, reset_mode: str, detach_reset: bool,
                              bn_ops: "Kernels | None" = None, out: torch.Tensor | None = None,
                              key: torch.Tensor | None = None, after: int = 0) -> torch.Tensor:
        """The gradient of the current of :meth:`bn_lif_chunk_forward` started from ``state`` (not changed), the
        membrane's gradient carried by ``grad_state``: the membrane recomputed inside one kernel where the fused
        family has it, else by :meth:`lif_chunk_forward`. The same numbers and MSG masks either way. Written into
        ``out`` (laid out like ``x``) when given. A chunk followed by ``after`` timesteps passes the sequence's
        :meth:`mask_key` as ``key``."""
        bn_ops = bn_ops or self

        def composed(grad_spikes, x, scale, shift, state, grad_state, tau, v_threshold, spec, reset_mode,
                     detach_reset, out, key, after):
            y = bn_ops.bn_apply(x, scale, shift)
            _, membrane = self.lif_chunk_forward(y, state.clone(), tau, v_threshold, reset_mode, True)
            del y
            grad = self.lif_chunk_backward(grad_spikes, membrane, grad_state, tau, v_threshold, spec, reset_mode,
                                           detach_reset)
            return grad if out is None else out.copy_(grad)

        args = (grad_spikes, x, scale, shift, state, grad_state, tau, v_threshold, spec, reset_mode, detach_reset, out,
                key, after)
        if bn_ops is self and self._fuses("bn_lif_chunk_backward", *args[:9]):
            return self._run("bn_lif_chunk_backward", *args, fallback=composed)
        return composed(*args)

    def gradient_in_place(self) -> bool:
        """Whether :meth:`bn_lif_chunk_backward` may be given ``grad_spikes`` itself as ``out``: the C kernel reads
        each entry before writing its gradient there and torch operators copy a finished result in, but the Triton
        kernel uses ``out`` as its work space first."""
        return getattr(self.fused_kernels(), "gradient_in_place", True)

    def mask_key(self, like: torch.Tensor, spec) -> torch.Tensor | None:
        """One key for the MSG masks of a LIF sequence that :meth:`bn_lif_chunk_backward` runs in chunks, where the
        fused kernels draw masks from keys (Triton); None where they come from torch's generator (C kernels, torch
        operators), whose stream the chunks, latest first, continue as one call would."""
        kernels = self.fused_kernels()
        return kernels.mask_key(like, spec) if kernels is not None and hasattr(kernels, "mask_key") else None

    def bn_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance per (t, c) of a dense ``x [T, B, C, ...]``: ``[T, C]`` each."""
        return self._run("bn_stats", x)

    def bn_apply(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``x * scale[t, c] + shift[t, c]``, laid out like ``x``."""
        return self._run("bn_apply", x, scale, shift)

    def bn_backward_sums(self, dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
        """Sums per (t, c) of ``dy`` and of ``dy * (x - mean)``: ``[T, C]`` each."""
        return self._run("bn_backward_sums", dy, x, mean)

    def bn_backward_input(self, dy, x, mean, q, a, r, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(dy - (x - mean) * q) * a - r`` per (t, c), laid out like ``x``: into ``out`` (laid out like ``x``; it
        may be ``dy`` itself) when given."""
        return self._run("bn_backward_input", dy, x, mean, q, a, r, out)

    def encode(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """uint8 codes ``x * levels`` of a tensor whose entries are multiples of ``1 / levels`` in [0, 255 / levels]."""
        return self._run("encode", x, levels)

    def decode(self, codes: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
        """``codes / levels`` as ``dtype``."""
        return self._run("decode", codes, levels, dtype)

    def pack_bits(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """uint8 ``[bits(levels), ceil(n / 8)]``: bit ``i`` of plane ``b`` is bit ``b`` of the code of a dense ``x``'s
        ``i``-th entry in memory order; one kernel where the fused family has it, else :meth:`encode` and planes."""
        def composed(x, levels):
            codes = self.encode(x, levels)
            return torch_ops.bit_planes(_memory_order(codes), int(levels).bit_length())

        return self._run("pack_bits", x, levels, fallback=composed)

    def unpack_bits(self, planes: torch.Tensor, shape: tuple, stride: tuple, levels: int,
                    dtype: torch.dtype) -> torch.Tensor:
        """The ``dtype`` tensor of ``shape`` and (dense) ``stride`` whose codes :meth:`pack_bits` packed."""
        def composed(planes, shape, stride, levels, dtype):
            codes = torch.empty_strided(shape, stride, dtype=torch.uint8, device=planes.device)
            _memory_order(codes).copy_(torch_ops.codes_of(planes, codes.numel()))
            return self.decode(codes, levels, dtype)

        return self._run("unpack_bits", planes, shape, stride, levels, dtype, fallback=composed)


CPU = Kernels("cpu", C_KERNELS)
CUDA = Kernels("cuda", TRITON_KERNELS)
TRITON = Kernels("triton", TRITON_KERNELS, strict=True)
TORCH = Kernels("torch")


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """The entries of a dense ``x`` as a 1-D view in the order they sit in memory."""
    return x.as_strided((x.numel(),), (1,), x.storage_offset())


def for_device(device: torch.device) -> Kernels:
    """The kernels of ``device``: C on the CPU, Triton on CUDA, torch operators elsewhere."""
    return CPU if device.type == "cpu" else CUDA if device.type == "cuda" else TORCH


def carry_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type of the carried membrane of a ``dtype`` sequence: what the LIF kernels compute in."""
    return cpu.state_dtype(dtype)


def triton_batchnorm() -> bool:
    """``MSGSNN_TRITON_BN=1``: per-step BatchNorm on CUDA runs the Triton kernels instead of torch's ``batch_norm``."""
    return os.environ.get("MSGSNN_TRITON_BN", "0") not in ("0", "", "false", "off", "no")
