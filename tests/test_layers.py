"""Layers over time: Folded runs a module once on [T*B, ...]; TemporalBatchNorm per_step == the
release's one shared BatchNorm2d called T times, joint == BatchNorm2d on the folded batch."""

import pytest
import torch
from torch import nn

from msgcli.snn import Folded, TemporalBatchNorm

T, B, C, H, W = 4, 5, 3, 4, 4


def _pair(mode, seed=0):
    """A TemporalBatchNorm and a plain BatchNorm2d with the same (non-trivial) parameters and stats."""
    g = torch.Generator().manual_seed(seed)
    tbn = TemporalBatchNorm(C, mode=mode).double()
    bn = nn.BatchNorm2d(C).double()
    with torch.no_grad():
        for m in (tbn, bn):
            m.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
            m.running_mean.copy_(torch.tensor([0.2, -0.1, 0.4]))
            m.running_var.copy_(torch.tensor([1.3, 0.8, 2.0]))
    # A different mean and scale per timestep, so per-step and joint statistics differ.
    x = torch.randn(T, B, C, H, W, generator=g, dtype=torch.float64) * torch.arange(1.0, T + 1).double().view(T, 1, 1, 1, 1)
    x = x + torch.arange(T).double().view(T, 1, 1, 1, 1)
    return tbn, bn, x


def _grads(module, x, fn, upstream):
    x = x.clone().requires_grad_()
    module.zero_grad()
    y = fn(module, x)
    y.backward(upstream)
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()


def _t_calls(bn, x):
    return torch.stack([bn(x[t]) for t in range(x.shape[0])])


