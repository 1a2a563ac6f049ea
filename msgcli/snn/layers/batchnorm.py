"""BatchNorm over ``[T, B, C, ...]``: statistics per timestep (``per_step``, what the release computes by
calling its network once per timestep) or over all T*B samples (``joint``).

Training-mode per-step statistics run on one of two paths. On CUDA, torch's own ``batch_norm``
(cuDNN) normalises a ``[B, T*C, ...]`` copy of the input whose channels are the (timestep,
channel) pairs, with the affine parameters repeated over T (:func:`_timesteps_as_channels`):
fewer custom kernels to trust, until a GPU measures the Triton BatchNorm kernels faster.
``MSGSNN_TRITON_BN=1`` selects those instead (``benchmarks/gpu.sh`` measures both). Everywhere
else, and under synchronisation, the operator ``torch.ops.msgcli.batch_norm_per_step``
(:mod:`msgcli.snn.kernels.ops`, with its own autograd) runs the device's ``bn_*`` operations of
:mod:`msgcli.snn.kernels` (C kernels on CPU); it saves only its input and ``[T, C]`` statistics,
like the native BatchNorm, and takes two passes forward and two backward. Either way the running statistics
receive T successive momentum updates per call.

Under data parallelism, :func:`sync_batchnorm` makes every TemporalBatchNorm reduce its sums
over the processes (:mod:`.sync`), in either mode.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from msgcli.snn import kernels, options
from msgcli.snn.kernels import ops  # noqa: F401 - registers torch.ops.msgcli
from msgcli.snn.layers.sync import synchronised


def _check_count(x: torch.Tensor, sync: bool) -> int:
    """Values per (timestep, channel) of ``x [T, B, C, ...]``; more than one are needed to train on this rank alone."""
    count = x.numel() // (x.shape[0] * x.shape[2])
    if count <= 1 and not sync:
        raise ValueError(f"TemporalBatchNorm: expected more than 1 value per channel and timestep when training, got input of shape {tuple(x.shape)}")
    return count


def _batchnorm_kernels(device: torch.device) -> kernels.Kernels:
    """The ``bn_*`` operations of per-step BatchNorm: the device's, but on CUDA torch operators unless
    ``MSGSNN_TRITON_BN=1`` selects the Triton kernels."""
    if device.type == "cuda" and not kernels.triton_batchnorm():
        return kernels.TORCH
    return kernels.for_device(device)


def _torch_batch_norm_applies(x: torch.Tensor, sync: bool) -> bool:
    """Per-step statistics by :func:`_timesteps_as_channels`: on CUDA, unsynchronised, Triton's BatchNorm not selected."""
    return x.is_cuda and not sync and not kernels.triton_batchnorm()


def _timesteps_as_channels(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    """Per-step BatchNorm of ``x [T, B, C, ...]`` as torch's ``batch_norm`` over ``[B, T*C, ...]`` (a copy), the
    weight and bias repeated over T; autograd differentiates it.

    Returns ``y`` laid out like ``x``, and the batch mean and unbiased variance ``[T, C]``: ``batch_norm``
    writes them into zeroed running buffers at momentum 1.
    """
    T, B, C = x.shape[:3]
    _check_count(x, sync=False)
    folded = x.transpose(0, 1).reshape(B, T * C, *x.shape[3:])
    if weight is not None:
        stat = weight.dtype
    else:
        stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mean = torch.zeros(T * C, dtype=stat, device=x.device)
    var = torch.zeros(T * C, dtype=stat, device=x.device)
    w = None if weight is None else weight.repeat(T)
    b = None if bias is None else bias.repeat(T)
    y = F.batch_norm(folded, mean, var, w, b, training=True, momentum=1.0, eps=eps)
    out = torch.empty_like(x)
    out.copy_(y.view(B, T, C, *x.shape[3:]).transpose(0, 1))
    return out, mean.view(T, C), var.view(T, C)


class TemporalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over ``[T, B, C, ...]`` with one set of affine parameters and running stats.

    In ``per_step`` mode, training normalises each timestep with its own batch
    statistics, and the running statistics receive T successive momentum
    updates per call, as T calls of the release's shared BatchNorm would.
    Evaluation uses the running statistics in both modes. ``sync=True``: in
    training, the statistics are those of the union of the batches of every
    process of the default ``torch.distributed`` group (a no-op in one process).
    """

    def __init__(self, num_features: int, mode: str = "per_step", eps: float = 1e-5, momentum: float = 0.1,
                 sync: bool = False) -> None:
        options.check("bn_mode", mode, options.BN_MODES)
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.mode = mode
        self.sync = sync

    def _check_input_dim(self, x: torch.Tensor) -> None:
        # Also called by _BatchNorm.forward on the folded [T*B, C, ...] batch, so one dim less.
        if x.dim() < 2:
            raise ValueError(f"TemporalBatchNorm input: expected [T, B, C, ...], got shape {tuple(x.shape)}")

    def extra_repr(self) -> str:
        sync = ", sync=True" if self.sync else ""
        return f"{self.num_features}, mode={self.mode}, eps={self.eps}, momentum={self.momentum}{sync}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3:
            raise ValueError(f"TemporalBatchNorm input: expected [T, B, C, ...], got shape {tuple(x.shape)}")
        sync = self.sync and self.training and synchronised()
        if not self.training or (self.mode == "joint" and not sync):
            return super().forward(x.flatten(0, 1)).view_as(x)
        # joint statistics are the per-step ones of a single timestep holding all T*B samples
        steps = x if self.mode == "per_step" else x.flatten(0, 1).unsqueeze(0)
        if _torch_batch_norm_applies(steps, sync):
            y, mean, var = _timesteps_as_channels(steps, self.weight, self.bias, self.eps)
        else:
            _check_count(steps, sync)
            y, mean, var, _invstd, _count = torch.ops.msgcli.batch_norm_per_step(
                steps, self.weight, self.bias, self.eps, sync, _batchnorm_kernels(steps.device).key)
        if self.track_running_stats and self.running_mean is not None:
            self._sequential_running_update(mean, var)
        return y.view_as(x)

    @torch.no_grad()
    def _sequential_running_update(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """T momentum updates ``r <- (1-m) r + m s_t``, t = 0..T-1, as T calls of the release's BatchNorm make."""
        T = mean.shape[0]
        if self.momentum is None:  # cumulative average, one sample per timestep
            for t in range(T):
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean[t].to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(var[t].to(self.running_var.dtype), alpha=f)
            return
        m = self.momentum
        weigh = _momentum_weights.__wrapped__ if torch.compiler.is_compiling() else _momentum_weights  # traced: no cache
        weights = weigh(T, m, self.running_mean.device, self.running_mean.dtype)
        for running, batch in ((self.running_mean, mean), (self.running_var, var)):
            running.mul_((1.0 - m) ** T).add_(weights @ batch.to(running.dtype))
        self.num_batches_tracked.add_(T)


@functools.lru_cache(maxsize=64)
def _momentum_weights(T: int, momentum: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``m (1 - m)^(T-1-t)``, t = 0..T-1: the weight of timestep t's statistic after T momentum updates (made once per
    T, momentum, device and dtype, so the update is a matrix-vector product in the buffers' own type)."""
    return (momentum * (1.0 - momentum) ** torch.arange(T - 1, -1, -1, dtype=torch.float64)).to(device, dtype)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every :class:`TemporalBatchNorm` of ``model`` synchronise its statistics over the processes."""
    for module in model.modules():
        if isinstance(module, TemporalBatchNorm):
            module.sync = True
    return model
