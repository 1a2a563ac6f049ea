"""``model.recompute``: conv-BN-LIF blocks that keep only their input spikes, as bits, and recompute in backward.

The yardstick is the default path of the same model: same logits, same gradients (MSG masks included, so a
mask drawn in another order would show), running statistics updated once.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from msgcli.snn import build_model, packing
from msgcli.snn.kernels import CPU, TORCH, carry_dtype, torch_ops
from msgcli.snn.layers import SpikingSequential, TemporalBatchNorm, set_recompute
from msgcli.snn.layers.spike_conv import avg_pool_backward
from msgcli.snn.msg import SpikeSpec
from tests.test_perf_memory import saved_bytes


def _step(model, x, seed=5):
    torch.manual_seed(seed)
    logits = model(x)
    logits.square().sum().backward()
    return logits, {n: p.grad.clone() for n, p in model.named_parameters()}, {n: b.clone() for n, b in model.named_buffers()}


def _pair(name, chunk, T=4, size=32, **options):
    torch.manual_seed(0)
    model = build_model(name, in_channels=2, num_classes=10, T=T, mask_p=0.5, input_size=size, **options)
    recomputed = copy.deepcopy(model)
    assert set_recompute(recomputed, True, chunk) > 0
    return model, recomputed


@pytest.mark.parametrize("name, T, chunk, size", [("vggsnn_tiny", 4, 1, 32), ("vggsnn_tiny", 4, 3, 32),
                                                  ("vggsnn_tiny", 4, 2, 32), ("resnet18", 3, 2, 16),
                                                  ("sew_resnet18", 2, 1, 16), ("vggsnn_tiny", 6, None, 32),
                                                  ("vggsnn", 4, None, 16),  # three blocks keep their current
                                                  ("resnet18", 3, None, 16)])
def test_recompute_gives_the_default_paths_logits_gradients_and_running_statistics(name, T, chunk, size):
    model, recomputed = _pair(name, chunk, T=T, size=size)
    x = torch.rand(3, T, 2, size, size).round()
    logits, grads, buffers = _step(model, x)
    logits_r, grads_r, buffers_r = _step(recomputed, x)
    assert torch.equal(logits, logits_r)
    for n, g in grads.items():
        # chunks of timesteps add the weight gradients in another order: float32 rounding, nothing more
        torch.testing.assert_close(grads_r[n], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=n)
    for n, b in buffers.items():  # running statistics moved once per step, as the default path's
        assert torch.equal(buffers_r[n], b), n



@pytest.mark.parametrize("name, T, chunk, size", [("vggsnn_tiny", 4, 1, 32), ("vggsnn_tiny", 4, 3, 32),
                                                  ("vggsnn_tiny", 6, None, 32), ("vggsnn", 4, None, 16),
                                                  ("resnet18", 3, None, 16)])
def test_in_float64_recompute_gives_the_default_paths_gradients_to_float64s_rounding(name, T, chunk, size):
    """The same arithmetic, not float32's: in float64, for any input, the gradients agree to float64's rounding,
    so what float32 shows beyond it (the stem's weight, whose terms are the most) is the order of the sums."""
    model, recomputed = _pair(name, chunk, T=T, size=size)
    model.double(), recomputed.double()
    for seed in range(3):
        x = torch.rand(3, T, 2, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        logits, grads, _ = _step(model, x.round())
        logits_r, grads_r, _ = _step(recomputed, x.round())
        assert torch.equal(logits, logits_r)
        for n, g in grads.items():
            assert grads_r[n].dtype == torch.float64, n
            torch.testing.assert_close(grads_r[n], g, rtol=1e-12, atol=1e-13 * g.abs().max().item(), msg=n)


def _lean(model, lean=True):
    """``model`` with every :class:`SpikingSequential` running its BatchNorm-LIF pairs through ``lean_bn_lif``
    (``lean=False``: the layers one by one)."""
    for module in model.modules():
        if isinstance(module, SpikingSequential):
            module.lean = lean
    return model


@pytest.mark.parametrize("chunk", [1, 3])
def test_recompute_with_whole_chunks_gives_the_default_paths_logits_and_gradients(chunk, monkeypatch):
    """The path of kernels that take no mask drawn beforehand (Triton, torch operators): each chunk's current
    joined from its timesteps and run whole, for all samples at once. The same numbers as the default path."""
    from msgcli.snn.layers import recompute

    monkeypatch.setattr(recompute._Block, "samples_per_part", lambda block, current: None)
    model, recomputed = _pair("vggsnn_tiny", chunk, T=4)
    x = torch.rand(3, 4, 2, 32, 32).round()
    logits, grads, buffers = _step(model, x)
    logits_r, grads_r, buffers_r = _step(recomputed, x)
    assert torch.equal(logits, logits_r)
    for n, g in grads.items():
        torch.testing.assert_close(grads_r[n], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=n)
    for n, b in buffers.items():
        assert torch.equal(buffers_r[n], b), n


def test_the_default_path_runs_batchnorm_lif_pairs_leanly_where_one_kernel_fuses_them(monkeypatch):
    """By default (``lean`` None) the pairs run leanly on the C kernels, saving the BatchNorm's input alone, and one
    by one on torch operators, where recomputing would cost passes of its own."""
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, input_size=32)
    sequences = [m for m in model.modules() if isinstance(m, SpikingSequential)]
    assert sequences and all(m.lean is None and not m.recompute for m in sequences)
    assert set_recompute(model, True) > 0 and all(m.recompute and m.lean for m in sequences)
    set_recompute(model, False)
    assert all(m.lean is None and not m.recompute for m in sequences)
    x = torch.rand(3, 4, 2, 32, 32).round()
    fused = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, input_size=32)
    fused_bytes, _ = saved_bytes(fused, x)
    one_by_one_bytes, _ = saved_bytes(_lean(copy.deepcopy(fused), False), x)
    assert fused_bytes < 0.8 * one_by_one_bytes
    monkeypatch.setattr(CPU, "fused", None)  # no C kernels: the layers one by one
    assert saved_bytes(fused, x)[0] == one_by_one_bytes


