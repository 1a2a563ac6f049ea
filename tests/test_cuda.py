"""The Triton LIF kernel (CUDA) against the CPU reference; skipped without CUDA.

p = 0 must match the reference (float32, atol 1e-5). For p > 0 the kernel draws its mask with
Philox from a seed instead of torch's generator, so the comparison is statistical: the kept
fraction is 1 - p within a 4-sigma binomial bound, structured masks have their structure, and
the same seed gives the same mask. ``test_kernels_in_triton_interpreter`` runs the same checks
on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``), so the kernel logic is
exercised even where no GPU is present.
"""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

from msgcli.snn import LIF, TemporalBatchNorm, build_model, kernels
from msgcli.snn.msg import SpikeSpec
from msgcli.snn.neuron import fused_lif, lif_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SURROGATES = ("piecewise_linear", "arctan", "sigmoid", "rectangular")


def _triton():
    from msgcli.snn.kernels import cuda

    return cuda


def triton_only():
    """The Triton kernels alone, no torch fallback; on CPU tensors too under the interpreter."""
    cuda = _triton()
    return kernels.Kernels("triton", kernels.Family("Triton kernels", lambda: cuda, ""), strict=True)


def _inputs(device, shape=(6, 3, 8, 5, 5), seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.8 + 0.4
    up = torch.randn(shape, generator=g)
    if channels_last:
        x, up = (t.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape) for t in (x, up))
    return x.to(device), up.to(device)


def _grad(fn, x, up):
    x = x.clone(memory_format=torch.preserve_format).requires_grad_()
    s = fn(x)
    s.backward(up)
    return s.detach(), x.grad


def _triton_lif(spec, reset="hard", detach=False, tau=2.0, vth=0.5):
    ops = triton_only()
    return lambda x: fused_lif(x, ops, tau, vth, spec, reset, detach)


# --- checks shared by the CUDA tests and the interpreter run -----------------------------------


def check_p0_matches_reference(device):
    for surrogate, reset, detach, cl in itertools.product(SURROGATES, ("hard", "soft"), (False, True), (False, True)):
        x, up = _inputs(device, channels_last=cl)
        spec = SpikeSpec(surrogate)
        s, g = _grad(_triton_lif(spec, reset, detach), x, up)
        s_ref, g_ref = _grad(lambda v: lif_reference(v, 2.0, 0.5, spec, reset, detach), x.cpu(), up.cpu())
        assert torch.equal(s.cpu(), s_ref), (surrogate, reset, detach, cl)
        torch.testing.assert_close(g.cpu(), g_ref, rtol=0, atol=1e-5)
        assert g.stride() == x.stride()


def _kept(device, spec, shape=(5, 4, 6, 7, 3), up=None):
    """Input far above threshold: every step spikes and, with detach_reset and a surrogate that is
    nonzero everywhere, grad[t] = up[t] * keep[t] * alpha / tau: the mask can be read off the gradient."""
    x = torch.full(shape, 10.0, device=device)
    up = torch.ones(shape, device=device) if up is None else up
    _, g = _grad(_triton_lif(spec, detach=True), x, up)
    return g != 0, g


def check_mask_statistics(device):
    n_draws = 5 * 4 * 6 * 7 * 3
    for p in (0.1, 0.5, 0.9):
        keep, _ = _kept(device, SpikeSpec("rectangular", alpha=0.01, mask_p=p))
        frac = keep.float().mean().item()
        assert abs(frac - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n_draws), (p, frac)
        assert not all(torch.equal(keep[0], keep[t]) for t in range(1, 5))  # fresh draws per timestep
    keep, _ = _kept(device, SpikeSpec("rectangular", alpha=0.01, mask_p=0.5, mask_mode="channel"))
    assert torch.equal(keep, keep[..., :1, :1].expand_as(keep))  # one draw per (t, sample, channel)
    assert 0 < keep.float().mean() < 1
    keep, _ = _kept(device, SpikeSpec("rectangular", alpha=0.01, mask_p=0.5, mask_mode="timestep"))
    assert torch.equal(keep, keep[:, :, :1, :1, :1].expand_as(keep))  # one draw per (t, sample)
    # channels-last: still one draw per channel
    shape = (5, 4, 6, 7, 3)
    x = torch.full(shape, 10.0).flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape).to(device)
    _, g = _grad(_triton_lif(SpikeSpec("rectangular", alpha=0.01, mask_p=0.5, mask_mode="channel"), detach=True),
                 x, torch.ones_like(x))
    keep = g != 0
    assert torch.equal(keep, keep[..., :1, :1].expand_as(keep))


