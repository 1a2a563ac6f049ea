"""The CUDA kernels, written in Triton: the LIF time loop with MSG (forward, backward) and per-step BatchNorm.

LIF. One program owns a block of neurons and runs the whole time loop in registers:
the forward reads the input current once and writes spikes and the pre-spike
membrane ``H`` (saved for backward, input dtype); the backward reads the upstream
gradient and ``H`` once and writes the input gradient. The MSG keep-mask is drawn
inside the backward kernel from a seed (Philox, ``tl.randint4x``: one call gives
the draws of four timesteps), so no mask exists in memory at any time. The seed
is an int64 tensor on the GPU, drawn from the device's generator at every backward
call (:func:`msgcli.snn.msg.mask_seed`; in a compiled graph, by the graph itself), so
``torch.manual_seed`` makes runs repeatable, every backward draws a fresh mask and
a CUDA graph's replays draw fresh masks too; the stream differs from torch's, so
``p > 0`` matches the reference only in distribution.

Inputs may be float32, float16 or bfloat16 (arithmetic in float32; ``H`` is
rounded to the input dtype before the spike test, so the spikes recomputed in
backward are the forward's). The surrogate, the reset, ``detach_reset`` and the
mask mode are compile-time switches (:func:`lif_forward_switches`,
:func:`lif_backward_switches`); the mask's fill and rescaling are run-time values,
so one compiled kernel serves all of them.

Spikes as bits (:mod:`msgcli.snn.packing`): one kernel packs a dense tensor's codes straight into
bit planes, one unpacks them into a tensor of the original strides; no byte code is ever stored.

BatchNorm: see the section below; :mod:`msgcli.snn.layers.batchnorm` uses these kernels on CUDA
only where ``MSGSNN_TRITON_BN=1`` asks for them, and then the default path runs each BatchNorm-LIF
pair in the pair kernels: forward writes the spikes alone from the BatchNorm's input; backward
recomputes the current and ``H`` into its own output buffer, then runs the LIF backward over it
in place, so the pair keeps one float tensor and allocates no membrane. The pair draws its mask
as the LIF backward does, so under one seed it gives the layers' own gradients bit for bit.

Every launch goes through :func:`_launch`, which launches on the device of the kernel's first
tensor (a model on ``cuda:1`` runs there whatever the current device is) and turns a kernel that
Triton cannot build for the GPU into :class:`TritonBuildError` (:mod:`msgcli.snn.kernels` then
falls back to torch operators), while an error of running it (a CUDA out-of-memory, say)
propagates unchanged.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

from msgcli.snn import options, surrogate
from msgcli.snn.memory import step_layout
from msgcli.snn.msg import mask_seed

AVAILABLE = triton is not None and torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LIF_BLOCK = 1024  # neurons per program
LIF_WARPS = 8  # 4 neurons per thread: about 70 registers in the masked backward, no spill
PAIR_BACKWARD_WARPS = 16  # 2 neurons per thread, about 40 registers (at 8 warps ptxas aims at 32 and spills)
gradient_in_place = False  # the pair backward uses its out as work space before it reads grad_spikes
BN_ROWS = 64  # rows of [M, C] per tile
BN_MAX_CHANNELS = 64  # channels per tile at most
BN_WARPS = 8


class TritonBuildError(RuntimeError):
    """Triton could not build one of these kernels for this GPU (compile, ptxas or resource limits)."""

    def __init__(self, kernel: str, err: Exception) -> None:
        super().__init__(f"Triton cannot build {kernel} here ({type(err).__name__}: {err})")
        self.kernel = kernel


def _interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): the kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(x: torch.Tensor) -> bool:
    """The LIF kernels take ``x``: a CUDA tensor (any under the interpreter) of a Triton dtype, timesteps < 2**31."""
    return (triton is not None and (x.is_cuda or _interpreting()) and x.dtype in DTYPES
            and 0 < x[0].numel() < 2**31)


build_errors = (TritonBuildError,)


def takes(op: str, *args) -> bool:
    """Whether these kernels run ``op`` (an operation of :mod:`msgcli.snn.kernels`) on these arguments."""
    if op == "lif_forward":
        return supports(args[0])
    if op == "lif_backward":
        return supports(args[1]) and args[4].kernel_ids() is not None
    if op in ("bn_stats", "bn_apply"):
        return bn_supports(args[0])
    if op in ("bn_backward_sums", "bn_backward_input"):
        return bn_supports(args[1])
    if op == "bn_lif_chunk_forward":
        return fuses_bn_lif(args[0]) and _carries(args[0], args[3]) and _laid_out_as(args[0], args[7:])
    if op == "bn_lif_chunk_backward":
        return (fuses_bn_lif(args[1]) and _carries(args[1], args[4]) and _carries(args[1], args[5])
                and args[8].kernel_ids() is not None and _laid_out_as(args[1], args[11:]))
    if op == "pack_bits":
        return supports(args[0]) and args[0].dim() > 0
    if op == "unpack_bits":
        return triton is not None and (args[0].is_cuda or _interpreting()) and args[4] in DTYPES
    if op in ("encode", "decode", "lif_chunk_forward", "lif_chunk_backward"):
        return False  # codes alone: pack_bits/unpack_bits instead; the LIF's carried chunks alone: torch operators
    raise ValueError(f"unknown operation {op!r}")


def fuses_bn_lif(x: torch.Tensor) -> bool:
    """The BatchNorm-LIF pair kernels take a BatchNorm input ``x``: one the LIF kernels take, each timestep dense."""
    return supports(x) and step_layout(x) is not None


def _carries(x: torch.Tensor, state: torch.Tensor) -> bool:
    """``state`` is a float32 membrane laid out like one timestep of ``x``."""
    return state.dtype == torch.float32 and state.device == x.device and state.stride() == x[0].stride()


def _laid_out_as(x: torch.Tensor, out: tuple) -> bool:
    """The optional output argument (``out``: empty, or one tensor or None) is absent or laid out like ``x``."""
    out = out[0] if out else None
    return out is None or (out.dtype == x.dtype and out.stride() == x.stride() and out.shape == x.shape)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def driver_error() -> TritonBuildError | None:
    """Why Triton's CUDA driver cannot start here (it builds a small C module at first use), or None."""
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as err:  # noqa: BLE001 - any failure here means: no Triton kernels in this process
        return TritonBuildError("the C module of its CUDA driver", err)
    return None