@pytest.mark.parametrize("name, T, size, ratio", [("vggsnn_tiny", 4, 32, 0.6), ("vggsnn_tiny", 6, 32, 0.6),
                                                  ("resnet18", 2, 16, 0.8)])
def test_lean_batchnorm_lif_pairs_equal_the_layers_run_one_by_one(name, T, size, ratio):
    """BatchNorm + LIF saving only the BatchNorm's input give what the two layers give when each saves its own,
    in ``ratio`` of the activation memory or less, in one chunk of timesteps whatever T (ResNet18's spikes after the
    residual sums still save their membrane)."""
    torch.manual_seed(0)
    plain = _lean(build_model(name, in_channels=2, num_classes=10, T=T, mask_p=0.5, input_size=size), False)
    model = _lean(copy.deepcopy(plain))
    x = torch.rand(3, T, 2, size, size).round()
    params = sum(p.numel() * 4 for p in model.parameters())  # the convolutions save their weights
    lean_bytes, _ = saved_bytes(model, x)
    plain_bytes, _ = saved_bytes(plain, x)
    assert lean_bytes - params < ratio * (plain_bytes - params)
    logits, grads, buffers = _step(model, x)
    logits_p, grads_p, buffers_p = _step(plain, x)
    assert torch.equal(logits, logits_p)
    for n, g in grads.items():
        assert torch.equal(grads_p[n], g), n
    for n, b in buffers.items():
        assert torch.equal(buffers_p[n], b), n


def test_a_pooled_pair_whose_kernel_writes_its_own_buffer_copies_the_gradient_into_the_inputs(monkeypatch):
    """Kernels that cannot write the current's gradient over the spikes' (Triton's) give it in a buffer of their
    own, copied into the gradient of the BatchNorm's input: the same numbers as the layers one by one."""
    from msgcli.snn.kernels import cpu

    monkeypatch.setattr(cpu.CpuKernels, "gradient_in_place", False)
    torch.manual_seed(0)
    plain = _lean(build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, mask_p=0.5, input_size=32), False)
    model = _lean(copy.deepcopy(plain))
    x = torch.rand(3, 4, 2, 32, 32).round()
    logits, grads, _ = _step(model, x)
    logits_p, grads_p, _ = _step(plain, x)
    assert torch.equal(logits, logits_p)
    for n, g in grads.items():
        assert torch.equal(grads_p[n], g), n


