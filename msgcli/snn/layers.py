"""Layers over time: stateless ops run once on the folded ``[T*B, ...]`` batch.

Convolutions, pooling and linear layers have no temporal dynamics, so
:class:`Folded` runs them in one call on ``[T*B, ...]`` instead of looping over
T. :class:`TemporalBatchNorm` normalises ``[T, B, C, ...]`` with statistics over
the B samples of each timestep (``per_step``: what the release computes by
calling its network once per timestep) or over all T*B samples (``joint``).

Activations of 2-D convolutions travel channels-last (``[T, B, H, W, C]`` in
memory, shape ``[T, B, C, H, W]``): what the CPU and GPU convolution libraries
prefer, and a layout in which the per-timestep statistics are a reduction over
the middle axis of ``[T, B*H*W, C]``, with no transposition.

Under data parallelism, :func:`sync_batchnorm` makes every TemporalBatchNorm
reduce its sums over the processes of ``torch.distributed`` (gloo or NCCL), in
either mode, so that the statistics are those of the union of the ranks' batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from msgcli.snn import backends, options
from msgcli.snn.memory import step_layout
from msgcli.snn.neuron import levels_of, mark_levels


class Folded(nn.Module):
    """Apply a stateless module to ``[T, B, ...]`` as one ``[T*B, ...]`` batch."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if isinstance(module, nn.Conv2d):
            module = module.to(memory_format=torch.channels_last)  # weights laid out like the activations
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = levels_of(x)
        flat = x.flatten(0, 1)
        module = self.module
        if flat.dim() == 4 and isinstance(module, nn.Conv2d):
            flat = flat.contiguous(memory_format=torch.channels_last)  # no copy after the first layer
            if levels is not None and flat.device.type == "cpu" and torch.is_grad_enabled() and _codes_conv_applies(module):
                y = _SpikeInputConv.apply(flat, module.weight, module.bias, module, levels)
            else:
                y = module(flat)
        else:
            y = module(flat)
        out = y.view(x.shape[0], x.shape[1], *y.shape[1:])
        if levels is not None and isinstance(module, nn.AvgPool2d):
            pooled = _pooled_levels(module, levels)
            if pooled is not None:
                mark_levels(out, pooled)
        return out


def _codes_conv_applies(conv: nn.Conv2d) -> bool:
    """The spike-input path reproduces ``conv(x)`` exactly: a plain ``Conv2d`` forward, zero padding
    given as numbers, no hooks."""
    from torch.nn.modules import module as module_globals

    return (type(conv).forward is nn.Conv2d.forward and type(conv)._conv_forward is nn.Conv2d._conv_forward
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not conv._forward_hooks
            and not conv._forward_pre_hooks and not module_globals._global_forward_hooks
            and not module_globals._global_forward_pre_hooks)


def _pooled_levels(pool: nn.AvgPool2d, levels: int) -> int | None:
    """Levels of an average of spikes over k x k windows; only where the division by k*k is exact."""
    k = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size, pool.kernel_size)
    window = k[0] * k[1]
    padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding, pool.padding)
    exact = window & (window - 1) == 0 and padding == (0, 0) and not pool.ceil_mode and pool.divisor_override is None
    return levels * window if exact and levels * window <= 128 else None


def _encode(x: torch.Tensor, levels: int) -> torch.Tensor:
    kernels = backends.cpu(x)
    if kernels is not None and x.dtype in (torch.float32, torch.float64, torch.bfloat16) and _dense(x):
        return kernels.encode(x, levels)
    return (x * levels).round_().to(torch.uint8)


