"""The LIF neuron and the per-step BatchNorm as torch operators, ``torch.ops.msgcli.*``, with autograd.

Each operator runs the operations of a :class:`msgcli.snn.kernels.Kernels`, named by its ``key``
(``cpu``, ``cuda``, ``triton``, ``torch``), so ``torch.compile`` sees one opaque node with a
shape function (the ``register_fake`` functions) where eager code runs a C or Triton kernel;
the kernel families' lock, the ctypes calls and the C kernel's use of torch's generator all
run inside the node. Outputs are laid out as the kernels lay them out: like the input where
its timesteps are dense (:func:`msgcli.snn.memory.step_layout`), else contiguous.

* ``lif(current, kernels, tau, v_threshold, reset_mode, detach_reset, surrogate, alpha, mask_p,
  mask_mode, mask_fill, rescale, keep_membrane)`` -> spikes, membrane ``H`` (empty unless kept);
  its gradient is ``lif_backward``. The spike options (:class:`msgcli.snn.msg.SpikeSpec`'s
  fields) are arguments because they define the gradient.
* ``lif_backward(grad_spikes, membrane, seed, kernels, ...)`` -> input gradient. ``seed`` is the
  Triton kernel's Philox key, an int64 tensor drawn by :func:`msgcli.snn.msg.mask_seed` in the
  backward formula (so a compiled graph draws it, and a CUDA graph draws it afresh at every
  replay); on the CPU it is None and the C kernel continues torch's CPU stream as ``torch.rand``
  does, so compiled and eager code draw the same masks under the same ``torch.manual_seed``.
* ``batch_norm_per_step(x, weight, bias, eps, sync, kernels)`` -> y, mean, unbiased variance,
  invstd, count; its gradient is ``batch_norm_per_step_backward``.

What the LIF saves for backward is decided in :func:`_save_lif` and read back in
:func:`_saved_lif` alone: a leaner form (spikes as bits, the membrane recomputed from the
input) changes those two functions and the operators they call.
"""

from __future__ import annotations

import functools

import torch

from msgcli.snn import kernels
from msgcli.snn.memory import step_layout
from msgcli.snn.msg import SpikeSpec, mask_seed


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels read it: as it is where its timesteps are dense, else contiguous."""
    return x if step_layout(x) is not None else x.contiguous()


def _laid_like(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A kernel's output with the strides its shape function promised (those of ``x``)."""
    return out if out.stride() == x.stride() else torch.empty_like(x).copy_(out)


@functools.lru_cache(maxsize=None)
def _spec(surrogate: str, alpha: float, mask_p: float, mask_mode: str, mask_fill: str, rescale: bool) -> SpikeSpec:
    return SpikeSpec(surrogate, alpha, mask_p, mask_mode, mask_fill, rescale)


def spec_args(spec: SpikeSpec) -> tuple:
    """``spec`` as the operators take it: surrogate, alpha, mask_p, mask_mode, mask_fill, rescale."""
    return spec.surrogate, float(spec.alpha), float(spec.mask_p), spec.mask_mode, spec.mask_fill, bool(spec.rescale)


# --------------------------------------------------------------------------- LIF


@torch.library.custom_op("msgcli::lif", mutates_args=())
def lif(current: torch.Tensor, kernels_key: str, tau: float, v_threshold: float, reset_mode: str, detach_reset: bool,
        surrogate: str, alpha: float, mask_p: float, mask_mode: str, mask_fill: str, rescale: bool,
        keep_membrane: bool) -> tuple[torch.Tensor, torch.Tensor]:
    current = dense(current)
    spikes, membrane = kernels.by_key(kernels_key).lif_forward(current, tau, v_threshold, reset_mode, keep_membrane)
    spikes = _laid_like(current, spikes)
    return spikes, (_laid_like(current, membrane) if keep_membrane else current.new_empty(0))


@lif.register_fake
def _(current, kernels_key, tau, v_threshold, reset_mode, detach_reset, surrogate, alpha, mask_p, mask_mode, mask_fill,
      rescale, keep_membrane):
    current = dense(current)
    return torch.empty_like(current), (torch.empty_like(current) if keep_membrane else current.new_empty(0))


@torch.library.custom_op("msgcli::lif_backward", mutates_args=())
def lif_backward(grad_spikes: torch.Tensor, membrane: torch.Tensor, seed: torch.Tensor | None, kernels_key: str,
                 tau: float, v_threshold: float, reset_mode: str, detach_reset: bool, surrogate: str, alpha: float,
                 mask_p: float, mask_mode: str, mask_fill: str, rescale: bool) -> torch.Tensor:
    spec = _spec(surrogate, alpha, mask_p, mask_mode, mask_fill, rescale)
    grad = kernels.by_key(kernels_key).lif_backward(grad_spikes, membrane, tau, v_threshold, spec, reset_mode,
                                                    detach_reset, seed)
    return _laid_like(membrane, grad)


