"""Every Triton kernel of msgsnn compiles ahead of time for the A100 (sm_80) and the H100/H200 (sm_90), no GPU needed.

The launches are not listed here: :func:`recorded_launches` runs the real launchers of
``msgcli.snn.kernels.cuda`` on meta tensors, with ``_launch`` recording instead of launching, over
every option training can pass them (dtype, surrogate, MSG on/off, mask mode, fill and rescale,
reset, detach_reset, layout, keep_membrane; BatchNorm channel counts that give every channel block
``bn_channel_block`` can pick). Launches with the same kernel, dtype and compile-time switches are
one compiled kernel. Each is compiled to a cubin with ``triton.compile`` for a named target, and
ptxas reports its registers, spills and shared memory (printed with ``pytest -s``, written to
``triton-kernels-<target>.txt`` in pytest's temporary folder). A compile error or a spill in a
LIF kernel fails the test.

``test_every_switch_compiles`` compiles, per target and dtype, a subset in which every value of
every switch occurs at least once; ``test_every_launch_compiles_for_sm90`` (``exhaustive``: run with
``MSGSNN_EXHAUSTIVE=1``, a few minutes of CPU) compiles all.
Compiles run in one worker process per CPU core; results are shared within the session.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import time
from dataclasses import dataclass

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not importable: nothing to compile")

from msgcli.snn import options  # noqa: E402
from msgcli.snn.kernels import cuda  # noqa: E402
from msgcli.snn.msg import SpikeSpec  # noqa: E402
from msgcli.snn.options import MASK_MODES, RESETS  # noqa: E402
from msgcli.snn.surrogate import BUILTIN, ZERO_FILL  # noqa: E402

SURROGATES = tuple(s.name for s in BUILTIN)  # the surrogates the kernels compute
MASK_FILLS = (ZERO_FILL,) + SURROGATES

TARGETS = {"sm_80": 80, "sm_90": 90}
LIF_KERNELS = ("_lif_forward_kernel", "_lif_backward_kernel", "_bn_lif_forward_kernel", "_bn_lif_backward_kernel")


@dataclass(frozen=True)
class Launch:
    """One compiled kernel: what ``triton.compile`` needs, as the JIT would pass it for the recorded call."""

    kernel: str
    dtype: str
    switches: tuple  # (name, value) pairs of the constexpr switches, sorted
    num_warps: int
    signature: tuple  # (name, type) pairs
    constexprs: tuple  # ((index,), value) pairs
    attrs: tuple  # ((index,), attributes) pairs

    def label(self) -> str:
        return f"{self.kernel} {self.dtype} " + " ".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                                        for k, v in self.switches)


def _specialise(kernel, args, switches):
    """Signature, constants and attributes of a call, by Triton's own rules (as ``JITFunction.run`` binds it)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    values = dict(zip(kernel.arg_names, args), **switches)
    signature, constexprs, attrs = [], [], []
    for i, param in enumerate(kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature.append((param.name, "constexpr"))
            constexprs.append(((i,), value))
            continue
        kind, spec = native_specialize_impl(backend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature.append((param.name, kind))
        if kind == "constexpr":
            constexprs.append(((i,), spec))
        elif isinstance(spec, str):
            attrs.append(((i,), tuple(tuple(a) for a in backend.parse_attr(spec))))
    return tuple(signature), tuple(constexprs), tuple(attrs)


def _meta(shape, dtype, channels_last):
    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last:
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape)
    return x


def recorded_launches() -> list[Launch]:
    """Every distinct kernel the launchers launch for the options training can pass, in first-seen order."""
    seen: dict[tuple, Launch] = {}

    def record(kernel, grid, *args, num_warps, **switches):
        signature, constexprs, attrs = _specialise(kernel, args, switches)
        dtype = next(kind for _, kind in signature if kind.startswith("*"))[1:]
        key = (kernel.__name__, dtype, tuple(sorted(switches.items())), num_warps)
        if key not in seen:
            seen[key] = Launch(kernel.__name__, dtype, key[2], num_warps, signature, constexprs, attrs)

    specs = [SpikeSpec(s, 2.0, p, mode, fill, rescale)
             for s, p, mode, fill, rescale in itertools.product(SURROGATES, (0.0, 0.5, 1.0), MASK_MODES, MASK_FILLS,
                                                                  (False, True))]
    # the smallest channel count that gives each channel block
    blocks = {cuda.bn_channel_block(c): c for c in range(4 * cuda.BN_MAX_CHANNELS, 0, -1)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda, "_launch", record)
        for dtype in cuda.DTYPES:
            for channels_last, reset, detach in itertools.product((False, True), RESETS, (False, True)):
                x = _meta((10, 4, 16, 6, 6), dtype, channels_last)
                for keep in (False, True):
                    cuda.lif_forward(x, 2.0, 0.5, reset, keep)
                for spec in specs:
                    cuda.lif_backward(x, x, 2.0, 0.5, spec, reset, detach)
                # the BatchNorm-LIF pair
                state = torch.empty_like(x[0], dtype=torch.float32)
                stat = torch.empty(10, 16, device="meta")
                cuda.bn_lif_chunk_forward(x, stat, stat, state, 2.0, 0.5, reset)
                for spec in specs:
                    cuda.bn_lif_chunk_backward(x, x, stat, stat, state, state, 2.0, 0.5, spec, reset, detach)
            for levels in (1, 2, 4, 8, 16, 32, 64, 128):  # spikes and their exact averages (spike_conv.pooled_levels)
                planes = cuda.pack_bits(x, levels)
                cuda.unpack_bits(planes, tuple(x.shape), x.stride(), levels, dtype)
            for channels in sorted(blocks.values()):
                x = _meta((10, 4, channels, 6, 6), dtype, True)
                stat = torch.empty(10, channels, device="meta")
                cuda.bn_stats(x)
                cuda.bn_apply(x, stat, stat)
                cuda.bn_backward_sums(x, x, stat)
                cuda.bn_backward_input(x, x, stat, stat, stat, stat)
    return list(seen.values())


def covering_subset(launches: list[Launch]) -> list[Launch]:
    """Per kernel and dtype, launches (greedily chosen) in which every value of every switch occurs at least once."""
    chosen = []
    groups = itertools.groupby(sorted(launches, key=lambda launch: (launch.kernel, launch.dtype)),
                               key=lambda launch: (launch.kernel, launch.dtype))
    for _, group in groups:
        group = list(group)
        missing = {pair for launch in group for pair in launch.switches}
        while missing:
            best = max(group, key=lambda launch: len(missing & set(launch.switches)))
            chosen.append(best)
            missing -= set(best.switches)
    return chosen


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile one kernel to a cubin for ``sm_<arch>``; registers, spills and shared memory from ptxas -v.

    Runs in a worker whose environment asks Triton to always compile and to print the ptxas log.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(cuda, launch.kernel)
    source = ASTSource(kernel, dict(launch.signature), dict(launch.constexprs),
                       {k: [list(a) for a in v] for k, v in launch.attrs})
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})
    except Exception as err:  # noqa: BLE001 - reported by the test, with the launch that failed
        return {"error": f"{type(err).__name__}: {err}"[:2000]}
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        return {"error": "no ptxas report in the compile log:\n" + text[-2000:]}
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "shared": compiled.metadata.shared,
            "cubin_bytes": len(compiled.asm["cubin"]), "seconds": time.perf_counter() - start}


