"""The fused CPU kernels: the LIF time loop, per-timestep BatchNorm and spikes as bits, in C, built at first use.

The kernels are plain C (``cpu.c`` beside this file, OpenMP, compiled with ``$CC`` or the
system's ``gcc``/``cc`` for the host CPU, loaded with ``ctypes``): no torch headers, so the
build takes a few seconds and needs nothing beyond a C compiler. :func:`build` raises
:class:`NoCompiler` or :class:`BuildFailed` (a compile error, a self-test that disagrees with
torch); :mod:`msgcli.snn.kernels` then warns and runs torch operators instead. The shared
library is built once (under a file lock) into a private folder, ``$MSGSNN_CACHE/cpu-kernels``
(default ``~/.cache/msgsnn/cpu-kernels``), keyed by the source, the compiler and its version, the
flags and the CPU.

Determinism. Every parallel loop has a static schedule and every sum over a batch is
made either by one thread or in fixed chunks added in a fixed order, so results do not
depend on the number of threads or on the load of the machine; ``-march=native`` (vector
width, fused multiply-add) makes them depend on the CPU model.

Layouts. The kernels see a ``[T, B, C, L]`` tensor stored ``ncl`` or ``nlc``
(:func:`msgcli.snn.memory.step_layout`), and write their large outputs into buffers of
:data:`msgcli.snn.memory.pool`. Options arrive as the kernels' numbers: a mask mode's in
:mod:`msgcli.snn.options`, a surrogate's ``kernel_id`` in :mod:`msgcli.snn.surrogate`.

MSG mask. The element mask must be the one the reference draws with
``torch.rand(shape) >= p`` per timestep, T-1 first. torch's CPU generator is an
MT19937 whose state ``torch.get_rng_state()`` exposes; the kernel draws the same
32-bit stream from that state (SIMD-friendly, in bulk), turns it into keep bits in
the tensor's physical order, and hands the advanced state back with
``torch.set_rng_state``. The bits live only during the layer's backward.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from msgcli.snn import options
from msgcli.snn.memory import pool, step_layout

try:
    import fcntl
except ImportError:  # Windows: no build lock
    fcntl = None

SOURCE = Path(__file__).with_name("cpu.c")  # shipped with the package
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]

_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
_STATE_BYTES = 5056



class NoCompiler(RuntimeError):
    """No C compiler to build the kernels with: torch operators run instead."""


class BuildFailed(RuntimeError):
    """The compiler is there but the kernels did not build, load or pass their self-test (or their folder is
    not safe to load from)."""


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` split as a shell would (``CC="ccache gcc"``), else ``gcc`` or ``cc``.

    ``None`` when the program it names is not found.
    """
    command = shlex.split(os.environ.get("CC", ""))
    if not command:
        found = shutil.which("gcc") or shutil.which("cc")
        return [found] if found else None
    return command if shutil.which(command[0]) else None