def _build_errors() -> tuple[type[Exception], ...]:
    """Triton's exception types for a kernel that cannot be built: the front end's ``CompilationError``,
    ``PTXASError`` (ptxas rejected the PTX) and ``OutOfResources`` (shared memory or threads over the GPU's
    limit, raised when the kernel is loaded), much as Triton's autotuner skips a config that cannot be built."""
    from triton.compiler.errors import CompilationError
    from triton.runtime import errors

    return tuple(t for t in (CompilationError, getattr(errors, "PTXASError", None), errors.OutOfResources) if t)


def is_build_error(err: BaseException) -> bool:
    """True if ``err`` says Triton could not build the kernel, False if something failed while running it.

    Besides Triton's own types, anything raised inside ``triton.compile`` is a build failure: an MLIR pass
    that fails raises a plain ``RuntimeError("PassManager::run failed")``. A CUDA error (out of memory
    included) is never raised there, so it is never taken for a build failure.
    """
    if isinstance(err, _build_errors()):
        return True
    compile_code = triton.compiler.compiler.compile.__code__
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is compile_code:
            return True
        tb = tb.tb_next
    return False


def _launch(kernel, grid: tuple, *args, num_warps: int, **switches) -> None:
    """``kernel[grid](*args, **switches)`` on the device of its first tensor argument, with a failure to build
    it raised as :class:`TritonBuildError`.

    Triton launches on the current CUDA device; ``torch.cuda.device_of`` makes that the tensors' own
    (and does nothing for a CPU tensor, under the interpreter).
    """
    tensor = next(a for a in args if isinstance(a, torch.Tensor))
    try:
        with torch.cuda.device_of(tensor):
            kernel[grid](*args, num_warps=num_warps, **switches)
    except Exception as err:
        if is_build_error(err):
            raise TritonBuildError(kernel.__name__, err) from err
        raise