@pytest.fixture(scope="session")
def launches():
    return recorded_launches()


@pytest.fixture(scope="session")
def compiler(tmp_path_factory):
    """``compile(launches, target) -> {launch: result}``, in worker processes, results cached for the session."""
    cache: dict[tuple, dict] = {}
    folder = tmp_path_factory.mktemp("triton-aot")
    env = {"TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1", "TRITON_CACHE_DIR": str(folder / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:

            def compile_all(todo: list[Launch], target: str) -> dict[Launch, dict]:
                arch = TARGETS[target]
                new = [launch for launch in todo if (launch, arch) not in cache]
                for launch, result in zip(new, pool.map(compile_launch, new, itertools.repeat(arch))):
                    cache[launch, arch] = result
                results = {launch: cache[launch, arch] for launch in todo}
                _report(results, target, folder)
                return results

            yield compile_all


def _report(results: dict[Launch, dict], target: str, folder) -> None:
    """Per kernel: compiles, compile time, the most registers, spills and shared memory; the full table to a file."""
    lines = [f"{'kernel':<22}{'dtype':>6}{'switches':>60}{'regs':>6}{'spill st/ld':>13}{'smem B':>8}{'s':>6}"]
    for launch, r in results.items():
        switches = launch.label().split(" ", 2)[2]
        if "error" in r:
            lines.append(f"{launch.kernel:<22}{launch.dtype:>6}{switches:>60}  FAILED")
        else:
            lines.append(f"{launch.kernel:<22}{launch.dtype:>6}{switches:>60}{r['registers']:>6}"
                         f"{str(r['spill_stores']) + '/' + str(r['spill_loads']):>13}{r['shared']:>8}{r['seconds']:>6.1f}")
    path = folder / f"triton-kernels-{target}.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"\n{target}: {len(results)} kernels compiled; every one in {path}")
    print(f"{'kernel':<22}{'compiles':>9}{'seconds':>9}{'max regs':>10}{'max spill B':>13}{'max smem B':>12}")
    for name, group in itertools.groupby(sorted(results.items(), key=lambda kv: kv[0].kernel), key=lambda kv: kv[0].kernel):
        ok = [r for _, r in group if "error" not in r]
        if ok:
            print(f"{name:<22}{len(ok):>9}{sum(r['seconds'] for r in ok):>9.1f}{max(r['registers'] for r in ok):>10}"
                  f"{max(r['spill_stores'] + r['spill_loads'] for r in ok):>13}{max(r['shared'] for r in ok):>12}")


def _check(results: dict[Launch, dict], target: str) -> None:
    failed = [f"{launch.label()}: {r['error']}" for launch, r in results.items() if "error" in r]
    assert not failed, f"{len(failed)} kernels do not compile for {target}:\n" + "\n".join(failed[:5])
    spilled = [f"{launch.label()}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded"
               for launch, r in results.items() if launch.kernel in LIF_KERNELS and r["spill_stores"] + r["spill_loads"]]
    assert not spilled, f"LIF kernels spill registers on {target}:\n" + "\n".join(spilled[:5])


def test_launches_cover_every_option(launches):
    """The recording sees every switch value the launchers can produce, and folds options that are run-time values."""
    by_kernel = {k: [launch for launch in launches if launch.kernel == k] for k in {launch.kernel for launch in launches}}
    assert set(by_kernel) == {"_lif_forward_kernel", "_lif_backward_kernel", "_bn_sums_kernel", "_bn_map_kernel",
                              "_bn_lif_forward_kernel", "_bn_lif_backward_kernel", "_pack_kernel", "_unpack_kernel"}
    values = lambda kernel, name: {dict(launch.switches)[name] for launch in by_kernel[kernel]}  # noqa: E731
    assert values("_lif_backward_kernel", "SURR") == {s.kernel_id for s in BUILTIN}
    assert values("_lif_backward_kernel", "MASK") == {options.NO_MASK, *range(len(MASK_MODES))}
    assert values("_lif_forward_kernel", "SAVE_H") == {False, True}
    assert values("_bn_map_kernel", "BC") == {1, 2, 4, 8, 16, 32, 64}
    assert {launch.dtype for launch in launches} == {"fp32", "fp16", "bf16"}
    # per dtype: 2 resets x 2 detach x 4 surrogates x (no mask, element, timestep, channel x 2 layouts)
    assert len(by_kernel["_lif_backward_kernel"]) == 3 * 2 * 2 * 4 * 5
    assert len(by_kernel["_lif_forward_kernel"]) == 3 * 2 * 2
    assert len(by_kernel["_bn_lif_backward_kernel"]) == len(by_kernel["_lif_backward_kernel"])
    assert len(by_kernel["_bn_lif_forward_kernel"]) == 3 * 2  # no membrane to keep
    assert len(by_kernel["_pack_kernel"]) == 3 * 8 and len(by_kernel["_unpack_kernel"]) == 3 * 8  # dtype x bits
    assert len(by_kernel["_bn_sums_kernel"]) == len(by_kernel["_bn_map_kernel"]) == 3 * 7 * 2


@pytest.mark.parametrize("target", TARGETS)
def test_every_switch_compiles(launches, compiler, target):
    subset = covering_subset(launches)
    for kernel in {launch.kernel for launch in launches}:
        for dtype in ("fp32", "fp16", "bf16"):
            pairs = {p for launch in launches if (launch.kernel, launch.dtype) == (kernel, dtype) for p in launch.switches}
            covered = {p for launch in subset if (launch.kernel, launch.dtype) == (kernel, dtype) for p in launch.switches}
            assert covered == pairs
    _check(compiler(subset, target), target)


@pytest.mark.exhaustive
def test_every_launch_compiles_for_sm90(launches, compiler):
    _check(compiler(launches, "sm_90"), "sm_90")