def _compiler_version(cc: list[str]) -> str:
    """``cc --version``'s output, part of the cache key: an upgraded compiler builds afresh."""
    try:
        proc = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildFailed(f"{shlex.join(cc)} --version failed: {err}") from None
    return proc.stdout + proc.stderr


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _private_dir(path: Path) -> Path:
    """``path`` created if needed, and checked to be this user's own folder that nobody else can write to.

    ctypes runs whatever library it finds there, so a folder another user made (e.g. at a
    predictable place under /tmp) or can write to is refused.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise BuildFailed(f"{path} is not a folder (a link?); remove it")
    if hasattr(os, "getuid"):
        if info.st_uid != os.getuid():
            raise BuildFailed(f"{path} belongs to another user (uid {info.st_uid}); remove it or set MSGSNN_CACHE")
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)  # ours, made under a loose umask: close it before anything is built there
    return path


def _kernel_dir() -> Path:
    """``<cache>/cpu-kernels`` (``$MSGSNN_CACHE``, default ``~/.cache/msgsnn``), else ``<tmp>/msgsnn-<uid>``."""
    cache = os.environ.get("MSGSNN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "msgsnn")
    try:
        return _private_dir(Path(cache).expanduser() / "cpu-kernels")
    except OSError:  # cache not writable: a private folder of this user under the temporary folder
        return _private_dir(Path(tempfile.gettempdir()) / f"msgsnn-{os.getuid() if hasattr(os, 'getuid') else 0}")


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One builder at a time per folder: N ranks or sweep jobs starting together compile once."""
    with open(directory / "build.lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _compile(cc: list[str], source: Path, path: Path) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = os.path.join(tmp, path.name)
        try:
            proc = subprocess.run([*cc, *FLAGS, str(source), "-o", out, "-lm"], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as err:
            raise BuildFailed(f"{shlex.join(cc)} could not run: {err}") from None
        if proc.returncode != 0:
            raise BuildFailed(f"{shlex.join(cc)} failed on {source}: {proc.stderr.strip()[-2000:]}")
        os.replace(out, path)  # atomic: a reader never sees half a library


def _load(cc: list[str]) -> "CpuKernels":
    text = SOURCE.read_text()
    key = hashlib.sha256("\0".join([text, *cc, _compiler_version(cc), *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    directory = _kernel_dir()
    path = directory / f"msgsnn_kernels_{key}.so"
    if not path.exists():
        with _build_lock(directory):
            if not path.exists():  # another process may have built it while this one waited
                _compile(cc, SOURCE, path)
    if hasattr(os, "getuid") and os.stat(path).st_uid != os.getuid():
        raise BuildFailed(f"{path} belongs to another user; remove it")
    return CpuKernels(ctypes.CDLL(str(path)))


def build() -> "CpuKernels":
    """The kernels, compiled (or found already built), loaded and self-tested.

    Raises :class:`NoCompiler` when there is no compiler, :class:`BuildFailed` for anything else.
    """
    cc = compiler()
    if cc is None:
        wanted = f"$CC ({os.environ['CC']})" if os.environ.get("CC", "").strip() else "gcc or cc"
        raise NoCompiler(f"no C compiler: {wanted} not found on PATH (install gcc or set CC for faster CPU training)")
    try:
        kernels = _load(cc)
        kernels.self_test()
    except Exception as err:  # noqa: BLE001 - a failed build, load or self-test: torch operators run instead
        raise BuildFailed(f"the fused CPU kernels failed to build or load ({err})") from err
    return kernels


def _bcl(x: torch.Tensor) -> tuple[int, int, int, int]:
    T, B = x.shape[0], x.shape[1]
    C = x.shape[2] if x.dim() > 2 else 1
    L = 1
    for n in x.shape[3:]:
        L *= n
    return T, B, C, L


def keep_threshold(p: float) -> int:
    """Integer threshold u24 with ``rand() >= p`` (float32 compare) <=> ``(u32 & 0xffffff) >= u24``."""
    p32 = float(np.float32(p))
    return int(np.ceil(p32 * 2**24))


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _DTYPES and step_layout(x) is not None


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _laid_like(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other`` with the dtype and strides of ``x`` (a copy from the pool where they differ)."""
    if other.dtype == x.dtype and other.stride() == x.stride():
        return other
    return pool.empty_like(x).copy_(other)


def _steps_laid_like(x: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``other`` read as the kernels read a dense ``x``, and the entries from one of its timesteps to the next:
    in place where each of its timesteps is laid out as ``x``'s are (a part of a larger batch's gradient, say),
    else a copy laid out like ``x``."""
    step = x[0].numel()
    if (other.dtype == x.dtype and other.shape == x.shape and other.stride(0) >= step
            and all(n == 1 or a == b for n, a, b in zip(x.shape[1:], other.stride()[1:], x.stride()[1:]))):
        return other, other.stride(0)
    return _laid_like(x, other), step


def _carries(x: torch.Tensor, state: torch.Tensor) -> bool:
    """``state`` is the carry the LIF kernel of ``x`` reads and writes: laid out like a timestep ``x[0]``, in the
    kernel's compute type (float32 for bfloat16 and float32, float64 for float64)."""
    return (state.dtype == state_dtype(x.dtype) and state.device.type == "cpu" and state.shape == x[0].shape
            and state.stride() == x[0].stride())


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type in which the LIF kernels compute (and carry) the membrane of a ``dtype`` tensor."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _double(t: torch.Tensor) -> torch.Tensor:
    """A ``[T, C]`` coefficient as the kernels read it: contiguous float64."""
    return t.to(torch.float64).contiguous()


class CpuKernels:
    """Typed wrappers around the shared library, with the operations of :mod:`msgcli.snn.kernels`.

    :meth:`takes` says which calls they run: CPU tensors of float32, float64 or bfloat16, dense
    timesteps, and built-in surrogates. A failed allocation inside a kernel raises MemoryError.
    """

    build_errors: tuple[type[Exception], ...] = ()  # every failure to build happens in build()
    gradient_in_place = True  # bn_lif_chunk_backward may write over its grad_spikes (out=grad_spikes)

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self._local = threading.local()
        i64, dbl, i32, vp, u32 = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32
        lib.msg_draw_mask.argtypes = [vp, vp, i64, i64, i64, i64, i64, i32, i32, u32, vp]
        lib.msg_draw_mask.restype = None
        for s in _DTYPES.values():
            getattr(lib, f"lif_fwd_{s}").argtypes = [vp, vp, vp, vp, i64, i64, dbl, dbl, i32, i32]
            getattr(lib, f"lif_bwd_{s}").argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, dbl, dbl, i32, i32, i32, dbl, i32, dbl, i32]
            getattr(lib, f"bn_stats_{s}").argtypes = [vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"bn_apply_{s}").argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"bn_bsums_{s}").argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"bn_bdx_{s}").argtypes = [vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i32, i32]
            getattr(lib, f"bnlif_fwd_{s}").argtypes = [vp, vp, vp, vp, vp, i64, i64, i64, i64, dbl, dbl, i32, i32, i32]
            getattr(lib, f"bnlif_bwd_{s}").argtypes = [vp, i64, vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, i64,
                                                       dbl, dbl, i32, i32, i32, dbl, i32, dbl, i32, i32]
            getattr(lib, f"spike_pack_{s}").argtypes = [vp, vp, i64, i64, i32, dbl, i32]
            getattr(lib, f"spike_unpack_{s}").argtypes = [vp, vp, i64, i64, i32, dbl, i32]
            for name in ("lif_fwd", "lif_bwd", "spike_pack", "spike_unpack"):
                getattr(lib, f"{name}_{s}").restype = None
            for name in ("bn_stats", "bn_apply", "bn_bsums", "bn_bdx", "bnlif_fwd", "bnlif_bwd"):
                getattr(lib, f"{name}_{s}").restype = i32

    def takes(self, op: str, *args) -> bool:
        """Whether these kernels run ``op`` on these arguments (the operation's own, in its order)."""
        if op == "lif_forward":
            return args[0].device.type == "cpu" and args[0].dtype in _DTYPES  # laid out densely if it is not
        if op == "lif_backward":
            return supports(args[1]) and args[4].kernel_ids() is not None
        if op == "lif_chunk_forward":
            return supports(args[0]) and _carries(args[0], args[1])
        if op == "lif_chunk_backward":
            return supports(args[1]) and _carries(args[1], args[2]) and args[5].kernel_ids() is not None
        if op == "bn_lif_chunk_forward":
            return supports(args[0]) and _carries(args[0], args[3])
        if op == "bn_lif_chunk_backward":
            return supports(args[1]) and _carries(args[1], args[4]) and _carries(args[1], args[5]) \
                and args[8].kernel_ids() is not None
        if op in ("bn_stats", "bn_apply"):
            return supports(args[0])
        if op in ("bn_backward_sums", "bn_backward_input"):
            return supports(args[1])
        if op in ("encode", "decode"):
            return False  # bytes only where planes are not packed here: torch operators
        if op == "pack_bits":
            return args[0].device.type == "cpu" and args[0].dtype in _DTYPES and _dense(args[0])
        if op == "unpack_bits":  # planes whose rows may be a slice of wider ones
            planes = args[0]
            return (planes.device.type == "cpu" and planes.dtype == torch.uint8 and planes.dim() == 2
                    and planes.stride(1) == 1 and args[4] in _DTYPES)
        raise ValueError(f"unknown operation {op!r}")

    @staticmethod
    def fuses_bn_lif(x: torch.Tensor) -> bool:
        """The BatchNorm-LIF pair kernels run a BatchNorm input of ``x``'s device and dtype (made dense if it is not)."""
        return x.device.type == "cpu" and x.dtype in _DTYPES

    def _bn(self, name: str, x: torch.Tensor, *args) -> None:
        """Run BatchNorm kernel ``name`` for ``x`` on ``args`` (tensors pass as pointers, held until it returns);
        its status 1 is a failed allocation of its work space."""
        pointers = [_ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
        if getattr(self.lib, f"{name}_{_DTYPES[x.dtype]}")(*pointers, int(step_layout(x) == "nlc"), torch.get_num_threads()):
            T, _, C, _ = _bcl(x)
            raise MemoryError(f"msgsnn: the C kernel {name} could not allocate its work space "
                              f"for T={T}, C={C}")

    # ---------------------------------------------------------------- LIF

    def lif_forward(self, x: torch.Tensor, tau: float, v_threshold: float, reset_mode: str, keep_membrane: bool,
                    state: torch.Tensor | None = None):
        """Spikes and (if asked) the pre-spike membrane ``H``, both laid out like ``x`` (made dense if it is not)."""
        if step_layout(x) is None:
            x = x.contiguous()
        T, N = x.shape[0], x[0].numel()
        spikes = pool.empty_like(x)
        membrane = pool.empty_like(x) if keep_membrane else None
        if x.numel():
            getattr(self.lib, f"lif_fwd_{_DTYPES[x.dtype]}")(
                _ptr(x), _ptr(spikes), _ptr(membrane), _ptr(state), T, N, tau, v_threshold, int(reset_mode == "hard"),
                torch.get_num_threads())
        return spikes, membrane

    def lif_chunk_forward(self, x, state, tau, v_threshold, reset_mode, keep_membrane):
        return self.lif_forward(x, tau, v_threshold, reset_mode, keep_membrane, state)

    def _scratch(self, nbytes: int) -> torch.Tensor:
        """A per-thread byte buffer of at least ``nbytes``, kept between calls."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf

    def draw_mask(self, like: torch.Tensor, mode: str, p: float) -> tuple[torch.Tensor, int]:
        """Keep bits ``[T, ceil(N/8)]`` for ``like [T, B, C, ...]``: the reference's draws, timestep T-1 first."""
        T, B, C, L = _bcl(like)
        rowbytes = (B * C * L + 7) // 8
        bits = pool.empty_strided((T * rowbytes,), (1,), torch.uint8)
        scratch = self._scratch(C * L + L)
        state = torch.get_rng_state()
        self.lib.msg_draw_mask(_ptr(state), _ptr(bits), rowbytes, T, B, C, L,
                               int(step_layout(like) == "nlc"), options.mask_mode_id(mode, p), keep_threshold(p),
                               _ptr(scratch))
        torch.set_rng_state(state)
        return bits, rowbytes

    def lif_chunk_backward(self, grad, membrane, grad_state, tau, v_threshold, spec, reset_mode, detach_reset):
        return self.lif_backward(grad, membrane, tau, v_threshold, spec, reset_mode, detach_reset, grad_state=grad_state)

    def draw_chunk_mask(self, like: torch.Tensor, spec) -> tuple[torch.Tensor, int] | None:
        """The MSG keep bits that :meth:`bn_lif_chunk_backward` of ``like`` would draw now, and their row length
        (None without a mask): for calls on parts of ``like``'s batch (see ``mask`` there)."""
        return self.draw_mask(like, spec.mask_mode, spec.mask_p) if spec.mask_p > 0 else None

    def _gradient_options(self, like: torch.Tensor, spec, reset_mode: str, detach_reset: bool, mask=None):
        """The MSG keep bits of ``like``'s shape (``mask``'s if given, else drawn now; None without a mask), their
        row length, and the LIF backward kernels' trailing arguments from ``reset_mode`` on."""
        bits, rowbytes = None, 0
        if mask is not None:
            bits, rowbytes = mask
        elif spec.mask_p > 0:
            bits, rowbytes = self.draw_mask(like, spec.mask_mode, spec.mask_p)
        keep_div = (1.0 - spec.mask_p) if (spec.rescale and spec.mask_p < 1.0) else 0.0
        surrogate_id, fill_id = spec.kernel_ids()
        return bits, rowbytes, (int(reset_mode == "hard"), int(detach_reset), surrogate_id, spec.alpha, fill_id,
                                keep_div)

    def lif_backward(self, grad: torch.Tensor, membrane: torch.Tensor, tau: float, v_threshold: float,
                     spec, reset_mode: str, detach_reset: bool, seed=None,
                     grad_state: torch.Tensor | None = None) -> torch.Tensor:
        """The mask from torch's generator, as the reference draws it (``seed``, the Triton kernel's key, is not used);
        ``grad_state``, when given, is the membrane's gradient carried into the chunk and out of it (in place)."""
        T, N = membrane.shape[0], membrane[0].numel()
        grad = _laid_like(membrane, grad)
        out = pool.empty_like(membrane)
        if not membrane.numel():
            return out
        bits, rowbytes, rest = self._gradient_options(membrane, spec, reset_mode, detach_reset)
        getattr(self.lib, f"lif_bwd_{_DTYPES[membrane.dtype]}")(
            _ptr(grad), _ptr(membrane), _ptr(out), _ptr(grad_state), _ptr(bits), rowbytes, T, N, tau, v_threshold,
            *rest, torch.get_num_threads())
        return out

    # ---------------------------------------------------------------- BatchNorm's affine map and the LIF, fused

    def bn_lif_chunk_forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, state: torch.Tensor,
                             tau: float, v_threshold: float, reset_mode: str,
                             out: torch.Tensor | None = None) -> torch.Tensor:
        """Spikes of the LIF fed ``x * scale + shift``, laid out like ``x`` (into ``out`` if given); neither that
        current nor the membrane is written out."""
        T, B, C, L = _bcl(x)
        spikes = pool.empty_like(x) if out is None else out
        if x.numel():
            self._bn("bnlif_fwd", x, x, spikes, _double(scale), _double(shift), state, T, B, C, L, tau, v_threshold,
                     int(reset_mode == "hard"))
        return spikes

    def bn_lif_chunk_backward(self, grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                              state: torch.Tensor, grad_state: torch.Tensor, tau: float, v_threshold: float, spec,
                              reset_mode: str, detach_reset: bool, out: torch.Tensor | None = None, key=None,
                              after: int = 0, mask: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
        """The gradient of the current ``x * scale + shift`` (into ``out``, laid out like ``x``, if given), its
        membrane recomputed inside the kernel; the mask from torch's generator (``key`` and ``after``, the Triton
        kernel's, are not used: chunks drawn latest first continue the stream as one call would). ``mask``:
        keep bits and row length drawn before by :meth:`draw_chunk_mask` for a whole batch of which ``x`` is
        samples ``b0:b1``, the bits from sample ``b0``'s on (``b0 * C * L`` a multiple of 8)."""
        T, B, C, L = _bcl(x)
        grad, step = _steps_laid_like(x, grad)
        out = pool.empty_like(x) if out is None else out
        if not x.numel():
            return out
        bits, rowbytes, rest = self._gradient_options(x, spec, reset_mode, detach_reset, mask)
        self._bn("bnlif_bwd", x, grad, step, x, out, _double(scale), _double(shift), state, grad_state, bits, rowbytes,
                 T, B, C, L, tau, v_threshold, *rest)
        return out

    # ---------------------------------------------------------------- BatchNorm per timestep

    def bn_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Biased mean and variance per (t, c), float64 ``[T, C]``."""
        T, B, C, L = _bcl(x)
        mean = torch.empty(T, C, dtype=torch.float64)
        var = torch.empty(T, C, dtype=torch.float64)
        self._bn("bn_stats", x, x, mean, var, T, B, C, L)
        return mean, var

    def bn_apply(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        T, B, C, L = _bcl(x)
        y = pool.empty_like(x)
        self._bn("bn_apply", x, x, y, _double(scale), _double(shift), T, B, C, L)
        return y

    def bn_backward_sums(self, dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor):
        T, B, C, L = _bcl(x)
        dy = _laid_like(x, dy)
        sdy = torch.empty(T, C, dtype=torch.float64)
        sdyx = torch.empty(T, C, dtype=torch.float64)
        self._bn("bn_bsums", x, dy, x, _double(mean), sdy, sdyx, T, B, C, L)
        return sdy, sdyx

    def bn_backward_input(self, dy, x, mean, q, a, r, out=None) -> torch.Tensor:
        T, B, C, L = _bcl(x)
        dy = _laid_like(x, dy)
        dx = pool.empty_like(x) if out is None else out
        self._bn("bn_bdx", x, dy, x, dx, *(_double(k) for k in (mean, q, a, r)), T, B, C, L)
        return dx

    # ---------------------------------------------------------------- spike bit planes

    def pack_bits(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """The bit planes of a dense ``x``'s codes (:func:`msgcli.snn.packing.pack`), in one pass: no codes between."""
        k, n = int(levels).bit_length(), x.numel()
        planes = torch.empty((k, -(-n // 8)), dtype=torch.uint8)
        getattr(self.lib, f"spike_pack_{_DTYPES[x.dtype]}")(_ptr(x), _ptr(planes), n, planes.stride(0), k,
                                                           float(levels), torch.get_num_threads())
        return planes

    def unpack_bits(self, planes: torch.Tensor, shape: tuple, stride: tuple, levels: int,
                    dtype: torch.dtype) -> torch.Tensor:
        """The ``dtype`` tensor of ``shape`` and dense ``stride`` whose codes ``planes`` hold, in one pass."""
        x = pool.empty_strided(shape, stride, dtype)
        getattr(self.lib, f"spike_unpack_{_DTYPES[dtype]}")(_ptr(planes), _ptr(x), x.numel(), planes.stride(0),
                                                           planes.shape[0], float(levels), torch.get_num_threads())
        return x

    # ---------------------------------------------------------------- self-test

    def self_test(self) -> None:
        """The mask stream must be torch's own; a mismatch disables the kernels (callers fall back)."""
        saved = torch.get_rng_state()
        if saved.numel() != _STATE_BYTES:
            raise RuntimeError(f"unexpected torch CPU generator state size {saved.numel()}")
        try:
            for seed, p, shape in ((3, 0.5, (3, 2, 5, 7, 9)), (11, 0.3, (2, 1, 700)), (5, 0.77, (4, 2, 16, 3, 5))):
                x = torch.zeros(shape)
                if len(shape) == 5:
                    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape)
                torch.manual_seed(seed)
                torch.rand(5)  # start mid-block
                bits, rowbytes = self.draw_mask(x, "element", p)
                after = torch.rand(3)
                torch.manual_seed(seed)
                torch.rand(5)
                ref = torch.stack([torch.rand(shape[1:]) >= p for _ in range(shape[0])][::-1])
                ref_after = torch.rand(3)
                phys = ref if step_layout(x) == "ncl" else ref.permute(0, 1, 3, 4, 2)
                phys = phys.reshape(shape[0], -1)
                got = torch.from_numpy(np.unpackbits(bits.view(shape[0], rowbytes).numpy(), axis=1, bitorder="little"))
                got = got[:, : phys.shape[1]].bool()
                if not torch.equal(got, phys) or not torch.equal(after, ref_after):
                    raise RuntimeError("the MSG mask stream differs from torch.rand")
        finally:
            torch.set_rng_state(saved)
