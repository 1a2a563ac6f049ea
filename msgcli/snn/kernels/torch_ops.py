"""Every operation of :mod:`msgcli.snn.kernels` in torch operators: any device, any dtype, any layout.

What runs where the fused kernels do not (no compiler, another device, a registered surrogate...),
and what they must equal. The LIF loops compute the same numbers as the reference
:func:`msgcli.snn.neuron.lif_reference`; the MSG mask is drawn by :meth:`SpikeSpec.keep_mask`,
timestep T-1 first, as the reference's autograd draws it.
"""

from __future__ import annotations

import numpy as np
import torch

from msgcli.snn.memory import step_layout


def lif_forward(current: torch.Tensor, tau: float, v_threshold: float, reset_mode: str, keep_membrane: bool,
                state: torch.Tensor | None = None):
    spikes = torch.empty_like(current)
    membrane = torch.empty_like(current) if keep_membrane else None
    v = torch.zeros_like(current[0]) if state is None else state.to(current.dtype)
    for t in range(current.shape[0]):
        h = v + (current[t] - v) / tau  # charge (neuron.charge)
        fired = h >= v_threshold
        spikes[t] = fired
        v = h.masked_fill(fired, 0.0) if reset_mode == "hard" else h - v_threshold * spikes[t]
        if membrane is not None:
            membrane[t] = h
    if state is not None:
        state.copy_(v)
    return spikes, membrane


def lif_chunk_forward(current, state, tau, v_threshold, reset_mode, keep_membrane):
    return lif_forward(current, tau, v_threshold, reset_mode, keep_membrane, state)


def lif_chunk_backward(grad_spikes, membrane, grad_state, tau, v_threshold, spec, reset_mode, detach_reset):
    return lif_backward(grad_spikes, membrane, tau, v_threshold, spec, reset_mode, detach_reset, grad_state=grad_state)


def lif_backward(grad_spikes, membrane, tau, v_threshold, spec, reset_mode, detach_reset, seed=None, grad_state=None):
    """The mask from torch's generator (``seed``, the Triton kernel's key, is not used), as the reference draws it."""
    leak = 1.0 - 1.0 / tau
    grad_current = torch.empty_like(membrane)
    grad_v = torch.zeros_like(membrane[0]) if grad_state is None else grad_state.to(membrane.dtype)
    for t in reversed(range(membrane.shape[0])):
        h = membrane[t]
        x = h - v_threshold
        surrogate = spec.masked_derivative(x)
        grad_s = grad_spikes[t]
        if reset_mode == "hard":
            if not detach_reset:
                grad_s = grad_s - grad_v * h
            grad_h = torch.where(x < 0, grad_v, 0.0).addcmul_(grad_s, surrogate)
        else:
            if not detach_reset:
                grad_s = grad_s - v_threshold * grad_v
            grad_h = torch.addcmul(grad_v, grad_s, surrogate)
        torch.div(grad_h, tau, out=grad_current[t])
        grad_v = grad_h.mul_(leak)
    if grad_state is not None:
        grad_state.copy_(grad_v)
    return grad_current


# --------------------------------------------------------------------------- per-timestep BatchNorm
# x [T, B, C, ...] is dense (ncl or nlc, see msgcli.snn.memory); statistics in float32 (float64 for float64).


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


def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, C = x.shape[0], x.shape[2]
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    view, dims, _ = _step_view(x, step_layout(x))
    var, mean = torch.var_mean(view.to(stat), dim=dims, correction=0)
    return mean.reshape(T, C), var.reshape(T, C)


def bn_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    layout = step_layout(x)
    view, _, shape = _step_view(x, layout)
    return _from_step_view(torch.addcmul(shift.view(shape).to(x.dtype), view, scale.view(shape).to(x.dtype)), x, layout)


def _centred(x: torch.Tensor, mean: torch.Tensor, layout: str) -> torch.Tensor:
    view, _, shape = _step_view(x, layout)
    return view.to(mean.dtype) - mean.view(shape)


def bn_backward_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, C = x.shape[0], x.shape[2]
    layout = step_layout(x)
    gview, dims, _ = _step_view(dy, layout)
    sdy = gview.sum(dim=dims, dtype=mean.dtype).reshape(T, C)
    sdyx = (gview.to(mean.dtype) * _centred(x, mean, layout)).sum(dim=dims).reshape(T, C)
    return sdy, sdyx


def bn_backward_input(dy, x, mean, q, a, r, out=None) -> torch.Tensor:
    layout = step_layout(x)
    gview, _, shape = _step_view(dy, layout)
    g = (gview.to(mean.dtype) - _centred(x, mean, layout) * q.view(shape)) * a.view(shape) - r.view(shape)
    g = _from_step_view(g.to(x.dtype), x, layout)
    return g if out is None else out.copy_(g)


# --------------------------------------------------------------------------- spike codes


def encode(x: torch.Tensor, levels: int) -> torch.Tensor:
    return (x * levels).round_().to(torch.uint8)


def decode(codes: torch.Tensor, levels: int, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype).mul_(1.0 / levels)


# ------------------------------------------- bit planes of codes (numpy on the CPU, torch operators elsewhere)


def bit_planes(codes: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 ``[k, ceil(n / 8)]``: bit ``i`` of plane ``b`` is bit ``b`` of ``codes[i]`` (1-D uint8)."""
    return planes_numpy(codes, k) if codes.device.type == "cpu" else planes_torch(codes, k)


def codes_of(planes: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` codes whose bits ``planes`` hold: the inverse of :func:`bit_planes`."""
    return codes_numpy(planes, n) if planes.device.type == "cpu" else codes_torch(planes, n)


def planes_numpy(codes: torch.Tensor, k: int) -> torch.Tensor:
    array = codes.numpy()
    return torch.from_numpy(np.stack([np.packbits((array >> b) & 1 if b else array & 1, bitorder="little")
                                      for b in range(k)]))


def planes_torch(codes: torch.Tensor, k: int) -> torch.Tensor:
    codes = torch.nn.functional.pad(codes, (0, -codes.numel() % 8)).view(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=codes.device)
    return torch.stack([(((codes >> b) & 1) * weights).sum(1, dtype=torch.uint8) for b in range(k)])


def codes_numpy(planes: torch.Tensor, n: int) -> torch.Tensor:
    array = planes.numpy()
    codes = np.unpackbits(array[0], count=n, bitorder="little")
    for b in range(1, planes.shape[0]):
        codes |= np.unpackbits(array[b], count=n, bitorder="little") << b
    return torch.from_numpy(codes)


def codes_torch(planes: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=planes.device)
    return sum((((planes[b, :, None] >> shifts) & 1) << b) for b in range(planes.shape[0])).flatten()[:n]