@lif_backward.register_fake
def _(grad_spikes, membrane, seed, kernels_key, tau, v_threshold, reset_mode, detach_reset, surrogate, alpha, mask_p,
      mask_mode, mask_fill, rescale):
    return torch.empty_like(membrane)


def _save_lif(ctx, inputs, output) -> None:
    """What the LIF keeps for backward: the pre-spike membrane ``H`` alone (the spikes are ``H >= V_th``)."""
    _spikes, membrane = output
    ctx.set_materialize_grads(False)  # the membrane output has no gradient: no zeros for it
    ctx.save_for_backward(membrane)
    ctx.options = inputs[1:12]  # kernels_key .. rescale


def _saved_lif(ctx) -> torch.Tensor:
    """The membrane ``H`` that :func:`_save_lif` kept."""
    (membrane,) = ctx.saved_tensors
    return membrane


def _lif_grad(ctx, grad_spikes, _grad_membrane):
    membrane = _saved_lif(ctx)
    kernels_key, tau, v_threshold, reset_mode, detach_reset, *spec = ctx.options
    mask_p = spec[2]
    seed = mask_seed(membrane.device) if membrane.is_cuda and mask_p > 0 else None
    grad = torch.ops.msgcli.lif_backward(grad_spikes, membrane, seed, kernels_key, tau, v_threshold, reset_mode,
                                         detach_reset, *spec)
    return (grad,) + (None,) * 12


lif.register_autograd(_lif_grad, setup_context=_save_lif)


# --------------------------------------------------------------------------- per-timestep BatchNorm


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the ``[T, C]`` statistics of ``x``: float64 on the CPU (the C kernels' sums) and for float64
    inputs, else float32."""
    return torch.float64 if x.device.type == "cpu" or x.dtype == torch.float64 else torch.float32


def _weight_bias(weight: torch.Tensor | None, bias: torch.Tensor | None, C: int, like: torch.Tensor):
    w = weight.detach().to(like.dtype) if weight is not None else torch.ones(C, dtype=like.dtype, device=like.device)
    b = bias.detach().to(like.dtype) if bias is not None else torch.zeros(C, dtype=like.dtype, device=like.device)
    return w, b


def affine(weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor):
    """``scale, shift`` ``[T, C]`` with ``y = x * scale + shift`` the normalised, weighted and shifted ``x``."""
    w, b = _weight_bias(weight, bias, mean.shape[-1], mean)
    scale = w * invstd
    return scale, b - mean * scale


def normalise(x: torch.Tensor, weight, bias, eps: float, sync: bool, ops: kernels.Kernels):
    """Per-(timestep, channel) BatchNorm of ``x [T, B, C, ...]`` on ``ops``, no autograd: ``y``, the batch mean,
    the unbiased variance (for the running statistics), ``1/std`` and the count of values per statistic (a
    0-d tensor). The body of ``batch_norm_per_step``, and what :mod:`msgcli.snn.layers.recompute` runs."""
    x = dense(x)
    mean, unbiased, invstd, total = batch_statistics(x, eps, sync, ops)
    y = _laid_like(x, ops.bn_apply(x, *affine(weight, bias, mean, invstd)))
    return y, mean, unbiased, invstd, total


def batch_statistics(x: torch.Tensor, eps: float, sync: bool, ops: kernels.Kernels):
    """The statistics of :func:`normalise` for a dense ``x``: the batch mean, the unbiased variance, ``1/std``
    and the count of values per statistic."""
    count = x.numel() // (x.shape[0] * x.shape[2])
    mean, var = ops.bn_stats(x)
    stat = stat_dtype(x)
    mean, var = mean.to(stat), var.to(stat)
    if sync:
        from msgcli.snn.layers.sync import all_reduce_stats  # layers import this module

        mean, var, total = all_reduce_stats(mean, var, count)
    else:
        total = mean.new_full((), float(count))  # a fill on the device, no host copy (capturable in a CUDA graph)
    invstd = torch.rsqrt(var + eps)
    return mean, var * (total / (total - 1)), invstd, total


def normalise_backward(grad_y, x, weight, mean, invstd, count, sync: bool, ops: kernels.Kernels,
                       input_grad: bool = True, per_step: bool = False, out: torch.Tensor | None = None):
    """The gradients of :func:`normalise` for x, weight and bias (the last two in the weight's dtype, zeros
    ``[C]`` without a weight; ``grad_x`` None unless ``input_grad``). ``per_step``: the weight's and bias's
    gradients as their ``[T, C]`` terms in the statistics' dtype, for the caller to sum over T (chunks of
    timesteps concatenated first give the very sums of one call). Under ``sync`` the sums are all-reduced
    for the input gradient; the weight and bias gradients stay this rank's, as DDP then averages them. ``out``
    (laid out like ``x``, possibly ``grad_y`` itself): where ``grad_x`` is written."""
    x = dense(x)
    grad_w, grad_b, coefficients = normalise_backward_from_sums(
        *ops.bn_backward_sums(grad_y, x, mean), weight, mean, invstd, count, sync, per_step, input_grad)
    if not input_grad:
        return None, grad_w, grad_b
    grad_x = ops.bn_backward_input(grad_y, x, *coefficients, out)
    return (grad_x if out is not None else _laid_like(x, grad_x)), grad_w, grad_b


def normalise_backward_from_sums(sdy, sdyx, weight, mean, invstd, count, sync: bool, per_step: bool = False,
                                 input_grad: bool = True):
    """:func:`normalise_backward` from the sums of ``grad_y`` and of ``grad_y * (x - mean)`` per row of ``mean``
    (``bn_backward_sums``, here added up over parts of the batch where the caller made them so): the weight's and
    bias's gradients and the ``(q, a, r)`` that ``bn_backward_input`` takes (None unless ``input_grad``)."""
    sdy, sdyx = sdy.to(mean.dtype), sdyx.to(mean.dtype)
    like = weight if weight is not None else mean
    grad_w, grad_b = sdyx * invstd, sdy
    if not per_step:
        grad_w, grad_b = grad_w.sum(0).to(like.dtype), grad_b.sum(0).to(like.dtype)
    if not input_grad:
        return grad_w, grad_b, None
    if sync:
        from msgcli.snn.layers.sync import all_reduce_sums  # layers import this module

        sdy, sdyx = all_reduce_sums(sdy, sdyx)
    w, _ = _weight_bias(weight, None, mean.shape[-1], mean)
    a = w * invstd
    return grad_w, grad_b, (mean, invstd * invstd * sdyx / count, a, a * sdy / count)