def check_mask_is_fresh_and_seeded(device):
    spec = SpikeSpec("rectangular", alpha=0.01, mask_p=0.5)
    torch.manual_seed(1)
    a, _ = _kept(device, spec)
    b, _ = _kept(device, spec)
    torch.manual_seed(1)
    c, _ = _kept(device, spec)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def check_rescale_and_fill(device):
    _, g = _kept(device, SpikeSpec("rectangular", alpha=0.01, mask_p=0.25, rescale=True))
    kept = g[g != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 0.01 / 0.75 / 2.0))
    _, g = _kept(device, SpikeSpec("rectangular", alpha=0.01, mask_p=1.0))
    assert torch.count_nonzero(g) == 0
    _, g = _kept(device, SpikeSpec("rectangular", alpha=0.01, mask_p=1.0, mask_fill="arctan"))
    x = torch.tensor(5.0 - 0.5)  # H = 10 / tau, minus the threshold
    expected = 0.01 / (1 + (math.pi / 2 * 0.01 * x) ** 2) / 2.0
    torch.testing.assert_close(g.cpu(), torch.full(g.shape, expected.item()))


def check_half_precision(device):
    for dtype in (torch.bfloat16, torch.float16):
        x, up = _inputs(device, seed=3)
        x, up = x.to(dtype), up.to(dtype)
        s, g = _grad(_triton_lif(SpikeSpec()), x, up)
        s_ref, g_ref = _grad(lambda v: lif_reference(v, 2.0, 0.5, SpikeSpec(), "hard", False), x.float().cpu(), up.float().cpu())
        assert s.dtype == g.dtype == dtype
        assert (s.float().cpu() != s_ref).float().mean() < 0.01
        agree = (s.float().cpu() == s_ref).all(0)
        torch.testing.assert_close(g.float().cpu()[:, agree], g_ref[:, agree], rtol=0.05, atol=0.05)


def check_no_grad(device):
    x, _ = _inputs(device)
    out = _triton_lif(SpikeSpec(), reset="soft")(x)  # x does not require grad: the forward loop alone
    ref = lif_reference(x.cpu(), 2.0, 0.5, SpikeSpec(), "soft", False)
    assert out.grad_fn is None and torch.equal(out.cpu(), ref)


