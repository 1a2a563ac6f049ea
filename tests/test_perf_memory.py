"""Memory budget of the spiking layers (issue 6, item 5), counted from what autograd saves.

Per LIF layer and timestep, backward may keep at most one float tensor of activation size plus the
spikes packed as bool (one byte per neuron); MSG draws its mask in backward, so it keeps no more
than the plain surrogate gradient; evaluation under no_grad keeps nothing. No timing here: the
speed targets are measured by benchmarks/step.py, not asserted on a shared machine.
"""

import pytest
import torch

from msgcli.snn import LIF, TemporalBatchNorm, build_model


def saved_bytes(fn, *args):
    """Bytes of the tensors autograd saves for backward while ``fn(*args)`` runs (each storage once)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


def _current(shape, dtype=torch.float32, channels_last=False):
    x = torch.randn(shape) * 0.8 + 0.4
    if channels_last:
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape)
    return x.to(dtype).requires_grad_()


LAYOUTS = [((10, 4, 16, 12, 12), False), ((10, 4, 16, 12, 12), True), ((6, 8, 100), False)]


@pytest.mark.parametrize("backend", ["auto", "fused"])
@pytest.mark.parametrize("shape, channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_one_lif_layer_saves_at_most_one_float_tensor_plus_bool_spikes(backend, shape, channels_last, dtype, p):
    x = _current(shape, dtype, channels_last)
    budget = x.numel() * x.element_size() + x.numel()  # membrane + spikes as bool
    nbytes, spikes = saved_bytes(LIF(mask_p=p, backend=backend), x)
    assert 0 < nbytes <= budget
    spikes.sum().backward()  # what was saved is enough for backward
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("mask_mode", ["element", "channel", "timestep"])
def test_msg_saves_no_more_than_the_plain_surrogate_gradient(mask_mode):
    x = _current((10, 4, 16, 12, 12), channels_last=True)
    plain, _ = saved_bytes(LIF(mask_p=0.0), x)
    masked, _ = saved_bytes(LIF(mask_p=0.5, mask_mode=mask_mode), x)
    assert masked <= plain


def test_msg_network_saves_no_more_than_sg_network():
    x = torch.rand(2, 4, 2, 32, 32)
    sizes = {}
    for p in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, mask_p=p)
        sizes[p], _ = saved_bytes(model, x)
    assert sizes[0.5] <= sizes[0.0]


def test_evaluation_under_no_grad_saves_nothing():
    x = _current((10, 4, 16, 12, 12), channels_last=True)
    lif = LIF(mask_p=0.5)
    with torch.no_grad():
        nbytes, spikes = saved_bytes(lif, x)
    assert nbytes == 0 and spikes.grad_fn is None
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, mask_p=0.5).eval()
    with torch.no_grad():
        nbytes, logits = saved_bytes(model, torch.rand(2, 4, 2, 32, 32))
    assert nbytes == 0 and logits.grad_fn is None


def test_per_step_batchnorm_saves_only_its_input():
    x = _current((10, 4, 16, 12, 12), channels_last=True)
    nbytes, _ = saved_bytes(TemporalBatchNorm(16), x)
    stats = 2 * 10 * 16 * 8 + 16 * 4 + 8  # mean and 1/std per (t, c) in float64, the weight, the count (0-d float64)
    assert nbytes <= x.numel() * x.element_size() + stats