def test_the_default_paths_backward_makes_a_pooled_layers_spike_gradient_once():
    """The pool after a BatchNorm-LIF pair runs inside the pair: backward spreads the pooled gradient straight into
    the buffer where the pair then writes the current's gradient and the BatchNorm input's, so the widest layer's
    (vggsnn_tiny's first: 32 channels at 32x32, pooled) gradient is made once, not once more for the spikes."""
    T, B = 4, 3
    widest = T * B * 32 * 32 * 32 * 4
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=T, mask_p=0.5, input_size=32)
    loss = model(torch.rand(B, T, 2, 32, 32).round()).square().sum()
    with _Created() as seen:
        loss.backward()
    assert seen.sizes.count(widest) == 1


def test_the_default_path_lets_each_blocks_spikes_go_once_the_next_convolution_has_run(monkeypatch):
    """The layers of the blocks run in the outer SpikingSequential's loop: a block's spikes, kept as bits by the
    convolution after them, are freed before the next pair runs, not held by the call of the block they enter
    (VGGSNN, whose every other block has no pool after it)."""
    import weakref

    from msgcli.snn.layers import recompute

    made, alive_at_call = [], []
    run = recompute.lean_bn_lif

    def recorded(x, *args):
        alive_at_call.append(sum(ref() is not None for ref in made))
        spikes = run(x, *args)
        made.append(weakref.ref(spikes))
        return spikes

    monkeypatch.setattr(recompute, "lean_bn_lif", recorded)
    model = build_model("vggsnn", in_channels=2, num_classes=10, T=2, mask_p=0.5, input_size=16)
    model(torch.rand(2, 2, 2, 16, 16).round()).sum().backward()
    assert len(alive_at_call) == 8 and alive_at_call == [0] * 8


def test_a_pooled_pairs_spikes_before_the_pool_are_not_kept_for_reuse():
    """The buffer a pair makes its spikes in before the pool comes back to the CPU pool inside the forward, where
    grad is off; the pair lets it go, since a block kept there stays resident through the step's forward."""
    from msgcli.snn import memory

    memory.pool.clear()
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, mask_p=0.5, input_size=32)
    model(torch.rand(3, 4, 2, 32, 32).round())  # the first block's spikes: 1.5 MiB, above the pool's least
    assert memory.pool.cached == 0


@pytest.mark.parametrize("name, size, chunk, kept", [
    ("vggsnn", 48, None, [(512, 512, 12), (512, 512, 6), (512, 512, 6)]), ("vggsnn", 16, None, [(512, 512, 4),
                                                                                             (512, 512, 2), (512, 512, 2)]),
    ("vggsnn", 48, 5, []), ("vggsnn_tiny", 32, None, []), ("resnet18", 48, None, [])])
def test_by_default_recompute_keeps_the_current_of_narrow_blocks_after_wide_ones(monkeypatch, name, size, chunk, kept):
    """No chunk asked for: a block of 512 channels of 3x3 in (KEEP_FAN_IN) whose current is at most a quarter of the
    widest recomputed before it in the same SpikingSequential, the kept ones together within that widest, runs as
    the default path (VGGSNN: its three 512-to-512 blocks); a chunk asked for recomputes every block, and a ResNet's
    blocks, each its own SpikingSequential, are all recomputed. The gradients stay the default path's (the
    equality test above, VGGSNN at 16x16)."""
    from msgcli.snn.layers import recompute

    seen = []
    keeps = recompute.CurrentBudget.keeps

    def recorded(budget, x, conv, *args):
        kept_here = keeps(budget, x, conv, *args)
        if kept_here:
            seen.append((conv.in_channels, conv.out_channels, recompute._output_size(conv, tuple(x.shape[-2:]))[0]))
        return kept_here

    monkeypatch.setattr(recompute.CurrentBudget, "keeps", recorded)
    torch.manual_seed(0)
    model = build_model(name, in_channels=2, num_classes=10, T=2, mask_p=0.5, input_size=size)
    assert set_recompute(model, True, chunk) > 0
    model(torch.rand(1, 2, 2, size, size).round()).sum().backward()
    assert seen == kept


