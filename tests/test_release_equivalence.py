"""msgsnn's backbones compute what the authors' release computes, and start from its initialisation.

The release builds an ordinary ANN (its ``model/*.py``), replaces every ReLU by a LIF that keeps
its membrane between calls, and calls the network ONCE PER TIMESTEP (its ``SpikeNet``). This file
writes each paper backbone out again from the release's layout, layer by layer, in plain torch:
VGGNet and CIFARConvNet (``model/convnet.py``), ResNet18 as ``main.py`` builds it
(``ResNet18(pool='avg')``, ``model/resnet.py``) and the SEW-ResNets (``model/sewresnet.py``, its
default ADD connection). None of it is built from msgcli's modules, so a different layer, pool,
stride or connection shows: msgsnn's weights are copied in by order (every shape checked), and
logits, weight gradients and BatchNorm statistics are compared in float64 with mask_p = 0 (no
random mask, so both sides are deterministic). docs/method.md, "Neuron" and "Networks".
"""

import math

import pytest
import torch
from torch import nn

from msgcli import config as config_io
from msgcli.engine.build import build_model_from_config
from msgcli.snn import TemporalBatchNorm, build_model

TAU, V_TH, ALPHA = 2.0, 0.5, 2.0


class PiecewiseLinearSpike(torch.autograd.Function):
    """S = H(x >= 0); dS/dx = alpha - alpha^2 |x| for |x| < 1/alpha, else 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (ALPHA - ALPHA * ALPHA * x.abs()).clamp(min=0)


class PlainLIF(nn.Module):
    """The release's LIF, one timestep per call, in place of a ReLU: the membrane lives on the module."""

    def reset(self):
        self.v, self.rate, self.calls = 0.0, 0.0, 0

    def forward(self, current):
        v = self.v + (current - self.v) / TAU  # charge
        spike = PiecewiseLinearSpike.apply(v - V_TH)  # fire
        self.v = v * (1 - spike)  # hard reset, gradient through S
        self.rate, self.calls = self.rate + spike.detach().mean().item(), self.calls + 1
        return spike


def conv(cin, cout, kernel, stride=1, padding=0):
    return nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)


def plain_stack(widths, in_channels):
    """3x3 conv (no bias), BatchNorm2d and a LIF per width; ``"A"``: AvgPool2d(2) (``model/convnet.py``)."""
    layers = []
    for width in widths:
        if width == "A":
            layers.append(nn.AvgPool2d(2))
        else:
            layers += [conv(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), PlainLIF()]
            in_channels = width
    return layers