def check_batchnorm_kernels(device):
    """The Triton per-step BatchNorm pieces against torch on a channels-last [T, B, C, H, W] tensor."""
    tl_mod = _triton()
    T, B, C, H, W = 3, 4, 80, 5, 3  # C above one channel block, rows not a multiple of the tile
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, C, H, W, generator=g) * 2 + 3
    dy = torch.randn(T, B, C, H, W, generator=g)
    x, dy = (v.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(T, B, C, H, W).to(device) for v in (x, dy))
    assert tl_mod._rows_layout(x)
    mean, var = tl_mod.bn_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double().cpu(), dim=(1, 3, 4), correction=0)
    torch.testing.assert_close(mean.double().cpu(), ref_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(var.double().cpu(), ref_var, rtol=1e-5, atol=1e-5)
    scale = torch.rand(T, C, generator=g).to(device)
    shift = torch.rand(T, C, generator=g).to(device)
    y = tl_mod.bn_apply(x, scale, shift)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, x * scale[:, None, :, None, None] + shift[:, None, :, None, None], rtol=1e-6, atol=1e-5)
    sdy, sdyx = tl_mod.bn_backward_sums(dy, x, mean)
    centred = x.double().cpu() - mean.double().cpu()[:, None, :, None, None]
    torch.testing.assert_close(sdy.double().cpu(), dy.double().cpu().sum((1, 3, 4)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sdyx.double().cpu(), (dy.double().cpu() * centred).sum((1, 3, 4)), rtol=1e-5, atol=1e-4)
    q, a, r = (torch.rand(T, C, generator=g).to(device) for _ in range(3))
    dx = tl_mod.bn_backward_input(dy, x, mean, q, a, r)
    e = lambda v: v[:, None, :, None, None]  # noqa: E731
    torch.testing.assert_close(dx, (dy - (x - e(mean)) * e(q)) * e(a) - e(r), rtol=1e-5, atol=1e-5)
    # [T, B, C] after a linear layer: rows are samples
    v = torch.randn(T, 6, C, generator=g).to(device)
    m, s2 = tl_mod.bn_stats(v)
    torch.testing.assert_close(m.cpu(), v.cpu().mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(s2.cpu(), v.cpu().var(1, correction=0), rtol=1e-5, atol=1e-5)


def _pair_inputs(device, dtype, layout, seed=0):
    """A BatchNorm input, upstream gradient and [T, C] coefficients whose currents ``x * scale + shift`` are exact
    even in bfloat16 (7 significant bits), so any rounding (an FMA or not, the interpreter's) gives the same."""
    g = torch.Generator().manual_seed(seed)
    shape = (7, 3, 6) if layout == "rows" else (7, 3, 6, 4, 5)
    x = torch.randint(-8, 13, shape, generator=g) / 4
    up = torch.randn(shape, generator=g)
    if layout == "channels_last":
        x, up = (t.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape) for t in (x, up))
    scale = torch.randint(1, 9, (7, 6), generator=g) / 8
    shift = torch.randint(-4, 5, (7, 6), generator=g) / 8
    return x.to(device, dtype), up.to(device, dtype), scale.to(device), shift.to(device)


def check_bn_lif_pair(device):
    """The BatchNorm-LIF pair kernels equal the LIF kernels fed ``x * scale + shift``: the same spikes, the same
    gradient bit for bit and, under one seed, the same MSG mask; over chunks of timesteps (the membrane and its
    gradient carried, one mask key) the same as over the whole sequence, masks included."""
    tl_mod = _triton()
    specs = [SpikeSpec(), SpikeSpec("arctan", mask_p=0.5), SpikeSpec("sigmoid", mask_p=0.5, mask_mode="channel")]
    # every dtype, layout and reset; the MSG options and detach_reset in turn (the LIF kernels' own checks cover
    # their every combination, and the pair runs the same code)
    cases = itertools.product(enumerate((torch.float32, torch.bfloat16)),
                              enumerate(("contiguous", "channels_last", "rows")), enumerate(("hard", "soft")))
    for (d, dtype), (lay, layout), (r, reset) in cases:
        spec, detach = specs[(d + lay + r) % 3], d != r  # each layout meets every spec and both detach values
        case = (dtype, layout, reset, detach, spec)
        x, up, scale, shift = _pair_inputs(device, dtype, layout)
        expand = (slice(None), None, slice(None)) + (None,) * (x.dim() - 3)
        current = (x.float() * scale[expand] + shift[expand]).to(dtype)
        spikes_ref, membrane = tl_mod.lif_forward(current, 2.0, 0.5, reset, True)
        state = torch.zeros_like(x[0], dtype=torch.float32)
        assert tl_mod.takes("bn_lif_chunk_forward", x, scale, shift, state, 2.0, 0.5, reset, None), case
        spikes = tl_mod.bn_lif_chunk_forward(x, scale, shift, state, 2.0, 0.5, reset)
        assert torch.equal(spikes, spikes_ref) and spikes.stride() == x.stride(), case
        torch.manual_seed(7)
        grad_ref = tl_mod.lif_backward(up, membrane, 2.0, 0.5, spec, reset, detach)
        torch.manual_seed(7)
        zero = torch.zeros_like(state)
        grad = tl_mod.bn_lif_chunk_backward(up, x, scale, shift, zero, zero.clone(), 2.0, 0.5, spec, reset, detach)
        assert torch.equal(grad, grad_ref) and grad.stride() == x.stride(), case
        # chunks [0, 3) and [3, 7): forward carries the membrane, backward (latest first) its gradient, and
        # under one mask key each chunk draws the masks of its timesteps in the whole sequence
        key = tl_mod.mask_key(x, spec)
        if key is not None:
            grad_ref = tl_mod.bn_lif_chunk_backward(up, x, scale, shift, zero, zero.clone(), 2.0, 0.5, spec, reset,
                                                    detach, key=key)
        state, starts, out = torch.zeros_like(state), [], torch.empty_like(x)
        for t0, t1 in ((0, 3), (3, 7)):
            starts.append(state.clone())
            tl_mod.bn_lif_chunk_forward(x[t0:t1], scale[t0:t1], shift[t0:t1], state, 2.0, 0.5, reset, out[t0:t1])
        assert torch.equal(out, spikes_ref), case
        grad_state, into = torch.zeros_like(state), torch.empty_like(x)
        for (t0, t1), start in zip(((3, 7), (0, 3)), starts[::-1]):
            tl_mod.bn_lif_chunk_backward(up[t0:t1], x[t0:t1], scale[t0:t1], shift[t0:t1], start, grad_state, 2.0, 0.5,
                                         spec, reset, detach, into[t0:t1], key, 7 - t1)
        assert torch.equal(into, grad_ref), case
    assert not tl_mod.takes("bn_lif_chunk_forward", x, scale, shift, state.double())  # the carried state is float32


def check_packing(device):
    """The Triton packing kernels give numpy's planes (one code bit per plane, 8 entries a byte, memory order) and
    unpack them into the values and strides packed, for any level count up to a byte and sizes off the blocks."""
    from msgcli.snn.kernels import torch_ops

    tl_mod = _triton()
    g = torch.Generator().manual_seed(0)
    for levels, shape, channels_last in itertools.product((1, 2, 4, 9, 255), ((5, 3, 7, 9), (2, 2049)), (False, True)):
        x = torch.randint(0, levels + 1, shape, generator=g).float() / levels
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        flat = x.as_strided((x.numel(),), (1,))
        planes = tl_mod.pack_bits(x.to(device), levels)
        assert torch.equal(planes.cpu(), torch_ops.planes_numpy(torch_ops.encode(flat, levels), levels.bit_length()))
        # bfloat16 where the values are exact in it (Triton's interpreter truncates where a GPU rounds to nearest)
        for dtype in (torch.float32, torch.bfloat16) if levels & (levels - 1) == 0 else (torch.float32,):
            y = tl_mod.unpack_bits(planes, tuple(x.shape), x.stride(), levels, dtype)
            assert torch.equal(y.cpu(), torch_ops.decode(torch_ops.encode(x, levels), levels, dtype)), (levels, dtype)
            assert y.stride() == x.stride()


def run_checks(device):
    for check in (check_p0_matches_reference, check_mask_statistics, check_mask_is_fresh_and_seeded,
                  check_rescale_and_fill, check_half_precision, check_no_grad, check_batchnorm_kernels,
                  check_bn_lif_pair, check_packing):
        check(device)


# --- CUDA -------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("check", [check_p0_matches_reference, check_mask_statistics, check_mask_is_fresh_and_seeded,
                                   check_rescale_and_fill, check_half_precision, check_no_grad, check_batchnorm_kernels,
                                   check_bn_lif_pair, check_packing])