def test_a_different_mask_would_show():
    """The test above can see the MSG mask: another seed in backward moves the gradients far beyond rounding."""
    model, recomputed = _pair("vggsnn_tiny", 1)
    x = torch.rand(3, 4, 2, 32, 32).round()
    _, grads, _ = _step(model, x, seed=5)
    _, grads_r, _ = _step(recomputed, x, seed=6)
    w = "features.0.0.module.weight"
    assert (grads_r[w] - grads[w]).abs().max() > 1e-3 * grads[w].abs().max()


def test_recompute_under_bf16_autocast_and_joint_statistics_matches_the_default_path():
    model, recomputed = _pair("vggsnn_tiny", 1, bn_mode="joint")
    x = torch.rand(2, 4, 2, 32, 32).round()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads, buffers = _step(model, x)
        logits_r, grads_r, buffers_r = _step(recomputed, x)
    torch.testing.assert_close(logits_r, logits, rtol=2e-2, atol=2e-2)
    for n, g in grads.items():
        torch.testing.assert_close(grads_r[n], g, rtol=5e-2, atol=5e-2 * g.abs().max().item(), msg=n)
    for n, b in buffers.items():  # torch's joint BatchNorm against the C statistics, over bf16 values
        torch.testing.assert_close(buffers_r[n], b, rtol=1e-2, atol=1e-3, msg=n)