if triton is not None:
    _KERNEL_SURROGATES = tl.constexpr(len(surrogate.BUILTIN))  # the built-ins' kernel ids are 0 .. this - 1

    @triton.jit
    def _surrogate(x, alpha, KIND: tl.constexpr):
        """The surrogate whose ``kernel_id`` is ``KIND`` in :data:`msgcli.snn.surrogate.SURROGATES`."""
        if KIND == 0:
            g = tl.maximum(alpha - alpha * alpha * tl.abs(x), 0.0)
        elif KIND == 1:
            z = (3.141592653589793 / 2) * alpha * x
            g = alpha / (1.0 + z * z)
        elif KIND == 2:
            s = tl.sigmoid(alpha * x)
            g = alpha * s * (1.0 - s)
        elif KIND == 3:
            g = tl.where(tl.abs(x) < 1.0 / alpha, alpha, 0.0)
        else:
            tl.static_assert(False, "no surrogate has this kernel_id")
        return g

    @triton.jit
    def _fill(x, alpha, kind):
        """What a masked entry gets: 0 (``kind`` = ``ZERO_FILL_ID``) or surrogate ``kind``, chosen at run time."""
        g = tl.zeros_like(x)
        for k in tl.static_range(_KERNEL_SURROGATES):
            if kind == k:
                g = _surrogate(x, alpha, k)
        return g

    @triton.jit
    def _lif_step(x, v, tau, vth, ty, HARD: tl.constexpr):
        """One forward step from the input ``x`` and membrane ``v`` (float32): ``H`` rounded to the sequence's
        dtype ``ty`` (what backward reads back), the spike, the membrane after the reset."""
        h = (v + (x - v) / tau).to(ty).to(tl.float32)
        spike = (h >= vth).to(tl.float32)
        if HARD:
            v = tl.where(h >= vth, 0.0, h)
        else:
            v = (h - vth * spike).to(ty).to(tl.float32)
        return h, spike, v

    @triton.jit
    def _lif_forward_kernel(x_ptr, s_ptr, h_ptr, N, T, tau, vth,
                            HARD: tl.constexpr, SAVE_H: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: a timestep holds < 2**31 elements
        inb = offs < N
        v = tl.zeros([BLOCK], dtype=tl.float32)
        n64 = N.to(tl.int64)
        for t in range(T):
            step = t * n64
            x = tl.load(x_ptr + step + offs, mask=inb, other=0.0).to(tl.float32)
            h, spike, v = _lif_step(x, v, tau, vth, s_ptr.dtype.element_ty, HARD)
            tl.store(s_ptr + step + offs, spike.to(s_ptr.dtype.element_ty), mask=inb)
            if SAVE_H:
                tl.store(h_ptr + step + offs, h.to(h_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _lif_step_backward(g_ptrs, h_ptrs, o_ptrs, inb, gv, rnd, tau, leak, vth, alpha, p, keep_scale, fill_kind,
                           HARD: tl.constexpr, DETACH: tl.constexpr, SURR: tl.constexpr, MASK: tl.constexpr):
        h = tl.load(h_ptrs, mask=inb, other=0.0).to(tl.float32)
        x = h - vth
        sg = _surrogate(x, alpha, SURR)
        if MASK >= 0:
            u = (rnd.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)
            sg = tl.where(u >= p, sg * keep_scale, _fill(x, alpha, fill_kind))
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
    def _draw_index(offs, C, L, MASK: tl.constexpr, NLC: tl.constexpr):
        """The index of each element's MASK draw within a timestep: MASK is options.MASK_MODES' index of element,
        (sample, channel) or sample (or options.NO_MASK); NLC: channels-last."""
        if MASK == 1:
            if NLC:
                ridx = (offs // (C * L)) * C + offs % C
            else:
                ridx = offs // L
        elif MASK == 2:
            ridx = offs // (C * L)
        else:
            ridx = offs
        return ridx

    @triton.jit
    def _lif_backward_loop(g_ptr, h_ptr, o_ptr, offs, inb, gv, ridx, seed, after, N, T, tau, leak, vth, alpha, p,
                           keep_scale, fill_kind, HARD: tl.constexpr, DETACH: tl.constexpr, SURR: tl.constexpr,
                           MASK: tl.constexpr):
        """Timesteps T-1 .. 0 from the membrane gradient ``gv``: the input gradients into ``o_ptr`` (which may be
        ``h_ptr``: each ``H`` is read before its place is written); returns the gradient of the initial membrane.
        These T steps are followed by ``after`` more in the sequence (a chunk's), and the keep-mask of the one
        ``r`` steps from the sequence's end comes from Philox draw r % 4 of key ``seed + r // 4``: the same
        masks whether the sequence runs in one call or in chunks under one key."""
        zero = tl.zeros_like(ridx)
        for gi in range(after // 4, (after + T + 3) // 4):
            if MASK >= 0:
                r0, r1, r2, r3 = tl.randint4x(seed + gi, ridx)
            else:
                r0, r1, r2, r3 = zero, zero, zero, zero
            for k in tl.static_range(4):
                t = T - 1 - (4 * gi + k - after)
                if k == 0:
                    rnd = r0
                elif k == 1:
                    rnd = r1
                elif k == 2:
                    rnd = r2
                else:
                    rnd = r3
                if t >= 0 and t < T:
                    step = t.to(tl.int64) * N
                    gv = _lif_step_backward(g_ptr + step + offs, h_ptr + step + offs, o_ptr + step + offs, inb, gv,
                                            rnd, tau, leak, vth, alpha, p, keep_scale, fill_kind,
                                            HARD, DETACH, SURR, MASK)
        return gv

    @triton.jit
    def _lif_backward_kernel(g_ptr, h_ptr, o_ptr, N, T, C, L, seed_ptr, tau, leak, vth, alpha, p, keep_scale, fill_kind,
                             HARD: tl.constexpr, DETACH: tl.constexpr, SURR: tl.constexpr, MASK: tl.constexpr,
                             NLC: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: a timestep holds < 2**31 elements
        inb = offs < N
        gv = tl.zeros([BLOCK], dtype=tl.float32)
        _lif_backward_loop(g_ptr, h_ptr, o_ptr, offs, inb, gv, _draw_index(offs, C, L, MASK, NLC), tl.load(seed_ptr),
                           0, N, T, tau, leak, vth, alpha, p, keep_scale, fill_kind, HARD, DETACH, SURR, MASK)

    # ------------------------------------------------------------ the BatchNorm-LIF pair from the BatchNorm's input
    # The current of timestep t is x * scale[t, c] + shift[t, c], rounded to x's dtype as bn_apply rounds it;
    # the membrane starts from (and, forward, ends in) the carried float32 state. An element's channel is
    # (offset // channel_stride) % C: channel_stride is 1 channels-last, else the positions per channel.

    @triton.jit
    def _bn_current(x_ptr, scale_ptr, shift_ptr, t, step, offs, chan, inb, C):
        x = tl.load(x_ptr + step + offs, mask=inb, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + t * C + chan, mask=inb, other=0.0)
        shift = tl.load(shift_ptr + t * C + chan, mask=inb, other=0.0)
        return (x * scale + shift).to(x_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _bn_lif_forward_loop(x_ptr, scale_ptr, shift_ptr, v_ptr, out_ptr, offs, inb, N, T, C, channel_stride, tau,
                             vth, HARD: tl.constexpr, STORE_H: tl.constexpr):
        """The time loop from the state at ``v_ptr``, writing the spikes (``STORE_H``: ``H``) into ``out_ptr``;
        returns the last membrane."""
        chan = (offs // channel_stride) % C
        v = tl.load(v_ptr + offs, mask=inb, other=0.0)
        n64 = N.to(tl.int64)
        for t in range(T):
            step = t * n64
            y = _bn_current(x_ptr, scale_ptr, shift_ptr, t, step, offs, chan, inb, C)
            h, spike, v = _lif_step(y, v, tau, vth, x_ptr.dtype.element_ty, HARD)
            if STORE_H:
                tl.store(out_ptr + step + offs, h.to(out_ptr.dtype.element_ty), mask=inb)
            else:
                tl.store(out_ptr + step + offs, spike.to(out_ptr.dtype.element_ty), mask=inb)
        return v

    @triton.jit
    def _bn_lif_forward_kernel(x_ptr, scale_ptr, shift_ptr, v_ptr, s_ptr, N, T, C, channel_stride, tau, vth,
                               HARD: tl.constexpr, BLOCK: tl.constexpr):
        """Spikes alone (neither the current nor the membrane is written); the last membrane into the state."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        v = _bn_lif_forward_loop(x_ptr, scale_ptr, shift_ptr, v_ptr, s_ptr, offs, inb, N, T, C, channel_stride, tau,
                                 vth, HARD, False)
        tl.store(v_ptr + offs, v, mask=inb)

    @triton.jit(do_not_specialize=["after"])
    def _bn_lif_backward_kernel(g_ptr, x_ptr, o_ptr, scale_ptr, shift_ptr, v_ptr, gv_ptr, N, T, C, L, channel_stride,
                                seed_ptr, after, tau, leak, vth, alpha, p, keep_scale, fill_kind, HARD: tl.constexpr,
                                DETACH: tl.constexpr, SURR: tl.constexpr, MASK: tl.constexpr, NLC: tl.constexpr,
                                BLOCK: tl.constexpr):
        """The current's gradient into ``o_ptr``, which first holds the recomputed ``H`` (so no membrane is ever
        allocated); the membrane's gradient carried in and out by ``gv_ptr``, the state only read."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inb = offs < N
        _bn_lif_forward_loop(x_ptr, scale_ptr, shift_ptr, v_ptr, o_ptr, offs, inb, N, T, C, channel_stride, tau, vth,
                             HARD, True)
        gv = tl.load(gv_ptr + offs, mask=inb, other=0.0)
        gv = _lif_backward_loop(g_ptr, o_ptr, o_ptr, offs, inb, gv, _draw_index(offs, C, L, MASK, NLC),
                                tl.load(seed_ptr), after, N, T, tau, leak, vth, alpha, p, keep_scale, fill_kind,
                                HARD, DETACH, SURR, MASK)
        tl.store(gv_ptr + offs, gv, mask=inb)


def _dense(x: torch.Tensor) -> torch.Tensor:
    return x if step_layout(x) is not None else x.contiguous()


def lif_forward_switches(reset_mode: str, keep_membrane: bool) -> dict:
    """The compile-time switches of the LIF forward kernel for these options."""
    return {"HARD": reset_mode == "hard", "SAVE_H": bool(keep_membrane), "BLOCK": LIF_BLOCK}


def lif_backward_switches(spec, reset_mode: str, detach_reset: bool, channels_last: bool) -> dict:
    """The compile-time switches of the LIF backward kernel; a switch that cannot change the result is
    given one value (no mask: no layout), so no two kernels that compute the same thing are compiled."""
    mask = options.mask_mode_id(spec.mask_mode, spec.mask_p)
    return {"HARD": reset_mode == "hard", "DETACH": bool(detach_reset), "SURR": spec.kernel_ids()[0],
            "MASK": mask, "NLC": spec.mask_p > 0 and spec.mask_mode == "channel" and channels_last, "BLOCK": LIF_BLOCK}


def lif_forward(current: torch.Tensor, tau: float, v_threshold: float, reset_mode: str, keep_membrane: bool):
    """Spikes of ``current [T, B, ...]`` and, if asked, the pre-spike membrane ``H``: one program per block of neurons."""
    current = _dense(current)
    T, N = current.shape[0], current[0].numel()
    spikes = torch.empty_like(current)
    membrane = torch.empty_like(current) if keep_membrane else spikes
    _launch(_lif_forward_kernel, (cdiv(N, LIF_BLOCK),), current, spikes, membrane, N, T, float(tau),
            float(v_threshold), num_warps=LIF_WARPS, **lif_forward_switches(reset_mode, keep_membrane))
    return spikes, (membrane if keep_membrane else None)


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int]:
    """``T``, the neurons of a timestep ``N``, channels ``C`` and positions per channel ``L`` of ``x [T, B, C, ...]``."""
    T, N = x.shape[0], x[0].numel()
    C = x.shape[2] if x.dim() > 2 else 1
    return T, N, C, N // (x.shape[1] * C)


def _channel_stride(x: torch.Tensor) -> int:
    """How many consecutive elements of a timestep of ``x`` share a channel (1 channels-last)."""
    return 1 if step_layout(x) == "nlc" else _geometry(x)[3]


def _backward_arguments(like: torch.Tensor, spec, reset_mode: str, detach_reset: bool,
                        seed: torch.Tensor | None = None):
    """A LIF backward kernel's mask seed (``seed``, else drawn now where it masks), its run-time values ``alpha`` to
    ``fill_kind`` and its compile-time switches."""
    switches = lif_backward_switches(spec, reset_mode, detach_reset, step_layout(like) == "nlc" and like.dim() == 5)
    if seed is None:
        seed = mask_key(like, spec)
    if seed is None:  # no mask: the kernel reads a key it never uses
        seed = like.new_zeros(1, dtype=torch.int64)
    keep_scale = 1.0 / (1.0 - spec.mask_p) if spec.rescale and 0 < spec.mask_p < 1 else 1.0
    return seed, (float(spec.alpha), float(spec.mask_p), keep_scale, spec.kernel_ids()[1]), switches


def lif_backward(grad: torch.Tensor, membrane: torch.Tensor, tau: float, v_threshold: float, spec, reset_mode: str,
                 detach_reset: bool, seed: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient w.r.t. the input from ``H``, the MSG mask drawn in the kernel from ``seed`` (an int64 tensor on the
    device; a fresh :func:`mask_seed` when None), never stored."""
    T, N, C, L = _geometry(membrane)
    grad = _laid_like(membrane, grad)
    out = torch.empty_like(membrane)
    seed, values, switches = _backward_arguments(membrane, spec, reset_mode, detach_reset, seed)
    _launch(_lif_backward_kernel, (cdiv(N, LIF_BLOCK),), grad, membrane, out, N, T, C, L, seed, float(tau),
            1.0 - 1.0 / float(tau), float(v_threshold), *values, num_warps=LIF_WARPS, **switches)
    return out


def _coefficients(scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return scale.float().contiguous(), shift.float().contiguous()


def bn_lif_chunk_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, state: torch.Tensor, tau: float,
                         v_threshold: float, reset_mode: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Spikes of the LIF fed ``x * scale + shift`` from the membrane ``state`` (left at the chunk's end), laid out
    like ``x`` (into ``out`` if given): one pass over ``x``, neither the current nor the membrane written."""
    T, N, C, L = _geometry(x)
    spikes = torch.empty_like(x) if out is None else out
    _launch(_bn_lif_forward_kernel, (cdiv(N, LIF_BLOCK),), x, *_coefficients(scale, shift), state, spikes, N, T, C,
            _channel_stride(x), float(tau), float(v_threshold), num_warps=LIF_WARPS, HARD=reset_mode == "hard",
            BLOCK=LIF_BLOCK)
    return spikes


def mask_key(like: torch.Tensor, spec) -> torch.Tensor | None:
    """One key for the MSG masks of a sequence run backward in chunks (None without a mask): each chunk's call
    then draws the masks one call over the whole sequence would."""
    return mask_seed(like.device) if options.mask_mode_id(spec.mask_mode, spec.mask_p) != options.NO_MASK else None


def bn_lif_chunk_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          state: torch.Tensor, grad_state: torch.Tensor, tau: float, v_threshold: float, spec,
                          reset_mode: str, detach_reset: bool, out: torch.Tensor | None = None,
                          key: torch.Tensor | None = None, after: int = 0) -> torch.Tensor:
    """The gradient of the current of :func:`bn_lif_chunk_forward` (into ``out`` if given), the membrane recomputed
    in the kernel into the output's own memory. The mask is drawn as :func:`lif_backward` draws it, so under one
    seed a pair and its two layers run one by one get the same mask; a chunk followed by ``after`` timesteps,
    under the sequence's :func:`mask_key` ``key``, gets the masks of its timesteps in the whole sequence."""
    T, N, C, L = _geometry(x)
    grad = _laid_like(x, grad)
    out = torch.empty_like(x) if out is None else out
    seed, values, switches = _backward_arguments(x, spec, reset_mode, detach_reset, key)
    _launch(_bn_lif_backward_kernel, (cdiv(N, LIF_BLOCK),), grad, x, out, *_coefficients(scale, shift), state,
            grad_state, N, T, C, L, _channel_stride(x), seed, int(after), float(tau), 1.0 - 1.0 / float(tau), float(v_threshold), *values,
            num_warps=PAIR_BACKWARD_WARPS, **switches)
    return out


# --------------------------------------------------------------------------- per-timestep BatchNorm
# A channels-last [T, B, C, H, W] tensor is [T, M, C] in memory (M = B*H*W): the statistics of
# (t, c) are column sums over the rows of one timestep. Partial sums come from a grid of
# (timestep, channel block, row split) programs, shifted by the first row for accuracy.


def bn_supports(x: torch.Tensor) -> bool:
    """Triton per-step BatchNorm takes CUDA tensors (any under the interpreter) whose timesteps are ``[M, C]`` row-major."""
    return (triton is not None and (x.is_cuda or _interpreting()) and x.dtype in DTYPES and x[0].numel() < 2**31
            and _rows_layout(x))


def _rows_layout(x: torch.Tensor) -> bool:
    layout = step_layout(x)
    return layout == "nlc" or (layout == "ncl" and x.dim() == 3)


def bn_channel_block(channels: int) -> int:
    """Channels per tile of the BatchNorm kernels: the next power of two, at most ``BN_MAX_CHANNELS``."""
    return min(BN_MAX_CHANNELS, 1 << max(0, channels - 1).bit_length())


def bn_sums_split(T: int, M: int, C: int) -> tuple[int, int]:
    """``(splits, rows_per_split)``: each (timestep, channel block) is cut into row splits so that about
    1024 programs share the sums; a split's rows are a multiple of ``BN_ROWS``."""
    channel_blocks = cdiv(C, bn_channel_block(C))
    splits = max(1, min(cdiv(M, BN_ROWS), 1024 // max(1, T * channel_blocks)))
    rows_per_split = cdiv(cdiv(M, splits), BN_ROWS) * BN_ROWS
    return cdiv(M, rows_per_split), rows_per_split


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
    def _bn_map_kernel(a_ptr, b_ptr, out_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, M, C,
                       BACKWARD: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr):
        """Per (t, c), forward: out = a * c0 + c1; backward: out = (a - (b - c0) * c1) * c2 - c3 (a = dy, b = x).

        A program maps a [BM, BC] tile of one timestep, so each coefficient is loaded once per tile column.
        """
        r0 = tl.program_id(0) * BM
        t = tl.program_id(1)
        cols = tl.program_id(2) * BC + tl.arange(0, BC)
        cin = cols < C
        m = (r0 + tl.arange(0, BM) < M)[:, None] & cin[None, :]
        base = (t.to(tl.int64) * M + r0) * C
        tile = tl.arange(0, BM)[:, None] * C + cols[None, :]  # int32 offsets within the tile
        a = tl.load(a_ptr + base + tile, mask=m, other=0.0).to(tl.float32)
        k0 = tl.load(c0_ptr + t * C + cols, mask=cin, other=0.0)[None, :]
        k1 = tl.load(c1_ptr + t * C + cols, mask=cin, other=0.0)[None, :]
        if BACKWARD:
            b = tl.load(b_ptr + base + tile, mask=m, other=0.0).to(tl.float32)
            k2 = tl.load(c2_ptr + t * C + cols, mask=cin, other=0.0)[None, :]
            k3 = tl.load(c3_ptr + t * C + cols, mask=cin, other=0.0)[None, :]
            y = (a - (b - k0) * k1) * k2 - k3
        else:
            y = a * k0 + k1
        tl.store(out_ptr + base + tile, y.to(out_ptr.dtype.element_ty), mask=m)


def _bn_geometry(x: torch.Tensor):
    T, C = x.shape[0], x.shape[2]
    return T, x[0].numel() // C, C


def _bn_sums(a: torch.Tensor, b: torch.Tensor | None, shift: torch.Tensor, product: bool):
    """Column sums per (t, c) over the M rows of each timestep: float32 ``[T, C]`` twice."""
    T, M, C = _bn_geometry(a)
    BC = bn_channel_block(C)
    splits, rows_per_split = bn_sums_split(T, M, C)
    part = torch.empty(T, splits, 2, C, device=a.device, dtype=torch.float32)
    _launch(_bn_sums_kernel, (T, cdiv(C, BC), splits), a, a if b is None else b, shift.float().contiguous(), part,
            M, C, splits, rows_per_split, num_warps=BN_WARPS, PRODUCT=product, BM=BN_ROWS, BC=BC)
    sums = part.sum(1)
    return sums[:, 0], sums[:, 1]


def bn_stats(x: torch.Tensor):
    """Biased mean and variance per (t, c), float32 ``[T, C]``."""
    T, M, C = _bn_geometry(x)
    shift = _first_row(x)
    s1, s2 = _bn_sums(x, None, shift, product=False)
    d = s1 / M
    return shift + d, (s2 / M - d * d).clamp_(min=0)


def _first_row(x: torch.Tensor) -> torch.Tensor:
    """``x[t, sample 0, :, pixel 0]`` as ``[T, C]`` float32: one sample per (t, c) to shift the sums by."""
    idx = (0,) * (x.dim() - 3)
    return x[(slice(None), 0, slice(None)) + idx].float()


def _bn_map(a: torch.Tensor, b: torch.Tensor, coefficients: list[torch.Tensor], backward: bool,
            out: torch.Tensor | None = None) -> torch.Tensor:
    T, M, C = _bn_geometry(a)
    BC = bn_channel_block(C)
    out = torch.empty_like(a) if out is None else out
    _launch(_bn_map_kernel, (cdiv(M, BN_ROWS), T, cdiv(C, BC)), a, b, out,
            *[c.float().contiguous() for c in coefficients], M, C,
            num_warps=BN_WARPS, BACKWARD=backward, BM=BN_ROWS, BC=BC)
    return out


def bn_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return _bn_map(x, x, [scale, shift, scale, shift], backward=False)


def _laid_like(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other`` with the dtype and strides of ``x`` (a copy where they differ)."""
    return other if other.dtype == x.dtype and other.stride() == x.stride() else torch.empty_like(x).copy_(other)


def bn_backward_sums(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
    return _bn_sums(_laid_like(x, dy), x, mean, product=True)


def bn_backward_input(dy, x, mean, q, a, r, out=None) -> torch.Tensor:
    return _bn_map(_laid_like(x, dy), x, [mean, q, a, r], backward=True, out=out)


# --------------------------------------------------------------------------- spikes as bit planes
# An entry's code is x * levels (an integer: the entries are multiples of 1 / levels); plane b holds bit b of
# every code, 8 entries a byte, in the tensor's memory order.

PACK_BYTES = 512  # bytes of a plane per program (4096 entries)
UNPACK_BLOCK = 2048  # entries per program

if triton is not None:

    @triton.jit
    def _pack_kernel(x_ptr, p_ptr, n, nbytes, levels, BITS: tl.constexpr, BLOCK: tl.constexpr):
        byte = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        lane = tl.arange(0, 8)
        entry = byte.to(tl.int64)[:, None] * 8 + lane[None, :]
        x = tl.load(x_ptr + entry, mask=entry < n, other=0.0).to(tl.float32)
        code = tl.floor(x * levels + 0.5).to(tl.int32)
        for b in tl.static_range(BITS):
            packed = tl.sum(((code >> b) & 1) << lane[None, :], axis=1)
            tl.store(p_ptr + b * nbytes + byte, packed.to(tl.uint8), mask=byte < nbytes)

    @triton.jit
    def _unpack_kernel(out_ptr, p_ptr, n, nbytes, inv_levels, BITS: tl.constexpr, BLOCK: tl.constexpr):
        entry = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inb = entry < n
        byte, lane = entry // 8, (entry % 8).to(tl.int32)
        code = tl.zeros([BLOCK], dtype=tl.int32)
        for b in tl.static_range(BITS):
            plane = tl.load(p_ptr + b * nbytes + byte, mask=inb, other=0).to(tl.int32)
            code = code | (((plane >> lane) & 1) << b)
        tl.store(out_ptr + entry, (code.to(tl.float32) * inv_levels).to(out_ptr.dtype.element_ty), mask=inb)


def pack_bits(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The bit planes of a dense ``x``'s codes, in memory order: ``[bits(levels), ceil(n / 8)]`` uint8."""
    n, k = x.numel(), int(levels).bit_length()
    nbytes = cdiv(n, 8)
    planes = torch.empty(k, nbytes, dtype=torch.uint8, device=x.device)
    flat = x.as_strided((n,), (1,), x.storage_offset())
    _launch(_pack_kernel, (cdiv(nbytes, PACK_BYTES),), flat, planes, n, nbytes, float(levels), num_warps=4,
            BITS=k, BLOCK=PACK_BYTES)
    return planes


def unpack_bits(planes: torch.Tensor, shape: tuple, stride: tuple, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``dtype`` tensor of ``shape`` and dense ``stride`` whose codes :func:`pack_bits` packed into ``planes``."""
    out = torch.empty_strided(shape, stride, dtype=dtype, device=planes.device)
    n = out.numel()
    _launch(_unpack_kernel, (cdiv(n, UNPACK_BLOCK),), out.as_strided((n,), (1,)), planes, n, planes.shape[1],
            1.0 / levels, num_warps=4, BITS=planes.shape[0], BLOCK=UNPACK_BLOCK)
    return out