def test_triton_kernel(check):
    check("cuda")


@cuda
def test_auto_backend_uses_triton_on_cuda(monkeypatch):
    tl_mod = _triton()
    calls = []
    for name in ("lif_forward", "lif_backward"):
        real = getattr(tl_mod, name)
        monkeypatch.setattr(tl_mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    x, up = _inputs("cuda")
    s, g = _grad(LIF(), x, up)
    assert calls == ["lif_forward", "lif_backward"]
    s_ref, g_ref = _grad(LIF(backend="reference"), x.cpu(), up.cpu())
    assert torch.equal(s.cpu(), s_ref)
    torch.testing.assert_close(g.cpu(), g_ref, rtol=0, atol=1e-5)


@cuda
def test_fused_backend_on_cuda_equals_reference_with_the_same_seed():
    """backend='fused' on CUDA (torch operators) draws the reference's mask from torch's CUDA generator."""
    x, up = _inputs("cuda", seed=4)
    torch.manual_seed(5)
    s, g = _grad(LIF(backend="fused", mask_p=0.5), x, up)
    torch.manual_seed(5)
    s_ref, g_ref = _grad(LIF(backend="reference", mask_p=0.5), x, up)
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-5)


@cuda
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_saved_memory_on_cuda(p):
    x = torch.randn(10, 4, 16, 12, 12, device="cuda").requires_grad_()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LIF(mask_p=p)(x)
    assert 0 < sum(saved.values()) <= x.numel() * 4 + x.numel()


