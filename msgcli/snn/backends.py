"""Which implementation runs the LIF time loop and the per-step BatchNorm for a tensor.

CPU tensors: the C kernels of :mod:`msgcli.snn.cpu_kernels` (built at first use) where they
build and take the tensor. CUDA tensors: the Triton kernels of :mod:`msgcli.snn.triton_lif`
where triton imports and its driver starts. Everywhere else, and after any of these fails to
build, the callers' torch operators, which compute the same results. A Triton kernel that
cannot be built for the GPU turns Triton off for the rest of the process, with one warning.
"""

from __future__ import annotations

import warnings

import torch

from msgcli.snn import cpu_kernels
from msgcli.snn.memory import pool


def cpu(x: torch.Tensor) -> cpu_kernels.CpuKernels | None:
    """The C kernels for a CPU tensor ``x`` (built at first use), or None: not on the CPU, or no kernels.

    Callers check that the kernels take ``x`` (dtype, layout) themselves.
    """
    return cpu_kernels.get() if x.device.type == "cpu" else None


def triton():
    """The Triton kernels' module where triton imports, CUDA is there and Triton's driver starts, else None.

    Checked once per process, at first use; :func:`disable_triton` turns it off for good.
    """
    global _TRITON
    if _TRITON is False:
        try:
            from msgcli.snn import triton_lif
        except ImportError:
            triton_lif = None
        _TRITON = triton_lif if triton_lif is not None and triton_lif.AVAILABLE else None
        if _TRITON is not None:
            err = _TRITON.driver_error()
            if err is not None:
                disable_triton(err)
    return _TRITON


_TRITON = False  # False: not tried yet
_TRITON_WARNED = False


def disable_triton(err: Exception) -> None:
    """Run the LIF and BatchNorm on torch operators on CUDA for the rest of the process, because Triton
    could not build a kernel (``err`` names it); warns once, loudly."""
    global _TRITON, _TRITON_WARNED
    _TRITON = None
    if not _TRITON_WARNED:
        _TRITON_WARNED = True
        warnings.warn(f"msgsnn: {err}. The LIF and BatchNorm layers now run on torch operators on CUDA for the rest "
                      "of this process: same results, slower steps. Please report this with your GPU and the torch "
                      "and triton versions; backend='fused' chooses torch operators from the start.",
                      RuntimeWarning, stacklevel=2)


def triton_or_torch(triton_fn, torch_fn, strict: bool):
    """``triton_fn``, or ``torch_fn`` (same arguments, same result) once Triton is off or cannot build the kernel.

    ``strict`` (``backend='triton'``) runs ``triton_fn`` whatever happens and lets its errors propagate.
    Only a build failure falls back: an error while running a kernel (CUDA out of memory, say) propagates.
    """
    def run(*args, **kwargs):
        if strict:
            return triton_fn(*args, **kwargs)
        kernels = triton()
        if kernels is not None:
            try:
                return triton_fn(*args, **kwargs)
            except kernels.TritonBuildError as err:
                disable_triton(err)
        return torch_fn(*args, **kwargs)

    return run


def lif_kernels(x: torch.Tensor):
    """The Triton kernels when ``x`` is a CUDA tensor they take, else None."""
    kernels = triton() if x.is_cuda else None
    return kernels if kernels is not None and kernels.supports(x) else None


def bn_kernels(x: torch.Tensor):
    """Fused per-step BatchNorm kernels for ``x``: the C kernels on CPU, Triton on CUDA, else None."""
    if x.device.type == "cpu":
        kernels = cpu_kernels.get()
        return kernels if kernels is not None and cpu_kernels.supports(x) else None
    if x.is_cuda:
        kernels = triton()
        return kernels if kernels is not None and kernels.bn_supports(x) else None
    return None


def call(kernels, name: str, *args):
    """``kernels.<name>(*args)``, or None where torch operators must do it instead: no kernels, or Triton's
    that are switched off or cannot build this one for the GPU (see :func:`disable_triton`)."""
    if kernels is None:
        return None
    build_error = getattr(kernels, "TritonBuildError", None)
    if build_error is None:  # the C kernels
        return getattr(kernels, name)(*args)
    if triton() is None:
        return None
    try:
        return getattr(kernels, name)(*args)
    except build_error as err:
        disable_triton(err)
        return None


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like the dense ``x``: from the pool of recycled buffers on CPU."""
    return pool.empty_like(x) if x.device.type == "cpu" else torch.empty_like(x)