def test_per_step_training_equals_shared_bn_called_once_per_timestep():
    tbn, bn, x = _pair("per_step")
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, gx, gw, gb = _grads(tbn.train(), x, lambda m, v: m(v), upstream)
    y_ref, gx_ref, gw_ref, gb_ref = _grads(bn.train(), x, _t_calls, upstream)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(gb, gb_ref, rtol=0, atol=1e-10)
    # Running statistics after T momentum updates, one per timestep, in order.
    torch.testing.assert_close(tbn.running_mean, bn.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(tbn.running_var, bn.running_var, rtol=0, atol=1e-6)
    assert tbn.num_batches_tracked.item() == bn.num_batches_tracked.item() == T


def test_per_step_running_stats_accumulate_over_several_calls_float32():
    tbn, bn, x = _pair("per_step", seed=2)
    tbn, bn, x = tbn.float(), bn.float(), x.float()
    for k in range(3):
        tbn(x + k)
        _t_calls(bn, x + k)
    torch.testing.assert_close(tbn.running_mean, bn.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(tbn.running_var, bn.running_var, rtol=0, atol=1e-6)


def test_per_step_is_not_joint():
    """The per-step statistics differ from the T*B statistics on this input (the test above can fail)."""
    tbn, _, x = _pair("per_step")
    joint, _, _ = _pair("joint")
    assert not torch.allclose(tbn(x), joint(x))


def test_joint_equals_batchnorm2d_on_the_folded_batch():
    tbn, bn, x = _pair("joint")
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fold = lambda m, v: m(v.flatten(0, 1)).view_as(v)  # noqa: E731
    y, gx, gw, gb = _grads(tbn.train(), x, lambda m, v: m(v), upstream)
    y_ref, gx_ref, gw_ref, gb_ref = _grads(bn.train(), x, fold, upstream)
    for a, b in ((y, y_ref), (gx, gx_ref), (gw, gw_ref), (gb, gb_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    torch.testing.assert_close(tbn.running_mean, bn.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(tbn.running_var, bn.running_var, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["per_step", "joint"])
def test_eval_uses_running_statistics(mode):
    tbn, _, x = _pair(mode)
    tbn.eval()
    y = tbn(x)
    shape = (1, 1, C, 1, 1)
    expected = (x - tbn.running_mean.view(shape)) / torch.sqrt(tbn.running_var.view(shape) + tbn.eps)
    expected = expected * tbn.weight.view(shape) + tbn.bias.view(shape)
    torch.testing.assert_close(y, expected.detach(), rtol=0, atol=1e-12)
    before = tbn.running_mean.clone()
    tbn(x + 10)
    assert torch.equal(tbn.running_mean, before)  # eval does not update


@pytest.mark.parametrize("mode", ["per_step", "joint"])
@pytest.mark.parametrize("training", [True, False])
def test_sequence_of_vectors(mode, training):
    """[T, B, C] (after a linear layer) works in both modes, train and eval, like BatchNorm1d per step."""
    tbn = TemporalBatchNorm(C, mode=mode).double().train(training)
    bn = nn.BatchNorm1d(C).double().train(training)
    x = torch.randn(T, B, C, dtype=torch.float64) + torch.arange(T).double().view(T, 1, 1)
    y = tbn(x)
    assert y.shape == x.shape
    if mode == "per_step" or not training:
        torch.testing.assert_close(y, _t_calls(bn, x), rtol=0, atol=1e-10)
    else:
        torch.testing.assert_close(y, bn(x.flatten(0, 1)).view_as(x), rtol=0, atol=1e-10)


def test_bad_mode_and_rank_raise():
    with pytest.raises(ValueError, match="bn_mode.*per_step, joint"):
        TemporalBatchNorm(3, mode="x")
    with pytest.raises(ValueError, match=r"TemporalBatchNorm input.*\[T, B, C"):
        TemporalBatchNorm(3)(torch.zeros(4, 3))


def test_folded_runs_the_module_once_on_t_times_b():
    calls = []
    conv = nn.Conv2d(C, 2, 3, padding=1).double()
    conv.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    x = torch.randn(T, B, C, H, W, dtype=torch.float64)
    y = Folded(conv)(x)
    assert calls == [(T * B, C, H, W)]
    assert y.shape == (T, B, 2, H, W)
    torch.testing.assert_close(y, torch.stack([conv(x[t]) for t in range(T)]), rtol=0, atol=1e-12)


def test_folded_pool_and_linear_change_the_trailing_shape():
    x = torch.randn(T, B, C, H, W)
    assert Folded(nn.AvgPool2d(2))(x).shape == (T, B, C, H // 2, W // 2)
    assert Folded(nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, 7)))(x).shape == (T, B, 7)


# --- per-step BatchNorm on CUDA: torch's batch_norm over [B, T*C, H, W], run here on CPU tensors ---


def _channels_last(x):
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)


@pytest.mark.parametrize("shape, layout", [((T, B, C, H, W), "contiguous"), ((T, B, C, H, W), "channels_last"),
                                           ((T, 7, C), "contiguous")])
@pytest.mark.parametrize("affine", [True, False])
def test_the_cuda_path_of_per_step_batchnorm_equals_the_per_step_function(monkeypatch, shape, layout, affine):
    """Values, the input's and parameters' gradients and the running statistics (T momentum updates per call,
    over three calls), against the path the CPU takes (the C kernels, or torch operators without them)."""
    from msgcli.snn.layers import batchnorm

    timesteps_as_channels = batchnorm._timesteps_as_channels
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) * 2 + torch.arange(T).double().view(T, *[1] * (len(shape) - 1))
          for _ in range(3)]
    ups = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]
    if layout == "channels_last":
        xs, ups = [_channels_last(x) for x in xs], [_channels_last(u) for u in ups]
    results = {}
    for path in ("per_step_function", "torch_batch_norm"):
        monkeypatch.setattr(batchnorm, "_torch_batch_norm_applies", lambda x, sync, path=path: path == "torch_batch_norm")
        calls = []
        monkeypatch.setattr(batchnorm, "_timesteps_as_channels", lambda *a: calls.append(1) or timesteps_as_channels(*a))
        bn = TemporalBatchNorm(C).double()
        if not affine:
            bn.weight, bn.bias = None, None
        else:
            with torch.no_grad():
                bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
                bn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
        out = []
        for x, up in zip(xs, ups):
            x = x.clone(memory_format=torch.preserve_format).requires_grad_()
            y = bn(x)
            y.backward(up)
            assert y.stride() == x.stride()
            out += [y.detach(), x.grad]
        if affine:
            out += [bn.weight.grad, bn.bias.grad]
        out += [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
        results[path] = out
        assert len(calls) == (3 if path == "torch_batch_norm" else 0)
    for got, expected in zip(results["torch_batch_norm"], results["per_step_function"]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_cuda_takes_torch_batch_norm_unless_triton_is_asked_for(monkeypatch):
    from types import SimpleNamespace

    from msgcli.snn import kernels
    from msgcli.snn.layers import batchnorm

    on_cuda, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    monkeypatch.delenv("MSGSNN_TRITON_BN", raising=False)
    assert batchnorm._torch_batch_norm_applies(on_cuda, sync=False)
    assert not batchnorm._torch_batch_norm_applies(on_cuda, sync=True)  # synchronised: the per-step Function
    assert not batchnorm._torch_batch_norm_applies(on_cpu, sync=False)
    assert batchnorm._batchnorm_kernels(torch.device("cuda")) is kernels.TORCH
    assert batchnorm._batchnorm_kernels(torch.device("cpu")) is kernels.CPU
    monkeypatch.setenv("MSGSNN_TRITON_BN", "1")
    assert not batchnorm._torch_batch_norm_applies(on_cuda, sync=False)
    assert batchnorm._batchnorm_kernels(torch.device("cuda")) is kernels.CUDA


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2), nn.AvgPool2d(3, stride=2, padding=1), nn.AvgPool2d(2, ceil_mode=True),
                                  nn.AvgPool2d(3), nn.AvgPool2d((2, 4))])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(7, 9), (12, 12)])  # 12 x 12: the windows tile it, but for the padded pool