def _decode(codes: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    kernels = backends.cpu(codes)
    if kernels is not None and dtype in (torch.float32, torch.float64, torch.bfloat16) and _dense(codes):
        return kernels.decode(codes, levels, dtype)
    return codes.to(dtype).mul_(1.0 / levels)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


class _SpikeInputConv(torch.autograd.Function):
    """``conv(x)`` for an input of spikes (or averaged spikes): saves ``x`` as uint8 codes, not floats.

    The weight gradient needs the input; spikes are 0/1 and their 2x2 averages multiples of
    1/4, so one byte per entry restores them exactly. Backward decodes them and calls the same
    ``convolution_backward`` that autograd would. Under autocast the forward's compute dtype is
    kept for backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conv, levels):
        y = conv._conv_forward(x, weight, bias)
        ctx.save_for_backward(_encode(x, levels), weight)
        ctx.conv, ctx.levels, ctx.dtype, ctx.x_dtype = conv, levels, y.dtype, x.dtype
        ctx.bias_shape = None if bias is None else list(bias.shape)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        codes, weight = ctx.saved_tensors
        conv, dtype = ctx.conv, ctx.dtype
        x = _decode(codes, ctx.levels, dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_shape is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad_y.to(dtype), x, weight.to(dtype), ctx.bias_shape, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0, 0], conv.groups, mask)
        return (None if gx is None else gx.to(ctx.x_dtype), None if gw is None else gw.to(weight.dtype),
                None if gb is None else gb.to(weight.dtype), None, None)


def _step_view(x: torch.Tensor, layout: str):
    """``x [T, B, C, ...]`` as a view in which a per-(t, c) reduction runs over ``dims``; also returns
    the shape that broadcasts a ``[T, C]`` statistic against the view."""
    T, B, C = x.shape[:3]
    if layout == "nlc":
        return x.permute(0, 1, 3, 4, 2).reshape(T, -1, C), (1,), (T, 1, C)
    return x.reshape(T, B, C, -1), (1, 3), (T, 1, C, 1)


def _from_step_view(v: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nlc":
        T, B, C, H, W = like.shape
        return v.view(T, B, H, W, C).permute(0, 1, 4, 2, 3)
    return v.view(like.shape)


def _synchronised() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_stats(mean: torch.Tensor, var: torch.Tensor, count: int):
    """Mean and biased variance ``[T, C]`` over the union of every rank's batch, and its total count.

    One all-reduce of ``count * mean``, ``count * (var + mean^2)`` and ``count`` in float64, from
    each rank's own (numerically stable) statistics.
    """
    m, v = mean.double(), var.double()
    packed = torch.cat([(m * count).flatten(), ((v + m * m) * count).flatten(), m.new_tensor([count])])
    dist.all_reduce(packed)
    total = packed[-1]
    global_mean = packed[: m.numel()].view_as(m) / total
    global_var = (packed[m.numel(): -1].view_as(m) / total - global_mean * global_mean).clamp_(min=0)
    return global_mean.to(mean.dtype), global_var.to(var.dtype), total.to(mean.dtype)


class _PerStepBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm with statistics per (timestep, channel) over ``B*H*W``.

    Saves only its input (plus ``[T, C]`` statistics), like the native BatchNorm.
    Returns ``(y, mean, var)``: the biased batch mean and the unbiased variance, for the
    running-statistics update. Runs fused kernels where there are some (C on CPU: two
    passes forward, two backward; Triton on CUDA), elsewhere torch reductions on a view
    of the input. ``sync``: the statistics and the backward sums are all-reduced over
    the ranks (one all-reduce each way); the weight and bias gradients stay this rank's,
    as DDP then averages them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, sync):
        layout = step_layout(x)
        if layout is None:
            x, layout = x.contiguous(), "ncl"
        T, B, C = x.shape[:3]
        count = x.numel() // (T * C)
        if count <= 1 and not sync:
            raise ValueError(f"TemporalBatchNorm: expected more than 1 value per channel and timestep when training, got input of shape {tuple(x.shape)}")
        kernels = backends.bn_kernels(x)
        stats = backends.call(kernels, "bn_stats", x)
        if stats is None:
            kernels = None
            stat = torch.float64 if x.dtype == torch.float64 else torch.float32
            view, dims, _ = _step_view(x, layout)
            var, mean = torch.var_mean(view.to(stat), dim=dims, correction=0)
            mean, var = mean.reshape(T, C), var.reshape(T, C)
        else:
            mean, var = stats
        if sync:
            mean, var, count = _all_reduce_stats(mean, var, count)
        stat = mean.dtype
        invstd = torch.rsqrt(var + eps)
        w = weight.detach().to(stat) if weight is not None else torch.ones(C, dtype=stat, device=x.device)
        b = bias.detach().to(stat) if bias is not None else torch.zeros(C, dtype=stat, device=x.device)
        scale = w * invstd
        shift = b - mean * scale
        y = backends.call(kernels, "bn_apply", x, scale, shift)
        if y is None:
            kernels = None
            view, _, shape = _step_view(x, layout)
            y = _from_step_view(torch.addcmul(shift.view(shape).to(x.dtype), view, scale.view(shape).to(x.dtype)), x, layout)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.layout, ctx.kernels, ctx.count, ctx.sync = layout, kernels, count, sync
        unbiased = var * (count / (count - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        layout, count, kernels = ctx.layout, ctx.count, ctx.kernels
        T, B, C = x.shape[:3]
        stat = mean.dtype
        sums = None
        if kernels is not None:
            if grad_y.stride() != x.stride() or grad_y.dtype != x.dtype:
                grad_y = backends.empty_like(x).copy_(grad_y)
            sums = backends.call(kernels, "bn_backward_sums", grad_y, x, mean)
        gview, dims, shape = _step_view(grad_y, layout)
        centred = None
        if sums is None:
            kernels = None
            centred = _step_view(x, layout)[0].to(stat) - mean.view(shape)
            sdy = gview.sum(dim=dims, dtype=stat).reshape(T, C)
            sdyx = (gview.to(stat) * centred).sum(dim=dims).reshape(T, C)
        else:
            sdy, sdyx = sums
        w = weight.detach().to(stat) if weight is not None else torch.ones(C, dtype=stat, device=x.device)
        grad_x = grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (sdyx * invstd).sum(0).to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_b = sdy.sum(0).to(weight.dtype)
        if ctx.sync:
            sums = torch.stack([sdy, sdyx])
            dist.all_reduce(sums)
            sdy, sdyx = sums
        if ctx.needs_input_grad[0]:
            a = w * invstd
            q = invstd * invstd * sdyx / count
            r = a * sdy / count
            grad_x = backends.call(kernels, "bn_backward_input", grad_y, x, mean, q, a, r)
            if grad_x is None:
                if centred is None:
                    centred = _step_view(x, layout)[0].to(stat) - mean.view(shape)
                g = (gview.to(stat) - centred * q.view(shape)) * a.view(shape) - r.view(shape)
                grad_x = _from_step_view(g.to(x.dtype), x, layout)
        return grad_x, grad_w, grad_b, None, None


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
        sync = self.sync and self.training and _synchronised()
        if not self.training or (self.mode == "joint" and not sync):
            return super().forward(x.flatten(0, 1)).view_as(x)
        # joint statistics are the per-step ones of a single timestep holding all T*B samples
        steps = x if self.mode == "per_step" else x.flatten(0, 1).unsqueeze(0)
        y, mean, var = _PerStepBatchNorm.apply(steps, self.weight, self.bias, self.eps, sync)
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
        decay = (1.0 - m) ** torch.arange(T - 1, -1, -1, device=mean.device, dtype=torch.float64)
        for running, batch in ((self.running_mean, mean), (self.running_var, var)):
            new = running.double() * (1.0 - m) ** T + m * (decay[:, None] * batch.double()).sum(0)
            running.copy_(new)
        self.num_batches_tracked.add_(T)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Make every :class:`TemporalBatchNorm` of ``model`` synchronise its statistics over the processes."""
    for module in model.modules():
        if isinstance(module, TemporalBatchNorm):
            module.sync = True
    return model