@cuda
@pytest.mark.parametrize("triton_bn", ["0", "1"], ids=["torch batch_norm", "Triton kernels"])
def test_per_step_batchnorm_on_cuda_equals_a_loop(monkeypatch, triton_bn):
    monkeypatch.setenv("MSGSNN_TRITON_BN", triton_bn)
    x = (torch.randn(4, 3, 8, 5, 5) * 2 + 1).cuda()
    x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(4, 3, 8, 5, 5)
    up = torch.randn_like(x)
    tbn, bn = TemporalBatchNorm(8).cuda(), torch.nn.BatchNorm2d(8).cuda()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = tbn(a)
    y_ref = torch.stack([bn(b[t]) for t in range(4)])
    y.backward(up)
    y_ref.backward(up)
    assert y.stride() == x.stride()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tbn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tbn.running_var, bn.running_var, rtol=1e-5, atol=1e-5)


def _assert_same_step(model, other, x):
    """One seeded step of each gives the same logits and gradients, to float rounding (cuDNN may pick another
    algorithm for another batch shape); different MSG masks would move the gradients far beyond it."""
    results = []
    for net in (model, other):
        net.zero_grad()
        torch.manual_seed(5)
        logits = net(x)
        logits.square().sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=n)


@cuda
def test_lean_pairs_on_cuda_run_the_triton_pair_kernels_and_equal_the_layers_one_by_one(monkeypatch):
    """With the Triton BatchNorm (``MSGSNN_TRITON_BN=1``) the default path runs each BatchNorm-LIF pair in the pair
    kernels, saving the BatchNorm's input alone: the logits and gradients of the layers run one by one, the same
    MSG masks (one seed per LIF backward, drawn in the same order), less saved memory."""
    import copy

    from msgcli.snn.layers import SpikingSequential
    from tests.test_perf_memory import saved_bytes

    monkeypatch.setenv("MSGSNN_TRITON_BN", "1")
    tl_mod = _triton()
    calls = []
    real = tl_mod.bn_lif_chunk_forward
    monkeypatch.setattr(tl_mod, "bn_lif_chunk_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    lean = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, mask_p=0.5, input_size=32).cuda()
    plain = copy.deepcopy(lean)
    for module in plain.modules():
        if isinstance(module, SpikingSequential):
            module.lean = False
    x = torch.rand(3, 4, 2, 32, 32, device="cuda").round()
    lean_bytes, _ = saved_bytes(lean, x)
    assert calls
    plain_bytes, _ = saved_bytes(plain, x)
    assert lean_bytes < 0.8 * plain_bytes
    _assert_same_step(plain, lean, x)


@cuda
def test_recompute_on_cuda_gives_the_default_paths_logits_and_gradients_masks_included(monkeypatch):
    """Recomputed blocks in chunks of 2 of T = 6 on the Triton pair kernels: each LIF draws one mask key, as the
    default path's lean pairs draw one seed each, so the masks are the same and the gradients equal to rounding."""
    import copy

    from msgcli.snn.layers import set_recompute

    monkeypatch.setenv("MSGSNN_TRITON_BN", "1")
    torch.manual_seed(0)
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=6, mask_p=0.5, input_size=32).cuda()
    recomputed = copy.deepcopy(model)
    assert set_recompute(recomputed, True, 2) > 0
    x = torch.rand(3, 6, 2, 32, 32, device="cuda").round()
    _assert_same_step(model, recomputed, x)


@cuda
@pytest.mark.parametrize("amp", [False, True])
def test_training_step_on_cuda(amp):
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, mask_p=0.5).cuda()
    x = torch.rand(4, 4, 2, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float().mean(0), torch.arange(4, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@cuda
def test_a_training_step_on_cuda_synchronises_the_host_at_most_once(tmp_path):
    """torch's sync debug mode warns at each host synchronisation: 4 more steps an epoch over 2 epochs may
    cost at most 8 more (agree()'s one a step; data read by a worker process, pinned, copied asynchronously)."""
    import warnings

    from msgcli.engine.train import train
    from tests.conftest import tiny_config

    def syncs(batches: int) -> int:
        cfg = tiny_config(tmp_path / str(batches), train__device="cuda", train__epochs=2, train__limit_batches=batches,
                          data__num_workers=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train(cfg, tmp_path / str(batches), progress=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(6) - syncs(2) <= 2 * 4


# --- no GPU needed ----------------------------------------------------------------------------


def run_in_interpreter(statement: str) -> None:
    """Run ``statement`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton kernels on CPU tensors); fail on an error."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", statement], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_kernels_in_triton_interpreter():
    """The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 and pass the checks above."""
    run_in_interpreter("from tests.test_cuda import run_checks; run_checks('cpu')")