def test_a_pool_of_spikes_saves_nothing_and_gives_autograds_gradient(pool, channels_last, size):
    from msgcli.snn.layers.spike_conv import SpikeInputPool
    from tests.test_perf_memory import saved_bytes

    torch.manual_seed(0)
    x = (torch.rand(6, 4, *size) > 0.7).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(pool(x))
    ours = x.clone().requires_grad_()
    SpikeInputPool.apply(ours, pool).backward(grad)
    theirs = x.clone().requires_grad_()
    pool(theirs).backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
    assert ours.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    nbytes, _ = saved_bytes(lambda t: SpikeInputPool.apply(t, pool), x.clone().requires_grad_())
    assert nbytes == 0


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2), nn.AvgPool2d(3), nn.AvgPool2d((2, 4))])
@pytest.mark.parametrize("grad_channels_last", [False, True])
def test_a_tiling_pools_gradient_written_into_a_given_tensor_equals_torchs(pool, grad_channels_last):
    """The broadcast copy of a pool whose windows tile its input, into an ``out`` laid out like a channels-last
    input: torch's ``avg_pool2d_backward`` bit for bit, whatever the layout of the gradient it is given."""
    from msgcli.snn.layers.spike_conv import avg_pool_backward

    like = torch.empty(5, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(pool(like).shape)
    if grad_channels_last:
        grad = grad.contiguous(memory_format=torch.channels_last)
    kernel = list(pool.kernel_size) if isinstance(pool.kernel_size, tuple) else [pool.kernel_size] * 2
    expected = torch.ops.aten.avg_pool2d_backward(grad, like, kernel, kernel, [0, 0], False, True, None)
    out = torch.full_like(like, float("nan"))
    assert avg_pool_backward(pool, grad, like, out) is out
    assert torch.equal(out, expected) and out.stride() == like.stride()