@torch.library.custom_op("msgcli::batch_norm_per_step", mutates_args=())
def batch_norm_per_step(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                        sync: bool, kernels_key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """Training-mode BatchNorm with statistics per (timestep, channel); see :mod:`msgcli.snn.layers.batchnorm`."""
    return normalise(x, weight, bias, eps, sync, kernels.by_key(kernels_key))


@batch_norm_per_step.register_fake
def _(x, weight, bias, eps, sync, kernels_key):
    x = dense(x)
    stats = x.new_empty((x.shape[0], x.shape[2]), dtype=stat_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(stats), x.new_empty((), dtype=stats.dtype)


@torch.library.custom_op("msgcli::batch_norm_per_step_backward", mutates_args=())
def batch_norm_per_step_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                                 invstd: torch.Tensor, count: torch.Tensor, sync: bool,
                                 kernels_key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`normalise_backward` as an operator."""
    return normalise_backward(grad_y, x, weight, mean, invstd, count, sync, kernels.by_key(kernels_key))


@batch_norm_per_step_backward.register_fake
def _(grad_y, x, weight, mean, invstd, count, sync, kernels_key):
    like = weight if weight is not None else mean
    C = x.shape[2]
    return torch.empty_like(dense(x)), like.new_empty(C), like.new_empty(C)


def _save_batch_norm(ctx, inputs, output) -> None:
    x, weight, _bias, _eps, sync, kernels_key = inputs
    _y, mean, _var, invstd, count = output
    ctx.set_materialize_grads(False)  # the statistics have no gradient: no zeros for them
    ctx.save_for_backward(x, weight, mean, invstd, count)
    ctx.options = sync, kernels_key, weight is not None


def _batch_norm_grad(ctx, grad_y, _grad_mean, _grad_var, _grad_invstd, _grad_count):
    x, weight, mean, invstd, count = ctx.saved_tensors
    sync, kernels_key, affine = ctx.options
    grad_x, grad_w, grad_b = torch.ops.msgcli.batch_norm_per_step_backward(grad_y, x, weight, mean, invstd, count,
                                                                           sync, kernels_key)
    return grad_x, (grad_w if affine else None), (grad_b if affine else None), None, None, None


batch_norm_per_step.register_autograd(_batch_norm_grad, setup_context=_save_batch_norm)
