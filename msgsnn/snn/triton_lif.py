"""Multi-step LIF with MSG as two Triton kernels (forward, backward) for CUDA tensors.

One program owns a block of neurons and runs the whole time loop in registers:
the forward reads the input current once and writes spikes and the pre-spike
membrane ``H`` (saved for backward, input dtype); the backward reads the upstream
gradient and ``H`` once and writes the input gradient. The MSG keep-mask is drawn
inside the backward kernel from a seed (Philox, ``tl.randint4x``: one call gives
the draws of four timesteps), so no mask exists in memory at any time. The seed
comes from torch's CPU generator at every backward call, so ``torch.manual_seed``
makes runs repeatable and every backward draws a fresh mask; the stream differs
from torch's, so ``p > 0`` matches the reference only in distribution.

Inputs may be float32, float16 or bfloat16 (arithmetic in float32; ``H`` is
rounded to the input dtype before the spike test, so the spikes recomputed in
backward are the forward's). All four surrogates, both resets and ``detach_reset``
are compile-time switches.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

from msgsnn.snn.cpu_kernels import step_layout

AVAILABLE = triton is not None and torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SURROGATES = {"piecewise_linear": 0, "arctan": 1, "sigmoid": 2, "rectangular": 3}
MASK_MODES = {"element": 1, "channel": 2, "timestep": 3}
BLOCK = 1024
NUM_WARPS = 4


def supports(x: torch.Tensor) -> bool:
    return triton is not None and x.dtype in DTYPES and 0 < x[0].numel() < 2**31


if triton is not None:

    @triton.jit
    def _surrogate(x, alpha, KIND: tl.constexpr):
        if KIND == 0:
            g = tl.maximum(alpha - alpha * alpha * tl.abs(x), 0.0)
        elif KIND == 1:
            z = (3.141592653589793 / 2) * alpha * x
            g = alpha / (1.0 + z * z)
        elif KIND == 2:
            s = tl.sigmoid(alpha * x)
            g = alpha * s * (1.0 - s)
        else:
            g = tl.where(tl.abs(x) < 1.0 / alpha, alpha, 0.0)
        return g

    @triton.jit
    def _lif_forward_kernel(x_ptr, s_ptr, h_ptr, N, T, tau, vth,
                            HARD: tl.constexpr, SAVE_H: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        v = tl.zeros([BLOCK], dtype=tl.float32)
        x_ptrs = x_ptr + offs
        s_ptrs = s_ptr + offs
        h_ptrs = h_ptr + offs
        for _t in range(T):
            x = tl.load(x_ptrs, mask=inb, other=0.0).to(tl.float32)
            h = v + (x - v) / tau
            h = h.to(s_ptr.dtype.element_ty).to(tl.float32)  # what backward will read back
            fired = h >= vth
            spike = fired.to(tl.float32)
            tl.store(s_ptrs, spike.to(s_ptr.dtype.element_ty), mask=inb)
            if SAVE_H:
                tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=inb)
            if HARD:
                v = tl.where(fired, 0.0, h)
            else:
                v = (h - vth * spike).to(s_ptr.dtype.element_ty).to(tl.float32)
            x_ptrs += N
            s_ptrs += N
            h_ptrs += N

    @triton.jit
    def _lif_step_backward(g_ptrs, h_ptrs, o_ptrs, inb, gv, rnd, tau, leak, vth, alpha, p, keep_div,
                           HARD: tl.constexpr, DETACH: tl.constexpr, SURR: tl.constexpr, FILL: tl.constexpr,
                           MASK: tl.constexpr, RESCALE: tl.constexpr):
        h = tl.load(h_ptrs, mask=inb, other=0.0).to(tl.float32)
        x = h - vth
        sg = _surrogate(x, alpha, SURR)
        if MASK != 0:
            u = (rnd.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)
            if RESCALE:
                sg = sg / keep_div
            if FILL >= 0:
                fill = _surrogate(x, alpha, FILL)
            else:
                fill = tl.zeros_like(sg)
            sg = tl.where(u >= p, sg, fill)
        gs = tl.load(g_ptrs, mask=inb, other=0.0).to(tl.float32)
        if HARD:
            if not DETACH:
                gs = gs - gv * h
            gh = tl.where(x < 0, gv, 0.0) + gs * sg
        else:
            if not DETACH:
                gs = gs - vth * gv
            gh = gv + gs * sg
        tl.store(o_ptrs, (gh / tau).to(o_ptrs.dtype.element_ty), mask=inb)
        return gh * leak

    @triton.jit
    def _lif_backward_kernel(g_ptr, h_ptr, o_ptr, N, T, C, L, seed, tau, leak, vth, alpha, p, keep_div,
                             HARD: tl.constexpr, DETACH: tl.constexpr, SURR: tl.constexpr, FILL: tl.constexpr,
                             MASK: tl.constexpr, NLC: tl.constexpr, RESCALE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        # the index of each element's draw within a timestep (element, (sample, channel) or sample)
        if MASK == 2:
            if NLC:
                ridx = (offs // (C * L)) * C + offs % C
            else:
                ridx = offs // L
        elif MASK == 3:
            ridx = offs // (C * L)
        else:
            ridx = offs
        ridx = ridx.to(tl.int32)
        gv = tl.zeros([BLOCK], dtype=tl.float32)
        zero = tl.zeros([BLOCK], dtype=tl.int32)
        for gi in range(0, (T + 3) // 4):
            if MASK != 0:
                r0, r1, r2, r3 = tl.randint4x(seed + gi, ridx)
            else:
                r0, r1, r2, r3 = zero, zero, zero, zero
            for k in tl.static_range(4):
                t = T - 1 - 4 * gi - k
                if k == 0:
                    rnd = r0
                elif k == 1:
                    rnd = r1
                elif k == 2:
                    rnd = r2
                else:
                    rnd = r3
                if t >= 0:
                    step = t.to(tl.int64) * N
                    gv = _lif_step_backward(g_ptr + step + offs, h_ptr + step + offs, o_ptr + step + offs, inb, gv,
                                            rnd, tau, leak, vth, alpha, p, keep_div,
                                            HARD, DETACH, SURR, FILL, MASK, RESCALE)


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x if step_layout(x) is not None else x.contiguous()


def lif_forward(current: torch.Tensor, tau: float, v_threshold: float, reset_mode: str, keep_membrane: bool):
    """Spikes of ``current [T, B, ...]`` and, if asked, the pre-spike membrane ``H``: one program per block of neurons."""
    current = _dense(current)
    hard = reset_mode == "hard"
    T, N = current.shape[0], current[0].numel()
    spikes = torch.empty_like(current)
    membrane = torch.empty_like(current) if keep_membrane else spikes
    grid = (triton.cdiv(N, BLOCK),)
    _lif_forward_kernel[grid](current, spikes, membrane, N, T, float(tau), float(v_threshold),
                              HARD=hard, SAVE_H=keep_membrane, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return spikes, (membrane if keep_membrane else None)


def lif_backward(grad: torch.Tensor, membrane: torch.Tensor, tau: float, v_threshold: float, spec, reset_mode: str,
                 detach_reset: bool) -> torch.Tensor:
    """Gradient w.r.t. the input from ``H``, the MSG mask drawn in the kernel from a fresh seed (never stored)."""
    hard = reset_mode == "hard"
    T, N = membrane.shape[0], membrane[0].numel()
    if grad.stride() != membrane.stride() or grad.dtype != membrane.dtype:
        grad = torch.empty_like(membrane).copy_(grad)
    out = torch.empty_like(membrane)
    B = membrane.shape[1]
    C = membrane.shape[2] if membrane.dim() > 2 else 1
    L = N // (B * C)
    mask = MASK_MODES[spec.mask_mode] if spec.mask_p > 0 else 0
    # a fresh 62-bit key per backward call, from torch's CPU generator (no device sync)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if mask else 0
    rescale = bool(spec.rescale and 0 < spec.mask_p < 1)
    fill = -1 if spec.mask_fill == "zero" else SURROGATES[spec.mask_fill]
    grid = (triton.cdiv(N, BLOCK),)
    _lif_backward_kernel[grid](
        grad, membrane, out, N, T, C, L, seed, float(tau), 1.0 - 1.0 / float(tau), float(v_threshold),
        float(spec.alpha), float(spec.mask_p), 1.0 - float(spec.mask_p),
        HARD=hard, DETACH=bool(detach_reset), SURR=SURROGATES[spec.surrogate], FILL=fill, MASK=mask,
        NLC=step_layout(membrane) == "nlc" and membrane.dim() == 5, RESCALE=rescale, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


# --------------------------------------------------------------------------- per-timestep BatchNorm
# A channels-last [T, B, C, H, W] tensor is [T, M, C] in memory (M = B*H*W): the statistics of
# (t, c) are column sums over the rows of one timestep. Partial sums come from a grid of
# (timestep, channel block, row split) programs, shifted by the first row for accuracy.

BN_ROWS = 64


def bn_supports(x: torch.Tensor) -> bool:
    """Triton per-step BatchNorm takes CUDA tensors whose timesteps are ``[M, C]`` row-major."""
    return (AVAILABLE or (triton is not None and _interpreting())) and x.dtype in DTYPES and _rows_layout(x)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _rows_layout(x: torch.Tensor) -> bool:
    layout = step_layout(x)
    return layout == "nlc" or (layout == "ncl" and x.dim() == 3)


if triton is not None:

    @triton.jit
    def _bn_sums_kernel(a_ptr, b_ptr, shift_ptr, part_ptr, M, C, S, rows_per_split,
                        PRODUCT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        """PRODUCT=False: sums of (a - shift) and (a - shift)^2; True: sums of a and a * (b - shift)."""
        t = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        s = tl.program_id(2)
        cin = cols < C
        shift = tl.load(shift_ptr + t * C + cols, mask=cin, other=0.0)
        acc1 = tl.zeros([BC], dtype=tl.float32)
        acc2 = tl.zeros([BC], dtype=tl.float32)
        base = t.to(tl.int64) * M * C
        start = s * rows_per_split
        for r0 in range(start, tl.minimum(start + rows_per_split, M), BM):
            rows = r0 + tl.arange(0, BM)
            m = (rows < tl.minimum(start + rows_per_split, M))[:, None] & cin[None, :]
            offs = base + rows.to(tl.int64)[:, None] * C + cols[None, :]
            a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if PRODUCT:
                b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
                acc1 += tl.sum(a, axis=0)
                acc2 += tl.sum(tl.where(m, a * (b - shift[None, :]), 0.0), axis=0)
            else:
                d = tl.where(m, a - shift[None, :], 0.0)
                acc1 += tl.sum(d, axis=0)
                acc2 += tl.sum(d * d, axis=0)
        out = part_ptr + ((t * S + s) * 2) * C + cols
        tl.store(out, acc1, mask=cin)
        tl.store(out + C, acc2, mask=cin)

    @triton.jit
    def _bn_map_kernel(a_ptr, b_ptr, out_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, rows_total, M, C,
                       BACKWARD: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        """Forward: out = a * c0 + c1. Backward: out = (a - (b - c0) * c1) * c2 - c3 (a = dy, b = x)."""
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        rin = rows < rows_total
        cin = cols < C
        m = rin[:, None] & cin[None, :]
        tc = (rows // M)[:, None] * C + cols[None, :]
        offs = rows[:, None] * C + cols[None, :]
        a = tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
        k0 = tl.load(c0_ptr + tc, mask=m, other=0.0)
        k1 = tl.load(c1_ptr + tc, mask=m, other=0.0)
        if BACKWARD:
            b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
            k2 = tl.load(c2_ptr + tc, mask=m, other=0.0)
            k3 = tl.load(c3_ptr + tc, mask=m, other=0.0)
            y = (a - (b - k0) * k1) * k2 - k3
        else:
            y = a * k0 + k1
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _bn_geometry(x: torch.Tensor):
    T, C = x.shape[0], x.shape[2]
    M = x[0].numel() // C
    BC = min(64, triton.next_power_of_2(C))
    return T, M, C, BC


def _bn_sums(a: torch.Tensor, b: torch.Tensor | None, shift: torch.Tensor, product: bool):
    """Column sums per (t, c) over the M rows of each timestep: float32 ``[T, C]`` twice."""
    T, M, C, BC = _bn_geometry(a)
    cblocks = triton.cdiv(C, BC)
    splits = max(1, min(triton.cdiv(M, BN_ROWS), 1024 // max(1, T * cblocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BN_ROWS) * BN_ROWS
    splits = triton.cdiv(M, rows_per_split)
    part = torch.empty(T, splits, 2, C, device=a.device, dtype=torch.float32)
    _bn_sums_kernel[(T, cblocks, splits)](a, a if b is None else b, shift.float().contiguous(), part, M, C, splits,
                                          rows_per_split, PRODUCT=product, BM=BN_ROWS, BC=BC, num_warps=4)
    sums = part.sum(1)
    return sums[:, 0], sums[:, 1]


def bn_stats(x: torch.Tensor):
    """Biased mean and variance per (t, c), float32 ``[T, C]``."""
    T, M, C, _ = _bn_geometry(x)
    shift = _first_row(x)
    s1, s2 = _bn_sums(x, None, shift, product=False)
    d = s1 / M
    return shift + d, (s2 / M - d * d).clamp_(min=0)


def _first_row(x: torch.Tensor) -> torch.Tensor:
    """``x[t, sample 0, :, pixel 0]`` as ``[T, C]`` float32: one sample per (t, c) to shift the sums by."""
    idx = (0,) * (x.dim() - 3)
    return x[(slice(None), 0, slice(None)) + idx].float()


def bn_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    T, M, C, BC = _bn_geometry(x)
    y = torch.empty_like(x)
    grid = (triton.cdiv(T * M, BN_ROWS), triton.cdiv(C, BC))
    sc, sh = scale.float().contiguous(), shift.float().contiguous()
    _bn_map_kernel[grid](x, x, y, sc, sh, sc, sh, T * M, M, C, BACKWARD=False, BM=BN_ROWS, BC=BC, num_warps=4)
    return y


def bn_backward_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
    return _bn_sums(dy, x, mean, product=True)


def bn_backward_input(dy, x, mean, q, a, r) -> torch.Tensor:
    T, M, C, BC = _bn_geometry(x)
    dx = torch.empty_like(x)
    grid = (triton.cdiv(T * M, BN_ROWS), triton.cdiv(C, BC))
    coefs = [c.float().contiguous() for c in (mean, q, a, r)]
    _bn_map_kernel[grid](dy, x, dx, *coefs, T * M, M, C, BACKWARD=True, BM=BN_ROWS, BC=BC, num_warps=4)
    return dx
