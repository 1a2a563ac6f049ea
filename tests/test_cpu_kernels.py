"""The fused CPU kernels (C, built at first use) against the reference, on the layouts and options the
core tests do not reach: channels-last activations, structured MSG masks, bf16, the torch-operator
fallback, the random stream they share with torch, and the buffer pool."""

import itertools
import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest
import torch

from msgcli.snn import LIF, TemporalBatchNorm, kernels, memory
from msgcli.snn import layers as layers_module
from msgcli.snn import neuron as neuron_module
from msgcli.snn.kernels import cpu as cpu_kernels

has_compiler = pytest.mark.skipif(cpu_kernels.compiler() is None, reason="no C compiler: the torch fallback is tested below")


@pytest.fixture
def built_kernels():
    """The kernels, which must build wherever a C compiler exists (a broken source fails, never skips)."""
    built = kernels.C_KERNELS.get()
    assert built is not None, "a C compiler is there but the kernels are unavailable: see the warning"
    return built


needs_kernels = pytest.mark.usefixtures("built_kernels")


def _channels_last(x):
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)


def _inputs(seed=0, shape=(5, 3, 8, 4, 6), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 0.8 + 0.4
    return x, torch.randn(shape, generator=g, dtype=dtype)


def _run(lif, x, upstream, seed=None):
    current = x.clone(memory_format=torch.preserve_format).requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    spikes = lif(current)
    spikes.backward(upstream)
    return spikes.detach(), current.grad


@pytest.fixture
def torch_fallback(monkeypatch):
    """Run the fused path without the C kernels (what a machine without a compiler gets)."""
    monkeypatch.setattr(kernels.CPU, "fused", None)


OPTIONS = [
    dict(mask_p=0.5),
    dict(mask_p=0.5, mask_mode="channel"),
    dict(mask_p=0.4, mask_mode="timestep", reset="soft"),
    dict(mask_p=0.3, mask_fill="arctan", rescale=True, surrogate="sigmoid"),
    dict(mask_p=0.5, detach_reset=True, surrogate="rectangular"),
    dict(mask_p=0.0, tau=3.0, v_threshold=0.3, alpha=4.0),
]


@has_compiler
@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_kernel_equals_reference_float64(layout, opts):
    x, upstream = _inputs(1)
    if layout == "channels_last":
        x, upstream = _channels_last(x), _channels_last(upstream)
    s_ref, g_ref = _run(LIF(backend="reference", **opts), x, upstream, seed=3)
    after_ref = torch.rand(4)
    s_fus, g_fus = _run(LIF(backend="fused", **opts), x, upstream, seed=3)
    after_fus = torch.rand(4)
    assert torch.equal(s_ref, s_fus)
    torch.testing.assert_close(g_fus, g_ref, rtol=0, atol=1e-10)
    assert torch.equal(after_ref, after_fus)  # the kernel left torch's generator where the reference did
    assert g_fus.stride() == x.stride()


@pytest.mark.parametrize("opts", OPTIONS)
def test_torch_fallback_equals_reference(torch_fallback, opts):
    x, upstream = _inputs(2)
    s_ref, g_ref = _run(LIF(backend="reference", **opts), x, upstream, seed=5)
    s_fus, g_fus = _run(LIF(backend="fused", **opts), x, upstream, seed=5)
    assert torch.equal(s_ref, s_fus)
    torch.testing.assert_close(g_fus, g_ref, rtol=0, atol=1e-10)


@has_compiler
@needs_kernels
def test_float32_and_vectors():
    for shape in [(7, 5, 33), (4, 2, 3, 5, 5), (3, 1000)]:
        x, upstream = _inputs(4, shape, torch.float32)
        s_ref, g_ref = _run(LIF(backend="reference", mask_p=0.5), x, upstream, seed=1)
        s_fus, g_fus = _run(LIF(backend="fused", mask_p=0.5), x, upstream, seed=1)
        assert torch.equal(s_ref, s_fus)
        torch.testing.assert_close(g_fus, g_ref, rtol=1e-5, atol=1e-5)


@has_compiler
@needs_kernels
def test_bfloat16_close_to_float32_on_the_same_input():
    """bf16 in, bf16 out (autocast on CPU): arithmetic in float32, membrane rounded to bf16 before the test."""
    x, upstream = _inputs(6, dtype=torch.float32)
    x, upstream = _channels_last(x).bfloat16(), _channels_last(upstream).bfloat16()
    s16, g16 = _run(LIF(backend="fused"), x, upstream)
    s32, g32 = _run(LIF(backend="reference"), x.float(), upstream.float())
    assert s16.dtype == g16.dtype == torch.bfloat16
    assert (s16.float() != s32).float().mean() < 0.01
    agree = (s16.float() == s32).all(0)  # neurons whose spike trains agree have close gradients
    torch.testing.assert_close(g16.float()[:, agree], g32[:, agree], rtol=0.05, atol=0.05)


@has_compiler
@needs_kernels
def test_mask_stream_is_torch_rand_in_logical_order():
    """The element mask of a channels-last tensor is the reference's torch.rand(shape) >= p, timestep T-1 first."""
    kern = kernels.C_KERNELS.get()
    shape = (3, 2, 16, 3, 5)
    x = _channels_last(torch.zeros(shape))
    torch.manual_seed(9)
    bits, rowbytes = kern.draw_mask(x, "element", 0.37)
    torch.manual_seed(9)
    ref = torch.stack([torch.rand(shape[1:]) >= 0.37 for _ in range(shape[0])][::-1])
    unpacked = torch.tensor([[(bits[t * rowbytes + i // 8].item() >> (i % 8)) & 1 for i in range(x[0].numel())]
                             for t in range(shape[0])], dtype=torch.bool)
    assert torch.equal(unpacked, ref.permute(0, 1, 3, 4, 2).reshape(shape[0], -1))


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_step_batchnorm_equals_a_loop_over_timesteps(monkeypatch, request, fallback, layout):
    if fallback:
        monkeypatch.setattr(kernels.CPU, "fused", None)
    elif cpu_kernels.compiler() is None:
        pytest.skip("no C compiler")
    else:
        request.getfixturevalue("built_kernels")
    g = torch.Generator().manual_seed(0)
    T, B, C, H, W = 4, 3, 16, 5, 3
    x = torch.randn(T, B, C, H, W, generator=g, dtype=torch.float64) * 3 + torch.arange(T).double().view(T, 1, 1, 1, 1)
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x, up = _channels_last(x), _channels_last(up)
    tbn = TemporalBatchNorm(C).double()
    bn = torch.nn.BatchNorm2d(C).double()
    with torch.no_grad():
        for m in (tbn, bn):
            m.weight.copy_(torch.linspace(-1, 2, C))
            m.bias.copy_(torch.linspace(0.5, -0.5, C))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = tbn(a)
    y_ref = torch.stack([bn(b[t]) for t in range(T)])
    y.backward(up)
    y_ref.backward(up)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(tbn.weight.grad, bn.weight.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(tbn.bias.grad, bn.bias.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(tbn.running_var, bn.running_var, rtol=0, atol=1e-10)
    assert y.stride() == x.stride()


@has_compiler
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("C", [5, 16])
def test_fused_batchnorm_lif_equals_the_two_kernels_bit_for_bit(dtype, layout, opts, C):
    """One kernel for BatchNorm's affine map and the LIF (forward: only spikes written; backward: the membrane
    recomputed from the BatchNorm's input) gives the numbers and MSG masks of bn_apply + lif_forward +
    lif_backward, over two chunks of timesteps carrying the membrane and its gradient."""
    g = torch.Generator().manual_seed(1)
    T, B, H, W = 6, 3, 7, 3  # blocks of 512 neurons: channels gathered (C = 5), or whole rows of channels (16)
    x = (torch.randn(T, B, C, H, W, generator=g) * 2 + 0.3).to(dtype)
    up = torch.randn(x.shape, generator=g).to(dtype)
    if layout == "channels_last":
        x, up = _channels_last(x), _channels_last(up)
    scale = torch.rand(T, C, generator=g, dtype=torch.float64) + 0.2
    shift = torch.randn(T, C, generator=g, dtype=torch.float64) * 0.3
    lif = LIF(**opts)
    args = lif.tau, lif.v_threshold
    grad_args = (*args, lif.spec, lif.reset, lif.detach_reset)
    carry = kernels.carry_dtype(dtype)
    results = []
    for fused in (True, False):
        ops = kernels.CPU if fused else kernels.Kernels("separate-cpu-kernels", kernels.C_KERNELS)
        if not fused:  # the same C kernels, with the fused pair hidden
            ops._fuses = lambda *a: False
        state, starts, spikes = torch.zeros_like(x[0], dtype=carry), [], []
        for t0, t1 in ((0, 4), (4, T)):
            starts.append(state.clone())
            spikes.append(ops.bn_lif_chunk_forward(x[t0:t1], scale[t0:t1], shift[t0:t1], state, *args, lif.reset))
            assert spikes[-1].stride() == x[t0:t1].stride()
        torch.manual_seed(7)
        grad_state, grads = torch.zeros_like(x[0], dtype=carry), []
        for (t0, t1), start in reversed(list(zip(((0, 4), (4, T)), starts))):
            before = start.clone()
            grads.insert(0, ops.bn_lif_chunk_backward(up[t0:t1], x[t0:t1], scale[t0:t1], shift[t0:t1], start,
                                                      grad_state, *grad_args))
            assert torch.equal(start, before), "backward changed the saved membrane"
            assert grads[0].stride() == x[t0:t1].stride()
        results.append((torch.cat(spikes), torch.cat(grads), state, grad_state, torch.rand(3)))
    for fused, separate in zip(*results):
        assert fused.dtype == separate.dtype
        assert torch.equal(fused, separate)


@has_compiler
@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("samples", [(1, 3), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_pairs_backward_reads_a_part_of_a_larger_batchs_gradient_where_it_lies(layout, samples, dtype):
    """The gradient of the spikes of samples ``b0:b1`` read inside the whole batch's gradient (timesteps further
    apart than the part's) gives bit for bit the numbers of a dense copy of it, and copies nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith(("copy", "_to_copy", "clone", "expand")):
                self.made.append(func.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(2)
    T, B, C, H, W = 4, 5, 16, 3, 4
    b0, b1 = samples
    whole = torch.randn(T, B, C, H, W, generator=g).to(dtype)
    x = (torch.randn(T, b1 - b0, C, H, W, generator=g) + 0.3).to(dtype)
    if layout == "channels_last":
        whole, x = _channels_last(whole), _channels_last(x)
    part = whole[:, b0:b1]
    assert not part.is_contiguous() and part.stride(0) == whole[0].numel()
    dense = _channels_last(part.contiguous()) if layout == "channels_last" else part.contiguous()
    scale = torch.rand(T, C, generator=g, dtype=torch.float64) + 0.2
    shift = torch.randn(T, C, generator=g, dtype=torch.float64) * 0.3
    lif = LIF(mask_p=0.5)
    grad_args = (lif.tau, lif.v_threshold, lif.spec, lif.reset, lif.detach_reset)
    # the membrane and its gradient laid out as a timestep of x, as the fused kernel takes them
    carry = kernels.carry_dtype(dtype)
    state, carried = (torch.empty_like(x[0], dtype=carry).copy_(torch.randn(x[0].shape, generator=g)) for _ in range(2))
    results = []
    for grad in (part, dense):
        grad_state = carried.clone()
        out = torch.empty_like(x)
        torch.manual_seed(7)
        with Copies() as seen:
            kernels.CPU.fused_kernels().bn_lif_chunk_backward(grad, x, scale, shift, state, grad_state, *grad_args,
                                                              out=out)
        assert seen.made == []
        results.append((out, grad_state))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@has_compiler
@needs_kernels
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("levels", [1, 2, 4])
def test_bit_planes_in_one_kernel_equal_the_codes_and_numpys_planes(built_kernels, dtype, levels):
    """The kernel's planes of a dense tensor (contiguous, channels-last, a length that ends inside a byte) are
    those of the codes and numpy's packbits, and unpacking them, or a slice of their bytes read in place, gives the
    entries back as the codes' decode does."""
    from msgcli.snn.kernels import torch_ops

    g = torch.Generator().manual_seed(levels)
    codes = torch.randint(0, levels + 1, (5, 3, 7, 9), generator=g, dtype=torch.uint8)
    for x in ((codes.double() / levels).to(dtype),
              (codes.double() / levels).to(dtype).contiguous(memory_format=torch.channels_last)):
        in_memory = x.as_strided((x.numel(),), (1,))
        planes = built_kernels.pack_bits(x, levels)
        assert torch.equal(planes, torch_ops.planes_numpy(torch_ops.encode(in_memory, levels), levels.bit_length()))
        y = built_kernels.unpack_bits(planes, tuple(x.shape), x.stride(), levels, dtype)
        assert torch.equal(y, x) and y.stride() == x.stride()
    wide = torch.cat([torch.randint(0, 256, (planes.shape[0], 3), generator=g, dtype=torch.uint8), planes], dim=1)
    part = wide[:, 3:3 + 17]  # 17 bytes in place, rows a wider row apart: 131 entries
    expected = torch_ops.decode(torch_ops.codes_numpy(part.contiguous(), 131), levels, dtype)
    assert torch.equal(built_kernels.unpack_bits(part, (131,), (1,), levels, dtype), expected)


@has_compiler
def test_bit_planes_a_byte_at_a_time_equal_those_of_the_vector_path(built_kernels, fresh_build, monkeypatch):
    """The kernels built without AVX-512 (a byte of every plane at a time, as on machines without it) pack the
    planes and unpack the entries of the default build (16 entries at a time where the host has AVX-512)."""
    monkeypatch.setattr(cpu_kernels, "FLAGS", [*cpu_kernels.FLAGS, "-mno-avx512f"])
    plain = kernels.C_KERNELS.get()
    assert plain is not None and plain.lib._name != built_kernels.lib._name
    for dtype, levels in itertools.product((torch.float32, torch.bfloat16, torch.float64), (1, 2, 4)):
        codes = torch.randint(0, levels + 1, (7, 5, 11, 13), generator=torch.Generator().manual_seed(levels))
        x = (codes.double() / levels).to(dtype).contiguous(memory_format=torch.channels_last)
        planes = built_kernels.pack_bits(x, levels)
        assert torch.equal(plain.pack_bits(x, levels), planes)
        shape = tuple(x.shape), x.stride(), levels, dtype
        assert torch.equal(plain.unpack_bits(planes, *shape), built_kernels.unpack_bits(planes, *shape))


def test_per_step_batchnorm_bfloat16_and_float32():
    x = _channels_last(torch.randn(3, 4, 16, 6, 6) * 2 + 1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        tbn = TemporalBatchNorm(16)
        y = tbn(x.to(dtype))
        ref = torch.stack([torch.nn.functional.batch_norm(x[t], None, None, training=True) for t in range(3)])
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


def test_folded_convolutions_run_channels_last():
    conv = layers_module.Folded(torch.nn.Conv2d(3, 8, 3, padding=1))
    y = conv(torch.randn(2, 4, 3, 6, 6))
    assert memory.step_layout(y) == "nlc"


@has_compiler
@needs_kernels
def test_pool_reuses_freed_buffers_and_never_live_ones():
    pool = memory.BufferPool(limit=1 << 30)
    like = torch.empty(4, 2, 64, 32, 32)
    with torch.no_grad():  # buffers freed while a graph is being built go back to the system
        a = pool.empty_like(like)
        view = a[1]
        address = a.data_ptr()
        del a
        b = pool.empty_like(like)
        assert b.data_ptr() != address  # a view keeps the first buffer alive
        del view
        c = pool.empty_like(like)
        assert c.data_ptr() == address
        assert c.shape == like.shape and c.stride() == like.stride()
        del b, c
    assert pool.cached == 2 * like.numel() * 4
    d = pool.empty_like(like)
    del d  # grad mode on: not kept
    assert pool.cached == like.numel() * 4

    class FreesInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            taken = pool.empty_like(like)  # the cached block serves it
            assert not torch.is_grad_enabled() and pool.cached == 0
            del taken  # freed during autograd's backward: kept, it would stay resident through the next step
            return grad

    FreesInBackward.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert pool.cached == 0


def _not_loaded(monkeypatch):
    """The C kernels' family as before its first use: the next ``get()`` builds (or fails to) and may warn."""
    for name, value in (("_kernels", None), ("_loaded", False), ("_warned", False)):
        monkeypatch.setattr(kernels.C_KERNELS, name, value)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """The next ``get()`` builds (or fails to build) afresh in ``tmp_path/cache``."""
    _not_loaded(monkeypatch)
    monkeypatch.delenv("MSGSNN_CPU_KERNELS", raising=False)
    monkeypatch.setenv("MSGSNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cpu-kernels"


def test_no_compiler_falls_back_with_its_own_warning(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="no C compiler: .CC .*no-such-compiler. not found") as caught:
        assert kernels.C_KERNELS.get() is None
    assert len(caught) == 1 and "torch operators run instead" in str(caught[0].message)
    x, upstream = _inputs(3)
    s_ref, g_ref = _run(LIF(backend="reference", mask_p=0.5), x, upstream, seed=2)
    s_fus, g_fus = _run(LIF(mask_p=0.5), x, upstream, seed=2)
    assert torch.equal(s_ref, s_fus)
    torch.testing.assert_close(g_fus, g_ref, rtol=0, atol=1e-10)


@has_compiler
def test_a_broken_source_is_a_failed_build_not_a_missing_compiler(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "cpu.c"
    broken.write_text("#error injected by the test\n" + cpu_kernels.SOURCE.read_text())
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    with pytest.warns(RuntimeWarning, match="failed to build.*injected by the test") as caught:
        assert kernels.C_KERNELS.get() is None
    assert not any("no C compiler" in str(w.message) for w in caught)


@has_compiler
def test_cc_is_split_like_a_shell_and_its_version_is_in_the_key(fresh_build, monkeypatch, tmp_path):
    """``CC="wrapper gcc"`` (as ``ccache gcc``) works; another compiler version builds another library."""
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", f"{wrapper} {cpu_kernels.compiler()[0]}")
    assert cpu_kernels.compiler() == [str(wrapper), cpu_kernels.compiler()[1]]
    assert kernels.C_KERNELS.get() is not None
    assert sum("-shared" in line for line in log.read_text().splitlines()) == 1
    first = {p.name for p in fresh_build.glob("*.so")}
    monkeypatch.setattr(cpu_kernels, "_compiler_version", lambda cc: "gcc 99.0 (a future release)")
    _not_loaded(monkeypatch)
    assert kernels.C_KERNELS.get() is not None
    assert len(first) == 1 and len(set(p.name for p in fresh_build.glob("*.so")) - first) == 1


@has_compiler
@pytest.mark.slow
def test_processes_starting_together_compile_once(tmp_path):
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "MSGSNN_CACHE": str(tmp_path / "cache"), "CC": f"{wrapper} {cpu_kernels.compiler()[0]}"}
    env.pop("MSGSNN_CPU_KERNELS", None)
    code = "from msgcli.snn import kernels; assert kernels.C_KERNELS.get() is not None"
    ranks = [subprocess.Popen([sys.executable, "-W", "error", "-c", code], env=env) for _ in range(3)]
    assert [rank.wait(timeout=600) for rank in ranks] == [0, 0, 0]
    assert sum("-shared" in line for line in log.read_text().splitlines()) == 1


def test_the_build_folder_is_private_and_another_users_is_refused(monkeypatch, tmp_path):
    folder = cpu_kernels._private_dir(tmp_path / "made")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    assert stat.S_IMODE(os.stat(cpu_kernels._private_dir(loose)).st_mode) == 0o700  # ours: closed
    monkeypatch.setattr(cpu_kernels.os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(cpu_kernels.BuildFailed, match="belongs to another user"):
        cpu_kernels._private_dir(tmp_path / "made")
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(cpu_kernels.BuildFailed, match="not a folder"):
        cpu_kernels._private_dir(tmp_path / "link")


def test_an_unwritable_cache_builds_in_a_private_temporary_folder(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv("MSGSNN_CACHE", "/proc/msgsnn-cannot-be-made-here")
    monkeypatch.setattr(cpu_kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = cpu_kernels._kernel_dir()
    assert folder == tmp_path / f"msgsnn-{os.getuid()}" and stat.S_IMODE(os.stat(folder).st_mode) == 0o700


@has_compiler
@needs_kernels
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batchnorm_sums_do_not_depend_on_the_thread_count(layout):
    kern = kernels.C_KERNELS.get()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 16, 12, 12, generator=g) * 2 + 1  # 8 * 144 rows a timestep: several chunks
    dy = torch.randn(x.shape, generator=g)
    if layout == "channels_last":
        x, dy = _channels_last(x), _channels_last(dy)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            mean, var = kern.bn_stats(x)
            results.append((mean, var, *kern.bn_backward_sums(dy, x, mean)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    torch.testing.assert_close(results[0][0], x.double().mean((1, 3, 4)), rtol=0, atol=1e-12)


@has_compiler
@needs_kernels
def test_a_failed_allocation_in_a_batchnorm_kernel_raises_a_clear_error(monkeypatch):
    """The C BatchNorm and BatchNorm-LIF functions return 1 when their work space cannot be allocated: a
    MemoryError naming the kernel, never results computed from an unwritten buffer."""
    kern = kernels.C_KERNELS.get()
    real = kern.lib

    class OutOfMemory:  # the library, with every BatchNorm kernel reporting a failed allocation
        def __getattr__(self, name):
            return (lambda *args: 1) if name.startswith(("bn_", "bnlif_")) else getattr(real, name)

    monkeypatch.setattr(kern, "lib", OutOfMemory())
    x = _channels_last(torch.randn(3, 4, 16, 5, 5))
    stat = torch.rand(3, 16, dtype=torch.float64)
    calls = {"bn_stats": lambda: kern.bn_stats(x), "bn_apply": lambda: kern.bn_apply(x, stat, stat),
             "bn_bsums": lambda: kern.bn_backward_sums(x, x, stat),
             "bn_bdx": lambda: kern.bn_backward_input(x, x, stat, stat, stat, stat),
             "bnlif_fwd": lambda: kern.bn_lif_chunk_forward(x, stat, stat, torch.zeros_like(x[0]), 2.0, 0.5, "hard"),
             "bnlif_bwd": lambda: kern.bn_lif_chunk_backward(x, x, stat, stat, torch.zeros_like(x[0]),
                                                             torch.zeros_like(x[0]), 2.0, 0.5, LIF().spec, "hard",
                                                             False)}
    for name, call in calls.items():
        with pytest.raises(MemoryError, match=f"C kernel {name} could not allocate.*T=3, C=16"):
            call()
    with pytest.raises(MemoryError, match="bn_stats"):
        TemporalBatchNorm(16)(x)


def test_switched_off_by_environment(monkeypatch):
    _not_loaded(monkeypatch)
    monkeypatch.setenv("MSGSNN_CPU_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # switched off on purpose: nothing to warn about
        assert kernels.C_KERNELS.get() is None


@has_compiler
@needs_kernels
@pytest.mark.parametrize("surrogate, reset", list(itertools.product(("piecewise_linear", "sigmoid"), ("hard", "soft"))))
def test_eval_forward_matches_training_forward(surrogate, reset):
    x, _ = _inputs(7, dtype=torch.float32)
    lif = LIF(surrogate=surrogate, reset=reset)
    with torch.no_grad():
        s_eval = lif(_channels_last(x))
    assert torch.equal(s_eval, lif(x.requires_grad_()).detach())
    assert kernels.CPU.lif_forward(x.detach(), 2.0, 0.5, reset, False)[1] is None


# --- convolutions on spikes save uint8 codes ----------------------------------------------------


def _conv_node(y):
    return type(y.grad_fn.next_functions[0][0]).__name__  # under the view back to [T, B, ...]


def _conv_pair(seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=True).double()
    plain = torch.nn.Conv2d(6, 5, 3, padding=1, bias=True).double()
    plain.load_state_dict(conv.state_dict())
    return layers_module.Folded(conv), plain


@pytest.mark.parametrize("pooled", [False, True])
def test_conv_on_spikes_equals_the_plain_convolution(pooled):
    folded, plain = _conv_pair()
    x = (torch.rand(3, 2, 6, 8, 8, dtype=torch.float64) > 0.6).double()
    up = torch.randn(3, 2, 5, 4 if pooled else 8, 4 if pooled else 8, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    spikes = neuron_module.mark_levels(a * 1.0, 1)
    if pooled:
        spikes = layers_module.Folded(torch.nn.AvgPool2d(2))(spikes)
        assert neuron_module.levels_of(spikes) == 4
    y = folded(spikes)
    assert "SpikeInputConv" in _conv_node(y)
    ref_in = torch.nn.functional.avg_pool2d(b.flatten(0, 1), 2) if pooled else b.flatten(0, 1)
    y_ref = plain(ref_in).view(y.shape)
    y.backward(up)
    y_ref.backward(up)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(folded.module.weight.grad, plain.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(folded.module.bias.grad, plain.bias.grad, rtol=0, atol=1e-12)


def test_conv_on_spikes_saves_one_bit_per_input_entry():
    folded, _ = _conv_pair()
    x = (torch.rand(3, 2, 6, 8, 8, dtype=torch.float64) > 0.6).double().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        folded(neuron_module.mark_levels(x * 1.0, 1))
    assert [t.shape for t in saved if t.dtype == torch.uint8] == [(1, 6 * 6 * 8 * 8 // 8)]
    assert all(t.dtype == torch.uint8 or t is folded.module.weight for t in saved)


def test_modified_spikes_and_hooked_convolutions_take_the_plain_path():
    folded, _ = _conv_pair()
    x = neuron_module.mark_levels((torch.rand(3, 2, 6, 8, 8, dtype=torch.float64) > 0.6).double(), 1)
    x.mul_(0.3)  # no longer spikes: the note is void
    assert neuron_module.levels_of(x) is None
    y = folded(x.requires_grad_())
    assert "SpikeInputConv" not in _conv_node(y)
    calls = []
    folded.module.register_forward_hook(lambda m, i, o: calls.append(1))
    folded(LIF()(torch.randn(3, 2, 6, 8, 8, dtype=torch.float64, requires_grad=True)))
    assert calls == [1]


@has_compiler
@needs_kernels
def test_spiking_network_under_bf16_autocast_matches_float32_closely():
    from msgcli.snn import build_model

    torch.manual_seed(0)
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4)
    x = torch.rand(2, 4, 2, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad.dtype == p.dtype for p in model.parameters())
