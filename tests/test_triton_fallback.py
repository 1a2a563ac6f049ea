"""A Triton kernel that cannot be built for the GPU falls back to torch operators, once and loudly;
an error while running one (a CUDA out-of-memory, say) propagates. Every launch runs on its tensors' device.

Build failures are Triton's ``CompilationError``, ``PTXASError`` and ``OutOfResources`` and anything
raised inside ``triton.compile``. ``test_kernel_failures_in_the_interpreter`` runs the layers with
Triton's kernels on CPU tensors (``TRITON_INTERPRET=1``, in a subprocess), one launch at a time
replaced by one that raises: LIF forward and backward, BatchNorm statistics, normalisation,
backward sums and input gradient. No GPU is needed.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources, PTXASError  # noqa: E402

from msgcli.snn import LIF, TemporalBatchNorm, kernels, packing  # noqa: E402
from msgcli.snn.kernels import cuda  # noqa: E402
from msgcli.snn.layers.recompute import lean_bn_lif  # noqa: E402
from msgcli.snn.msg import SpikeSpec  # noqa: E402
from tests.test_cuda import run_in_interpreter  # noqa: E402


def build_errors() -> list[Exception]:
    return [CompilationError("def kernel(x): ...", None, "unsupported construct"),
            PTXASError("`ptxas` failed with error code 255"),
            OutOfResources(300_000, 232_448, "shared memory")]


def run_errors() -> list[Exception]:
    return [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")]


class RaisingKernel:
    """Stands in for a Triton kernel: raises ``error`` at the launches whose switches match, runs ``kernel`` at the others."""

    def __init__(self, kernel, switches: dict, error: Exception) -> None:
        self.kernel, self.switches, self.error, self.raised = kernel, switches, error, 0
        self.__name__ = kernel.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if all(kwargs.get(k) == v for k, v in self.switches.items()):
                self.raised += 1
                raise self.error
            return self.kernel[grid](*args, **kwargs)

        return launch


def triton_family(load=lambda: cuda) -> kernels.Family:
    """A fresh family of Triton kernels (by default usable, as if CUDA were there and its driver up), not yet warned about."""
    return kernels.Family("Triton kernels", load, kernels.TRITON_KERNELS.consequence)


# --- which errors are build failures ----------------------------------------------------------


@pytest.mark.parametrize("error", build_errors(), ids=lambda e: type(e).__name__)
def test_triton_build_errors_are_build_failures(error):
    assert cuda.is_build_error(error)


@pytest.mark.parametrize("error", run_errors(), ids=lambda e: type(e).__name__)
def test_run_errors_are_not_build_failures(error):
    assert not cuda.is_build_error(error)


@triton.jit
def _kernel_with_an_error(x_ptr, BLOCK: triton.language.constexpr):
    triton.language.store(x_ptr + triton.language.arange(0, BLOCK), undefined_name)  # noqa: F821


def _compile(kernel, signature, constexprs):
    return triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))


def test_errors_raised_inside_triton_compile_are_build_failures(monkeypatch, tmp_path):
    """The front end's error, and a RuntimeError from an MLIR pass (which has no type of its own)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with pytest.raises(CompilationError) as caught:
        _compile(_kernel_with_an_error, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16})
    assert cuda.is_build_error(caught.value)

    from triton.backends.nvidia.compiler import CUDABackend

    def failing_pass(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(CUDABackend, "make_ttgir", staticmethod(failing_pass))
    signature = {"x_ptr": "*fp32", "s_ptr": "*fp32", "h_ptr": "*fp32", "N": "i32", "T": "i32", "tau": "fp32",
                 "vth": "fp32", "HARD": "constexpr", "SAVE_H": "constexpr", "BLOCK": "constexpr"}
    with pytest.raises(RuntimeError, match="PassManager") as caught:
        _compile(cuda._lif_forward_kernel, signature, cuda.lif_forward_switches("hard", True))
    assert cuda.is_build_error(caught.value)


@pytest.mark.parametrize("error", build_errors() + run_errors(), ids=lambda e: type(e).__name__)
def test_launch_names_the_kernel_of_a_build_failure_and_passes_other_errors_on(error):
    kernel = RaisingKernel(cuda._lif_forward_kernel, {}, error)
    with pytest.raises(Exception) as caught:
        cuda._launch(kernel, (1,), torch.zeros(1), num_warps=4)
    if cuda.is_build_error(error):
        assert isinstance(caught.value, cuda.TritonBuildError) and caught.value.__cause__ is error
        assert "_lif_forward_kernel" in str(caught.value) and type(error).__name__ in str(caught.value)
    else:
        assert caught.value is error


class FailingToBuild:
    """Fused kernels that take every call and cannot build the LIF forward."""

    build_errors = (cuda.TritonBuildError,)

    def takes(self, op, *args) -> bool:
        return True

    def lif_forward(self, *args):
        raise cuda.TritonBuildError("_lif_forward_kernel", PTXASError("boom"))


def test_strict_kernels_raise_a_build_failure_and_the_others_fall_back_once():
    family = triton_family(FailingToBuild)
    x = torch.randn(3, 2, 5)
    with pytest.raises(cuda.TritonBuildError, match="_lif_forward_kernel"):
        kernels.Kernels("triton", family, strict=True).lif_forward(x, 2.0, 0.5, "hard", False)
    assert family.get() is not None  # strict: not turned off
    falling_back = kernels.Kernels("cuda", family)
    with pytest.warns(RuntimeWarning, match="_lif_forward_kernel.*PTXASError.*torch operators") as caught:
        spikes, _ = falling_back.lif_forward(x, 2.0, 0.5, "hard", False)
    assert len(caught) == 1 and family.get() is None
    assert torch.equal(spikes, kernels.TORCH.lif_forward(x, 2.0, 0.5, "hard", False)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        falling_back.lif_forward(x, 2.0, 0.5, "hard", False)


def test_strict_kernels_refuse_a_call_they_do_not_take():
    with pytest.raises(ValueError, match="backend: 'triton' has no kernel for this call.*use 'auto'"):
        LIF(backend="triton")(torch.randn(3, 2, 5))  # a CPU tensor


def test_a_driver_that_cannot_start_turns_triton_off_with_one_warning(monkeypatch):
    monkeypatch.setattr(cuda, "AVAILABLE", True)
    error = cuda.TritonBuildError("the C module of its CUDA driver", RuntimeError("Failed to find C compiler"))
    monkeypatch.setattr(cuda, "driver_error", lambda: error)
    family = triton_family(kernels._load_triton_kernels)
    with pytest.warns(RuntimeWarning, match="C module of its CUDA driver.*Failed to find C compiler"):
        assert family.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert family.get() is None


# --- end to end, kernels in Triton's interpreter ----------------------------------------------

PLACES = {  # a launch that fails: the kernel, and the switches that single out the launch
    "LIF forward": ("_lif_forward_kernel", {}),
    "LIF backward": ("_lif_backward_kernel", {}),
    "BN statistics": ("_bn_sums_kernel", {"PRODUCT": False}),
    "BN normalisation": ("_bn_map_kernel", {"BACKWARD": False}),
    "BN backward sums": ("_bn_sums_kernel", {"PRODUCT": True}),
    "BN input gradient": ("_bn_map_kernel", {"BACKWARD": True}),
    "pair forward": ("_bn_lif_forward_kernel", {}),
    "pair backward": ("_bn_lif_backward_kernel", {}),
    "pack": ("_pack_kernel", {}),
    "unpack": ("_unpack_kernel", {}),
}


def _layer_output_and_grad(place: str, spec: SpikeSpec = SpikeSpec()):
    """A LIF, per-step BatchNorm or BatchNorm-LIF pair's output and input gradient on a channels-last CPU tensor,
    through the CPU's kernels (which the callers point at Triton's, or at none); for packing, spikes packed into bits
    and unpacked, twice."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 3, 3)
    x = (torch.randn(shape, generator=g) * 0.8 + 0.4).flatten(0, 1).contiguous(memory_format=torch.channels_last)
    x = x.view(shape).requires_grad_()
    up = torch.randn(shape, generator=g)
    if place.startswith("LIF"):
        y = LIF(surrogate=spec.surrogate, mask_p=spec.mask_p)(x)
    elif place in ("pack", "unpack"):
        spikes = (x.detach() > 0.4).float()
        y = packing.unpack(packing.pack(spikes, 1), torch.float32)
        return y, packing.unpack(packing.pack(spikes, 1), torch.float32)
    elif place.startswith("pair"):
        y = lean_bn_lif(x, TemporalBatchNorm(4), LIF(surrogate=spec.surrogate, mask_p=spec.mask_p), shape[0])
    else:
        y = TemporalBatchNorm(4)(x)
    y.backward(up)
    return y.detach(), x.grad


def check_fallbacks() -> None:
    """Every place, every error: build failures give the torch result and one warning, run errors propagate."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels.CPU, "fused", None)
        references = {place: _layer_output_and_grad(place) for place in PLACES}  # torch operators throughout
    for place, (name, switches) in PLACES.items():
        for error in build_errors() + run_errors():
            with pytest.MonkeyPatch.context() as mp:
                family = triton_family()
                mp.setattr(kernels.CPU, "fused", family)
                kernel = RaisingKernel(getattr(cuda, name), switches, error)
                mp.setattr(cuda, name, kernel)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if cuda.is_build_error(error):
                        y, grad = _layer_output_and_grad(place)
                        torch.testing.assert_close(y, references[place][0], rtol=1e-5, atol=1e-5)
                        torch.testing.assert_close(grad, references[place][1], rtol=1e-5, atol=1e-5)
                        assert family.get() is None, place
                        _layer_output_and_grad(place)  # Triton is off now: not tried again, not warned again
                        assert kernel.raised == 1, place
                        assert len(caught) == 1 and caught[0].category is RuntimeWarning, (place, caught)
                        assert name in str(caught[0].message) and type(error).__name__ in str(caught[0].message)
                    else:
                        with pytest.raises(type(error)) as raised:
                            _layer_output_and_grad(place)
                        assert raised.value is error, place
                        assert family.get() is cuda and not caught, (place, caught)


def test_kernel_failures_in_the_interpreter():
    run_in_interpreter("from tests.test_triton_fallback import check_fallbacks; check_fallbacks()")


# --- every launch on its tensors' device (issue 21, item 6) -----------------------------------


def check_every_launch_is_guarded() -> None:
    """Each kernel of ``kernels/cuda.py`` is launched inside ``torch.cuda.device_of`` of its own tensors.

    ``device_of`` is replaced by a recorder of the devices it was entered with, every kernel by a
    wrapper that checks, at launch, that the innermost guard is its first tensor's device; LIF
    (MSG on and off) and per-step BatchNorm then run forward and backward, and every kernel must
    have been launched.
    """
    guards: list[torch.device] = []

    @contextlib.contextmanager
    def device_of(tensor):
        guards.append(tensor.device)
        try:
            yield
        finally:
            guards.pop()

    launched = set()

    class Checked:
        def __init__(self, kernel) -> None:
            self.kernel, self.__name__ = kernel, kernel.__name__

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                device = next(a for a in args if isinstance(a, torch.Tensor)).device
                assert guards and guards[-1] == device, (self.__name__, guards, device)
                launched.add(self.__name__)
                return self.kernel[grid](*args, **kwargs)

            return launch

    jitted = type(cuda._lif_forward_kernel)  # a JITFunction, or under the interpreter an InterpretedFunction
    names = {name for name, value in vars(cuda).items() if isinstance(value, jitted) and name.endswith("_kernel")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "device_of", device_of)
        mp.setattr(kernels.CPU, "fused", triton_family())
        for name in names:
            mp.setattr(cuda, name, Checked(getattr(cuda, name)))
        for place, spec in (("LIF", SpikeSpec()), ("LIF", SpikeSpec(mask_p=0.5)), ("BN", SpikeSpec()),
                            ("pair", SpikeSpec(mask_p=0.5)), ("pack", SpikeSpec())):
            _layer_output_and_grad(place, spec)
    assert launched == names == set(n for n, _ in PLACES.values()), (launched, names)


def test_every_launch_runs_on_its_tensors_device():
    run_in_interpreter("from tests.test_triton_fallback import check_every_launch_is_guarded; "
                       "check_every_launch_is_guarded()")