class ReleaseVGGNet(nn.Module):
    """``VGGNet``: 64-128-AP-256-256-AP-512-512-AP-512-512-AP, flatten, fc (``512*9`` at 48x48 input)."""

    def __init__(self, in_channels, num_classes, input_size):
        super().__init__()
        self.conv = nn.Sequential(*plain_stack([64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "A"], in_channels))
        self.fc = nn.Linear(512 * (input_size // 16) ** 2, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class ReleaseCIFARConvNet(nn.Module):
    """``CIFARConvNet``: 256-256-AP-256-256-AP-512-512-AP-1024-1024, global average pool, fc."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        widths = [256, 256, "A", 256, 256, "A", 512, 512, "A", 1024, 1024]
        self.conv = nn.Sequential(*plain_stack(widths, in_channels), nn.AdaptiveAvgPool2d((1, 1)))
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class ReleaseBasicBlock(nn.Module):
    """``model/resnet.py`` BasicBlock: stride 2 and a 1x1 stride-2 downsample when the width changes; LIF after the sum."""

    def __init__(self, cin, cout):
        super().__init__()
        stride = 2 if cin != cout else 1
        self.conv1, self.bn1, self.relu = conv(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), PlainLIF()
        self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(conv(cin, cout, 1, 2), nn.BatchNorm2d(cout)) if cin != cout else None
        self.relu2 = PlainLIF()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.downsample is None else self.downsample(x)))


class ReleaseResNet18(nn.Module):
    """``ResNet18(pool)``: 7x7 stride-2 conv, BN, LIF, 3x3 stride-2 ``pool``, 4 stages of 2 blocks, avgpool, fc."""

    def __init__(self, in_channels, num_classes, pool):
        super().__init__()
        self.conv1, self.bn1, self.relu = conv(in_channels, 64, 7, 2, 3), nn.BatchNorm2d(64), PlainLIF()
        self.pool = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}[pool](3, 2, 1)
        stages = ((2, 64, 64), (2, 64, 128), (2, 128, 256), (2, 256, 512))
        self.layers = nn.Sequential(*(ReleaseBasicBlock(cin if j == 0 else cout, cout) for n, cin, cout in stages for j in range(n)))
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.pool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.avgpool(x).flatten(1))


class ReleaseSEWBlock(nn.Module):
    """``model/sewresnet.py`` BasicBlock, ``cnf`` ADD: LIF at the end of the branch and of the downsample, then their sum."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1, self.bn1, self.node1 = conv(inplanes, planes, 3, stride, 1), nn.BatchNorm2d(planes), PlainLIF()
        self.conv2, self.bn2, self.node2 = conv(planes, planes, 3, 1, 1), nn.BatchNorm2d(planes), PlainLIF()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(conv(inplanes, planes, 1, stride), nn.BatchNorm2d(planes))
            self.downsample_sn = PlainLIF()

    def forward(self, x):
        out = self.node2(self.bn2(self.conv2(self.node1(self.bn1(self.conv1(x))))))
        identity = x if self.downsample is None else self.downsample_sn(self.downsample(x))
        return identity + out


class ReleaseSEWResNet(nn.Module):
    """``SEWResNet``: 7x7 stride-2 conv, BN, LIF, 3x3 stride-2 max pool, stages of ``depths`` blocks, avgpool, fc."""

    def __init__(self, depths, in_channels, num_classes):
        super().__init__()
        self.conv1, self.bn1, self.node1 = conv(in_channels, 64, 7, 2, 3), nn.BatchNorm2d(64), PlainLIF()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        blocks, inplanes = [], 64
        for i, depth in enumerate(depths):
            planes = 64 * 2**i
            for j in range(depth):
                blocks.append(ReleaseSEWBlock(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes
        self.layers = nn.Sequential(*blocks)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d((1, 1)), nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.maxpool(self.node1(self.bn1(self.conv1(x)))))
        return self.fc(self.avgpool(x).flatten(1))


def run_release(net, x, T):
    """The release's SpikeNet: reset every membrane, call the network once per timestep, stack ``[T, B, K]``."""
    for m in net.modules():
        if isinstance(m, PlainLIF):
            m.reset()
    frames = x.unbind(1) if x.dim() == 5 else [x] * T  # events [B, T, C, H, W]; images repeated (direct encoding)
    return torch.stack([net(frame) for frame in frames])


def with_weights(layers):
    """Convolutions, BatchNorms and linear layers in registration order (the order their weights are copied)."""
    kinds = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.Linear)
    return [(next(k for k in kinds if isinstance(m, k)), m) for m in layers.modules() if isinstance(m, kinds)]


def copy_weights(model, release):
    ours, theirs = with_weights(model), with_weights(release)
    assert [kind for kind, _ in ours] == [kind for kind, _ in theirs]
    for (_, a), (_, b) in zip(ours, theirs):
        b.load_state_dict(a.state_dict())  # strict: every shape must agree
        if isinstance(a, nn.Conv2d):
            assert (a.kernel_size, a.stride, a.padding) == (b.kernel_size, b.stride, b.padding)


def setup(name, release, input_shape, seed, T=2, **options):
    """msgsnn's ``name`` with its BatchNorms' affine parameters varied (so every layer fires some of its
    neurons), the release-layout network with the same weights, and a float64 input of ``input_shape``."""
    torch.manual_seed(seed)
    in_channels = input_shape[-3]
    model = build_model(name, in_channels=in_channels, num_classes=10, T=T, mask_p=0.0, **options)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TemporalBatchNorm):
                m.weight.uniform_(0.6, 1.4)
                m.bias.uniform_(0.0, 0.6)
    model = model.double()
    release = release.double()
    copy_weights(model, release)
    x = torch.rand(*input_shape, dtype=torch.float64) * 2
    return model, release, x


def loss_of(logits, targets):
    return nn.functional.cross_entropy(logits.mean(0), targets)  # CE on the time-mean output


def forward_backward(model, release, x, targets, T):
    logits = model(x)
    loss_of(logits, targets).backward()
    release_logits = run_release(release, x, T)
    loss_of(release_logits, targets).backward()
    return logits, release_logits


def assert_equal_up_to_rounding(ours, theirs, what):
    """Largest difference within 1e-7 of the largest magnitude: float64 rounding, not a different computation."""
    error = (ours - theirs).abs().max().item()
    assert error <= 1e-7 * theirs.abs().max().item() + 1e-12, f"{what}: off by {error:.3g}"


def assert_same(model, release, x, targets, T):
    logits, release_logits = forward_backward(model, release, x, targets, T)
    assert logits.shape == release_logits.shape == (T, x.shape[0], 10)
    assert_equal_up_to_rounding(logits, release_logits, "logits")
    ours, theirs = with_weights(model), with_weights(release)
    for i, ((kind, a), (_, b)) in enumerate(zip(ours, theirs)):
        for p, q in zip(a.parameters(), b.parameters()):  # weight (and bias) gradients
            assert_equal_up_to_rounding(p.grad, q.grad, f"{kind.__name__} {i} gradient")
        if kind is nn.modules.batchnorm._BatchNorm:  # per-timestep statistics, T momentum updates
            assert_equal_up_to_rounding(a.running_mean, b.running_mean, f"BatchNorm {i} running mean")
            assert_equal_up_to_rounding(a.running_var, b.running_var, f"BatchNorm {i} running variance")
    first_conv = next(m for _, m in ours if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0  # the gradient crossed every spiking layer
    rates = [m.rate / m.calls for m in release.modules() if isinstance(m, PlainLIF)]
    assert sum(0.01 < r < 0.99 for r in rates) >= 0.8 * len(rates), rates  # spikes and resets were exercised
    return logits, release_logits


# T = 2, small inputs and batches (for a 2-core CPU in float64), training-mode BatchNorm (batch statistics
# per timestep, as the release trains). Events [B, T, 2, H, W] for the DVS backbones, images for the others.
BACKBONES = {
    "vggsnn": (lambda: ReleaseVGGNet(2, 10, 16), (2, 2, 2, 16, 16), {"input_size": 16}),
    "resnet18": (lambda: ReleaseResNet18(2, 10, pool="avg"), (2, 2, 2, 16, 16), {}),
    "cifarnet": (lambda: ReleaseCIFARConvNet(3, 10), (2, 3, 16, 16), {}),
    "sew_resnet18": (lambda: ReleaseSEWResNet((2, 2, 2, 2), 3, 10), (2, 3, 16, 16), {}),
    "sew_resnet34": (lambda: ReleaseSEWResNet((3, 4, 6, 3), 3, 10), (2, 3, 16, 16), {}),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_matches_the_release_layout(name):
    """Same logits, weight and BatchNorm gradients and running statistics as the release's layout (float64)."""
    make_release, shape, options = BACKBONES[name]
    model, release, x = setup(name, make_release(), shape, seed=0, **options)
    model.train()
    release.train()
    assert_same(model, release, x, torch.tensor([3, 7]), T=2)


def test_vggsnn_matches_the_release_at_48x48_with_bn_in_eval_mode():
    """VGGSNN at its paper input (fc 512*3*3), BatchNorm on running statistics calibrated on the clip."""
    model, release, x = setup("vggsnn", ReleaseVGGNet(2, 10, 48), (2, 2, 2, 48, 48), seed=1, input_size=48)
    bns = [m for m in model.modules() if isinstance(m, TemporalBatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.momentum = 1.0  # the last timestep's batch statistics
        model.train()(x)
        for m in bns:
            m.momentum = 0.1
    copy_weights(model, release)
    model.eval()
    release.eval()
    assert_same(model, release, x, torch.tensor([3, 7]), T=2)


def test_the_comparison_sees_the_stem_pool():
    """Guard (the bug this file was written for): msgsnn's ResNet18 with a max-pooled stem against the release's
    average-pooled one loads the same weights but computes other logits and gradients."""
    model, release, x = setup("resnet18", ReleaseResNet18(2, 10, pool="avg"), (2, 2, 2, 16, 16), seed=0, stem_pool="max")
    model.train()
    release.train()
    logits, release_logits = forward_backward(model, release, x, torch.tensor([3, 7]), T=2)
    assert (logits - release_logits).abs().max() > 0.1 * release_logits.abs().max()
    g_ours = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight.grad
    g_release = release.conv1.weight.grad
    assert (g_ours - g_release).norm() > 0.1 * g_release.norm()


def test_the_comparison_sees_the_reset_gradient():
    """Guard: detaching S in the reset (not the release) gives the same forward but other weight gradients."""
    model, release, x = setup("vggsnn", ReleaseVGGNet(2, 10, 16), (2, 2, 2, 16, 16), seed=2, input_size=16)
    detached = build_model("vggsnn", in_channels=2, num_classes=10, T=2, input_size=16, detach_reset=True).double()
    detached.load_state_dict(model.state_dict())  # LIF has no state: same keys
    detached.train()
    release.train()
    logits, release_logits = forward_backward(detached, release, x, torch.tensor([1, 2]), T=2)
    assert_equal_up_to_rounding(logits, release_logits, "logits")
    g_ours = next(m for m in detached.modules() if isinstance(m, nn.Conv2d)).weight.grad
    assert not torch.allclose(g_ours, release.conv[0].weight.grad, rtol=1e-5, atol=1e-5)


def test_mask_p_one_leaves_only_the_classifier_gradient():  # MSG at the network level
    """MSG at p = 1 in a whole network: no gradient crosses any spike, so every conv/BN gradient is 0."""
    torch.manual_seed(3)
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=2, input_size=16, mask_p=1.0).double()
    clip = torch.rand(2, 2, 2, 16, 16, dtype=torch.float64) * 2
    loss_of(model(clip), torch.tensor([1, 2])).backward()
    for name, param in model.named_parameters():
        if name.startswith("classifier"):
            assert param.grad.abs().sum() > 0
        else:
            assert param.grad is None or torch.count_nonzero(param.grad) == 0, name


# ---- initialisation: each paper preset's fresh model against the release's rule, layer by layer


def pytorch_default_std(layer):
    """nn.Conv2d / nn.Linear's own init, kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return 1 / math.sqrt(3 * layer.weight[0].numel())


def kaiming_normal_fan_out_std(layer):
    """Kaiming-normal, mode fan_out, ReLU gain (the release's SEWResNet): sqrt(2 / (C_out k k))."""
    return math.sqrt(2 / (layer.weight.shape[0] * layer.weight[0, 0].numel()))


PAPER_PRESETS = {  # preset: (input channels, the release's convolution init)
    "dvs-vgg": (2, pytorch_default_std), "ncaltech-vgg": (2, pytorch_default_std),
    "dvs-resnet18": (2, pytorch_default_std), "ncaltech-resnet18": (2, pytorch_default_std),
    "cifar10-cifarnet": (3, pytorch_default_std), "cifar10-cifarnet-noaa": (3, pytorch_default_std),
    "cifar100-cifarnet": (3, pytorch_default_std), "cifar100-resnet18": (3, pytorch_default_std),
    "imagenet-sew34": (3, kaiming_normal_fan_out_std), "imagenet-sew18-release": (3, kaiming_normal_fan_out_std),
}


def layer_stds(model):
    return [(m, m.weight.detach().std().item()) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("preset", list(PAPER_PRESETS))
def test_a_fresh_preset_model_has_the_releases_initialisation(preset):
    """Every convolution's weight std as the release's rule gives it (within 5%; the rules differ by about 2.45x);
    the linear readout at PyTorch's default under every rule (the release's main.py replaces fc by a fresh nn.Linear)."""
    in_channels, conv_rule = PAPER_PRESETS[preset]
    torch.manual_seed(0)
    model = build_model_from_config(config_io.load_preset(preset), in_channels, 10)
    for layer, std in layer_stds(model):
        expected = conv_rule(layer) if isinstance(layer, nn.Conv2d) else pytorch_default_std(layer)
        assert std == pytest.approx(expected, rel=0.05), (preset, layer)


def test_kaiming_init_and_the_sew_stem_for_event_input():
    """``init="kaiming"``: Kaiming-normal (fan_out) everywhere. The release's SEW-ResNet on 2-channel input: its
    SpikeNet wrapper swaps the first convolution for a fresh nn.Conv2d, so that one keeps PyTorch's default."""
    torch.manual_seed(0)
    for name in ("vggsnn", "resnet18"):
        convs = [(m, s) for m, s in layer_stds(build_model(name, 2, 10, 2, init="kaiming")) if isinstance(m, nn.Conv2d)]
        for layer, std in convs:
            assert std == pytest.approx(kaiming_normal_fan_out_std(layer), rel=0.05), (name, layer)
    (stem, stem_std), *rest = [(m, s) for m, s in layer_stds(build_model("sew_resnet18", 2, 10, 2)) if isinstance(m, nn.Conv2d)]
    assert stem_std == pytest.approx(pytorch_default_std(stem), rel=0.05)
    for layer, std in rest:
        assert std == pytest.approx(kaiming_normal_fan_out_std(layer), rel=0.05)