def test_recompute_saves_the_input_spikes_as_bits_and_the_chunk_boundaries():
    from msgcli.snn.neuron import mark_levels

    T, B = 6, 4
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=T, mask_p=0.5, input_size=32)
    block = model.features[2]  # the 32 -> 64 channel block at 16x16
    x = torch.rand(T, B, 32, 16, 16).round()
    params = sum(p.numel() * 4 for p in block.parameters())
    default, _ = saved_bytes(block, mark_levels(x.clone(), 1))
    assert default > 4 * T * B * 64 * 16 * 16  # the BatchNorm's input, in float32
    for chunk in (1, 2, 6):
        set_recompute(block, True, chunk)
        nbytes, spikes = saved_bytes(block, mark_levels(x.clone(), 1))
        states = (T // chunk - 1) * B * 64 * 16 * 16 * 4  # the membrane where a chunk starts, float32
        stats = 2 * T * 64 * 8  # mean and 1/std per (t, c), float64
        assert x.numel() / 8 + states + params <= nbytes <= x.numel() / 8 + 16 * T + states + params + stats
        spikes.sum().backward()
    assert nbytes - params < default / 20  # one chunk: the input's bits and the statistics


def test_by_default_blocks_with_cheap_convolutions_go_by_samples_and_the_rest_by_chunks(monkeypatch):
    """No chunk asked for: a block whose convolution has at most RERUN_FAN_IN inputs per output runs its
    backward by samples, the others by chunks of timesteps (ResNet18 has both)."""
    from msgcli.snn.layers import recompute

    blocks, by_samples = [], []
    init, backward = recompute._Block.__init__, recompute._Block.backward_by_samples

    def made(block, *args, **kwargs):
        init(block, *args, **kwargs)
        blocks.append(block)

    def ran(block, *args, **kwargs):
        by_samples.append(block)
        return backward(block, *args, **kwargs)

    monkeypatch.setattr(recompute._Block, "__init__", made)
    monkeypatch.setattr(recompute._Block, "backward_by_samples", ran)
    _, recomputed = _pair("resnet18", None, T=3, size=16)
    recomputed(torch.rand(2, 3, 2, 16, 16).round()).square().sum().backward()
    convs = [b for b in blocks if b.conv is not None]
    cheap = [b for b in convs if b.conv.weight[0].numel() <= recompute.RERUN_FAN_IN]
    assert 0 < len(cheap) < len(convs)
    assert {id(b) for b in by_samples} == {id(b) for b in cheap} and len(by_samples) == len(cheap)


def _block_and_recomputed_gradients(x, channels=5):
    """A conv-BN-LIF block's spikes, input gradient and parameter gradients for spikes ``x [T, B, C, H, W]``, on
    the default path and recomputed (no chunk asked for), under one seed."""
    from msgcli.snn.models.base import conv_bn_lif
    from msgcli.snn.neuron import mark_levels

    torch.manual_seed(0)
    block = conv_bn_lif(x.shape[2], channels, {"mask_p": 0.5})
    recomputed = copy.deepcopy(block)
    set_recompute(recomputed, True)
    results = []
    for net in (block, recomputed):
        torch.manual_seed(5)
        inputs = mark_levels(x.clone().requires_grad_(), 1)
        spikes = net(inputs)
        (spikes * torch.linspace(-1, 1, spikes.numel()).view(spikes.shape)).sum().backward()
        results.append((spikes, inputs.grad, {n: p.grad.clone() for n, p in net.named_parameters()}))
    return results


def _assert_same_gradients(results):
    (spikes, grad_x, grads), (spikes_r, grad_x_r, grads_r) = results
    assert torch.equal(spikes, spikes_r)
    torch.testing.assert_close(grad_x_r, grad_x, rtol=1e-5, atol=1e-6 * grad_x.abs().max().item())
    for n, g in grads.items():
        torch.testing.assert_close(grads_r[n], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=n)


@pytest.mark.parametrize("B", [3, 10])
def test_by_samples_parts_that_end_inside_a_byte_of_the_inputs_bits_give_the_default_paths_gradients(B):
    """3 channels of 5x5 spikes: 75 entries a sample, so a part's timesteps fill whole bytes only in parts of 8
    samples. At B = 3 the one part, at B = 10 the last of two, ends inside a byte and is decoded a timestep at a
    time; the first part at B = 10 takes its timesteps' bytes side by side. Either way the gradients are the
    default path's."""
    _assert_same_gradients(_block_and_recomputed_gradients(torch.rand(4, B, 3, 5, 5).round()))


def test_by_samples_parts_read_their_samples_from_the_forwards_pieces_of_several_timesteps(monkeypatch):
    """Small images (5x5) convolve a chunk of timesteps per call forward: at T = 6 two pieces of three, each
    holding the whole batch's bits. Parts of 8 samples (PART_ENTRIES made small), two of them, read each
    timestep's samples from inside its piece; the gradients are the default path's. Backward's second pass takes
    the parts latest first, so the last part's current, still there from the first pass, is not made again:
    three runs of the convolution in backward, not four."""
    from msgcli.snn.layers import recompute

    T, B = 6, 16
    monkeypatch.setattr(recompute, "PART_ENTRIES", T * 8 * 5 * 5 * 5)
    pieces, parts, convolved = [], [], []
    run, current = recompute._Block.backward_by_samples, recompute._Block.current

    def counted(block, x, *args):
        if block.conv is not None:
            convolved.append(x.shape[0])
        return current(block, x, *args)

    monkeypatch.setattr(recompute._Block, "current", counted)

    def by_samples(block, grad_out, read, *args):
        pieces.append(block.piece)
        return run(block, grad_out, lambda b0, b1: parts.append((b0, b1)) or read(b0, b1), *args)

    monkeypatch.setattr(recompute._Block, "backward_by_samples", by_samples)
    _assert_same_gradients(_block_and_recomputed_gradients(torch.rand(T, B, 3, 5, 5).round()))
    assert pieces == [3]
    assert parts == [(0, 8), (8, 16), (0, 8)]
    assert convolved == [3 * B, 3 * B] + [T * 8] * 3  # forward's two pieces, then backward's parts


def test_a_block_going_by_samples_keeps_no_membrane_where_a_chunk_would_start():
    from msgcli.snn.neuron import mark_levels

    T, B = 6, 4
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=T, mask_p=0.5, input_size=32)
    block = model.features[2]  # the 32 -> 64 channel block at 16x16: 288 inputs per output
    x = torch.rand(T, B, 32, 16, 16).round()
    params = sum(p.numel() * 4 for p in block.parameters())
    set_recompute(block, True)
    nbytes, spikes = saved_bytes(block, mark_levels(x.clone(), 1))
    stats = 2 * T * 64 * 8
    assert x.numel() / 8 + params <= nbytes <= x.numel() / 8 + 16 * T + params + stats
    spikes.sum().backward()


class _LargestTensor(TorchDispatchMode):
    """The bytes of the largest storage any operator creates (the C kernels' buffers included: torch allocates
    them)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("chunk", [1, 2])
def test_recompute_never_makes_a_whole_layers_spikes_or_their_gradient(chunk):
    """A recomputed block pools its spikes inside (the average pool after it), one timestep at a time forward and
    one chunk at a time backward, and convolves one timestep at a time: no tensor a step makes is larger than a
    chunk of the widest layer. The layers one by one make the first layer's spikes and their gradient whole."""
    T, B = 4, 3
    widest = B * 32 * 32 * 32 * 4  # a timestep of the first block's current (32 channels at 32x32), float32 bytes
    model, recomputed = _pair("vggsnn_tiny", chunk, T=T)
    x = torch.rand(B, T, 2, 32, 32).round()
    for net, bound in ((model, T * widest), (recomputed, chunk * widest)):
        with _LargestTensor() as seen:
            net(x).square().sum().backward()
        assert seen.largest == bound


class _Created(TorchDispatchMode):
    """The byte sizes of the new storages operators create (not views, not in-place or out= results, not
    shapes on the meta device)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (tuple, list)) else (out,)
        for t, declared in zip(results, func._schema.returns):
            if isinstance(t, torch.Tensor) and declared.alias_info is None and t.device.type != "meta":
                self.sizes.append(t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("chunk", [2, 3])
def test_recompute_backward_holds_a_blocks_current_for_the_whole_batch_a_timestep_at_a_time(chunk):
    """In backward a chunk's current is recomputed one timestep at a time and stays in those pieces: the spikes'
    gradient and the current's run a sample at a time, the latter written over the piece, which is freed once the
    convolution's backward has used it. So nothing backward makes is larger than a timestep of the widest
    block's current, bar the input gradient autograd passes to the block below (the second block's, at T = 6)."""
    T, B = 6, 3
    widest = B * 32 * 32 * 32 * 4
    passed = T * B * 32 * 16 * 16 * 4
    _, recomputed = _pair("vggsnn_tiny", chunk, T=T)
    loss = recomputed(torch.rand(B, T, 2, 32, 32).round()).square().sum()
    with _Created() as seen:
        loss.backward()
    assert max(size for size in seen.sizes if size != passed) == widest


def test_blocks_whose_images_come_out_small_convolve_a_chunk_of_timesteps_per_call(monkeypatch):
    """vggsnn_tiny at 32x32 by chunks of two: its first block's images are 32x32 (1024 pixels, above SMALL_IMAGE),
    convolved a timestep at a time; the next two's are 16x16 and 8x8 (at most 256), a chunk per call, forward and
    backward. The gradients stay the default path's (the test above, same sizes)."""
    from msgcli.snn.layers import recompute

    assert recompute.SMALL_IMAGE == 256
    T, B, chunk = 4, 3, 2
    _, recomputed = _pair("vggsnn_tiny", chunk, T=T)
    calls = {}
    for name, module in recomputed.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            def counting(x, weight, bias, forward=module._conv_forward, name=name):
                calls.setdefault(name, []).append(x.shape[0])
                return forward(x, weight, bias)
            monkeypatch.setattr(module, "_conv_forward", counting)
    recomputed(torch.rand(B, T, 2, 32, 32).round()).square().sum().backward()
    images = [sizes for _, sizes in sorted(calls.items())]
    assert len(images) == 3
    assert images[0] == [B] * (2 * T)  # forward, then backward's recomputation
    assert images[1] == images[2] == [chunk * B] * (2 * T // chunk)


def test_backward_by_samples_makes_nothing_larger_than_a_parts_current():
    """By samples (no chunk asked for, vggsnn_tiny's cheap convolutions), backward recomputes a part of at least
    PART_ENTRIES entries of current over all T at a time: twelve samples of the first block (32 channels at 32x32,
    T = 6), half the batch. The largest tensor it makes is that part's current: the second block's whole batch
    (its 24 samples make one part) is as large, nothing is larger."""
    from msgcli.snn.layers import recompute

    T, B = 6, 24
    per_sample = 32 * 32 * 32
    part = recompute.PART_ENTRIES // (T * per_sample)
    assert part == B // 2
    _, recomputed = _pair("vggsnn_tiny", None, T=T)
    loss = recomputed(torch.rand(B, T, 2, 32, 32).round()).square().sum()
    with _Created() as seen:
        loss.backward()
    assert max(seen.sizes) == T * part * per_sample * 4


@pytest.mark.parametrize("pool", [None, 2])
@pytest.mark.parametrize("joint", [False, True])
def test_a_chunks_backward_in_parts_of_the_batch_equals_one_call(pool, joint):
    """Parts of two samples (12 neurons a sample: a part must start on a whole byte of the mask's bits), the
    last part one sample: the current's gradient, the carried membrane gradient, the BatchNorm's terms and the
    generator's state after the mask equal those of the LIF's and the BatchNorm's backward over the whole chunk."""
    from msgcli.snn.kernels.ops import affine, batch_statistics, normalise_backward
    from msgcli.snn.layers.recompute import _Block
    from msgcli.snn.models.base import conv_bn_lif

    steps, B, C, H, W = 3, 5, 3, 2, 2
    folded, bn, lif = conv_bn_lif(2, C, {"mask_p": 0.5}, bn_mode="joint" if joint else "per_step")
    block = _Block(folded.module, bn, lif, None, steps, steps, torch.device("cpu"), pool and torch.nn.AvgPool2d(pool))
    assert block.samples_per_part(torch.empty(steps, B, C, H, W)) == 2
    torch.manual_seed(0)
    current = torch.randn(steps * B, C, H, W).contiguous(memory_format=torch.channels_last).view(steps, B, C, H, W)
    mean, _, invstd, count = batch_statistics(block.statistics_view(current), 1e-5, False, block.bn_ops)
    rows = 1 if joint else steps
    scale, shift = (c.expand(steps, -1) for c in affine(bn.weight, bn.bias, mean, invstd))
    state, grad_state = torch.randn_like(current[0]), torch.randn_like(current[0])
    grad_out = torch.randn(steps, B, C, H // (pool or 1), W // (pool or 1))
    spikes_grad = grad_out if pool is None else avg_pool_backward(block.pool, grad_out.flatten(0, 1),
                                                                   current.flatten(0, 1)).view(current.shape)
    torch.manual_seed(1)
    carried = grad_state.clone()
    grad_y = block.fire_backward(spikes_grad.clone(), current, scale, shift, state, carried)
    expected, *terms = normalise_backward(block.statistics_view(grad_y), block.statistics_view(current), bn.weight,
                                          mean, invstd, count, False, block.bn_ops, per_step=True)
    generator = torch.get_rng_state()
    torch.manual_seed(1)
    in_parts = current.clone()
    pieces = [in_parts[:1], in_parts[1:]]  # as the forward made them: the current's gradient is written over them
    terms_parts = block.backward_in_parts(grad_out, pieces, scale, shift, state, grad_state, bn.weight, mean,
                                          invstd, count, 2)
    assert torch.equal(torch.get_rng_state(), generator) and mean.shape[0] == rows
    torch.testing.assert_close(in_parts, expected.reshape(current.shape), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_state, carried, rtol=0, atol=0)
    for a, b in zip(terms_parts, terms):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_recompute_hands_the_heaps_free_pages_back_before_each_blocks_backward(monkeypatch):
    from msgcli.snn import memory

    calls = []
    monkeypatch.setattr(memory, "return_free_memory", lambda: calls.append(len(calls)))
    _, recomputed = _pair("vggsnn_tiny", 2)
    recomputed(torch.rand(2, 4, 2, 32, 32).round()).sum().backward()
    assert len(calls) == 3  # one per conv-BN-LIF block


@pytest.mark.parametrize("levels", [1, 2, 4, 16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packing_restores_spikes_and_their_averages_exactly(levels, channels_last):
    x = torch.randint(0, levels + 1, (5, 3, 7, 9)).float() / levels
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = packing.pack(x, levels)
    assert packed.nbytes == packing.bits(levels) * -(-x.numel() // 8)
    y = packing.unpack(packed, torch.float32)
    assert torch.equal(y, x) and y.stride() == x.stride()
    assert torch.equal(packing.unpack(packed, torch.bfloat16), x.bfloat16())


def test_packing_in_torch_operators_equals_numpys():
    """The planes other devices pack with torch operators are the ones numpy packs on the CPU."""
    codes = torch.randint(0, 5, (1003,), dtype=torch.uint8)
    planes = torch_ops.planes_numpy(codes, 3)
    assert torch.equal(torch_ops.planes_torch(codes, 3), planes)
    assert torch.equal(torch_ops.codes_torch(planes, 1003), codes)
    assert torch.equal(torch_ops.codes_numpy(planes, 1003), codes)


@pytest.mark.parametrize("ops", [CPU, TORCH], ids=["c", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_lif_over_chunks_carrying_the_membrane_equals_one_call(ops, dtype, reset):
    T = 5
    current = (torch.randn(T, 3, 8, 6, 6) + 0.4).flatten(0, 1).contiguous(memory_format=torch.channels_last)
    current = current.view(T, 3, 8, 6, 6).to(dtype)
    spec = SpikeSpec(mask_p=0.5)
    spikes, membrane = ops.lif_forward(current, 2.0, 0.5, reset, True)
    grad = torch.randn_like(current)
    torch.manual_seed(1)
    grad_current = ops.lif_backward(grad, membrane, 2.0, 0.5, spec, reset, False)
    state = torch.zeros_like(current[0], dtype=carry_dtype(dtype))
    parts = [ops.lif_chunk_forward(current[t0:t1], state, 2.0, 0.5, reset, True) for t0, t1 in ((0, 2), (2, 3), (3, 5))]
    assert torch.equal(torch.cat([s for s, _ in parts]), spikes)
    assert torch.equal(torch.cat([h for _, h in parts]), membrane)
    grad_state = torch.zeros_like(state)
    torch.manual_seed(1)
    chunks = [ops.lif_chunk_backward(grad[t0:t1], membrane[t0:t1], grad_state, 2.0, 0.5, spec, reset, False)
              for t0, t1 in ((3, 5), (2, 3), (0, 2))]
    assert torch.equal(torch.cat(chunks[::-1]), grad_current)


def test_recompute_of_a_model_without_blocks_is_an_error():
    from msgcli.snn.models.registry import register_model, _MODELS

    @register_model
    def _bn_only(in_channels=2, num_classes=10, T=4, neuron=None, input_size=None):
        return TemporalBatchNorm(in_channels)

    try:
        with pytest.raises(ValueError, match="recompute: _bn_only has no conv-BatchNorm-LIF block"):
            build_model("_bn_only", in_channels=2, num_classes=10, T=4, recompute=True)
    finally:
        _MODELS.pop("_bn_only")


def test_model_recompute_in_the_config_reaches_the_model():
    from msgcli import config as config_io
    from msgcli.engine.build import build_model_from_config
    from msgcli.snn.layers import SpikingSequential

    cfg = config_io.RunConfig()
    cfg.model.name, cfg.data.size, cfg.T = "vggsnn_tiny", 32, 2
    cfg.model.recompute = True
    model = build_model_from_config(cfg, in_channels=2, num_classes=10)
    assert {m.recompute for m in model.modules() if isinstance(m, SpikingSequential)} == {True}


def test_a_hooked_or_subclassed_batchnorm_or_lif_runs_its_own_forward():
    """The fused pair computes a LIF's output without calling it: where a hook or an overridden forward would
    see the call, the pair runs one by one, so analyze grads' forward hooks see every layer."""
    from msgcli.snn import LIF

    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, input_size=16)
    x = torch.rand(2, 4, 2, 16, 16).round()
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    seen = []
    handle = lifs[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    model(x).sum().backward()
    assert len(seen) == 1
    handle.remove()

    class Doubled(LIF):
        def forward(self, current):
            seen.append("doubled")
            return super().forward(current * 2)

    lifs[1].__class__ = Doubled
    model(x).sum().backward()
    assert seen[-1] == "doubled"


def test_a_recomputed_run_stopped_after_an_epoch_and_resumed_gives_the_uninterrupted_metrics(tmp_path):
    """Recompute draws each block's MSG mask again in backward: a resumed run must draw the masks the
    uninterrupted one drew, so its metrics are the same to the last digit."""
    import pandas as pd

    from msgcli.engine.train import train
    from tests.conftest import tiny_config

    straight = train(tiny_config(tmp_path, model__recompute=True, train__epochs=2, name="straight"), tmp_path / "out",
                     progress=False)
    train(tiny_config(tmp_path, model__recompute=True, train__epochs=1, name="resumed"), tmp_path / "out",
          progress=False)
    resumed = train(tiny_config(tmp_path, model__recompute=True, train__epochs=2, name="resumed"), tmp_path / "out",
                    resume=True, progress=False)
    assert resumed.summary["status"] == "finished"
    metrics = [pd.read_csv(r.run.path / "metrics.csv").drop(columns=["epoch_seconds"]) for r in (straight, resumed)]
    assert list(metrics[1]["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(*metrics)
