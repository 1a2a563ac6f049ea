"""msgsnn's VGGSNN computes what the authors' release computes.

The release wraps an ordinary ANN (Conv2d, BatchNorm2d, AvgPool2d, Linear, with every ReLU
replaced by a LIF that keeps its membrane between calls) and calls it ONCE PER TIMESTEP.
This file writes those semantics out by hand, from plain torch modules, copies msgsnn's
weights into them, and checks logits and gradients (docs/method.md, "Neuron").
"""

import torch
from torch import nn

from msgsnn.snn import Folded, TemporalBatchNorm, build_model

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


class ReleaseVGGSNN(nn.Module):
    """The release's network, one timestep per call; the membranes live in `self.v` between calls.

    Built from plain Conv2d / BatchNorm2d / AvgPool2d / Linear modules following the layout of
    msgsnn's conv stack (64c3-128c3-AP2-... for vggsnn), with msgsnn's weights copied in.
    """

    def __init__(self, model):
        super().__init__()
        self.layers = nn.ModuleList()
        for block in model.features:
            if isinstance(block, Folded):  # a pooling stage
                assert isinstance(block.module, nn.AvgPool2d)
                self.layers.append(nn.AvgPool2d(2))
                continue
            folded_conv, tbn, lif = block
            assert lif.tau == TAU and lif.v_threshold == V_TH and lif.reset == "hard" and not lif.detach_reset
            conv = nn.Conv2d(folded_conv.module.in_channels, folded_conv.module.out_channels, 3, padding=1, bias=False)
            bn = nn.BatchNorm2d(tbn.num_features)
            conv.load_state_dict(folded_conv.module.state_dict())
            bn.load_state_dict(tbn.state_dict())
            self.layers.append(nn.ModuleDict({"conv": conv, "bn": bn}))
        linear = model.classifier.module
        self.fc = nn.Linear(linear.in_features, linear.out_features)
        self.fc.load_state_dict(linear.state_dict())

    def reset(self, T):
        self.v = [0.0] * len(self.layers)
        self.rates, self.T = [0.0] * len(self.layers), T  # firing rate per layer, for the test's own checks

    def step(self, x):
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.AvgPool2d):
                x = layer(x)
                continue
            current = layer["bn"](layer["conv"](x))
            v = self.v[i] + (current - self.v[i]) / TAU  # charge
            x = PiecewiseLinearSpike.apply(v - V_TH)  # fire
            self.v[i] = v * (1 - x)  # hard reset, gradient through S
            self.rates[i] += x.detach().mean().item() / self.T
        return self.fc(x.flatten(1))

    def forward(self, clip):  # [B, T, C, H, W] -> [T, B, K]
        self.reset(clip.shape[1])
        return torch.stack([self.step(clip[:, t]) for t in range(clip.shape[1])])


def _setup(name, input_size, seed):
    torch.manual_seed(seed)
    model = build_model(name, in_channels=2, num_classes=10, T=4, input_size=input_size, mask_p=0.0)
    clip = torch.rand(2, 4, 2, input_size, input_size, dtype=torch.float64) * 2
    # Calibrate the running statistics on this clip (momentum 1: the last timestep's batch
    # statistics; float32 for speed), then vary the affine parameters, so that every layer
    # fires some but not all of its neurons.
    bns = [m for m in model.modules() if isinstance(m, TemporalBatchNorm)]
    with torch.no_grad():
        for m in bns:
            m.momentum = 1.0
        model.train()(clip.float())
        for m in bns:
            m.momentum = 0.1
            m.weight.uniform_(0.6, 1.4)
            m.bias.uniform_(0.0, 0.6)
    model = model.double()
    targets = torch.tensor([3, 7])
    return model, ReleaseVGGSNN(model).double(), clip, targets


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _loss(logits, targets):
    return nn.functional.cross_entropy(logits.mean(0), targets)  # CE on the time-mean output


def _compare(model, release, clip, targets):
    logits = model(clip)
    _loss(logits, targets).backward()
    ours = _grads(model)
    release_logits = release(clip)
    _loss(release_logits, targets).backward()
    theirs = _grads(release)

    assert logits.shape == release_logits.shape == (4, 2, 10)
    torch.testing.assert_close(logits, release_logits, rtol=1e-5, atol=1e-5)

    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    our_weights = [(n, g) for n, g in ours.items() if g.dim() > 1]  # conv and linear weights
    their_weights = [(n, g) for n, g in theirs.items() if g.dim() > 1]
    assert len(our_weights) == len(their_weights) == n_convs + 1
    for (name, g), (_, g_release) in zip(our_weights, their_weights):
        assert g.shape == g_release.shape, name
        torch.testing.assert_close(g, g_release, rtol=1e-5, atol=1e-5, msg=name)
    # BatchNorm affine parameters and the classifier bias, in the same order.
    our_vectors = [g for g in ours.values() if g.dim() == 1]
    their_vectors = [g for g in theirs.values() if g.dim() == 1]
    assert len(our_vectors) == len(their_vectors) == 2 * n_convs + 1
    for g, g_release in zip(our_vectors, their_vectors):
        torch.testing.assert_close(g, g_release, rtol=1e-5, atol=1e-5)
    return logits, our_weights


def test_vggsnn_matches_the_release_bn_eval():
    """T=4, B=2, 48x48, two input channels, BN in eval mode, p = 0: same logits and gradients."""
    model, release, clip, targets = _setup("vggsnn", 48, seed=0)
    assert sum(isinstance(m, nn.Conv2d) for m in release.modules()) == 8
    model.eval()
    release.eval()
    logits, weight_grads = _compare(model, release, clip, targets)
    rates = [r for r, layer in zip(release.rates, release.layers) if isinstance(layer, nn.ModuleDict)]
    assert all(0.01 < r < 0.99 for r in rates), rates  # the comparison exercises spikes and resets
    assert all(g.abs().sum() > 0 for _, g in weight_grads)  # gradient reaches the first conv


def test_vggsnn_matches_the_release_bn_training_per_step():
    """Training-mode BN (on the small VGG, for speed): the release's shared BatchNorm2d sees B samples per call, T calls;
    msgsnn's per_step TemporalBatchNorm must give the same outputs, gradients and running stats."""
    model, release, clip, targets = _setup("vggsnn_tiny", 16, seed=1)
    model.train()
    release.train()
    _compare(model, release, clip, targets)
    bns = [m for m in model.modules() if isinstance(m, TemporalBatchNorm)]
    release_bns = [layer["bn"] for layer in release.layers if isinstance(layer, nn.ModuleDict)]
    for ours, theirs in zip(bns, release_bns):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-6)


def test_comparison_is_sensitive_to_the_reset_gradient():
    """Guard: detaching S in the reset (not the release) changes the weight gradients beyond 1e-5."""
    model, release, clip, targets = _setup("vggsnn_tiny", 16, seed=2)
    detached = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=4, input_size=16, detach_reset=True).double()
    detached.load_state_dict(model.state_dict())  # LIF has no state: same keys
    detached.eval()
    release.eval()
    logits = detached(clip)
    _loss(logits, targets).backward()
    release_logits = release(clip)
    _loss(release_logits, targets).backward()
    torch.testing.assert_close(logits, release_logits, rtol=1e-5, atol=1e-5)  # same forward
    g_ours = next(m for m in detached.modules() if isinstance(m, nn.Conv2d)).weight.grad
    g_release = release.layers[0]["conv"].weight.grad
    assert not torch.allclose(g_ours, g_release, rtol=1e-5, atol=1e-5)


def test_mask_p_one_leaves_only_the_classifier_gradient():  # MSG at the network level
    """MSG at p = 1 in a whole network: no gradient crosses any spike, so every conv/BN gradient is 0."""
    torch.manual_seed(3)
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=10, T=2, input_size=16, mask_p=1.0).double()
    clip = torch.rand(2, 2, 2, 16, 16, dtype=torch.float64) * 2
    _loss(model(clip), torch.tensor([1, 2])).backward()
    for name, param in model.named_parameters():
        if name.startswith("classifier"):
            assert param.grad.abs().sum() > 0
        else:
            assert param.grad is None or torch.count_nonzero(param.grad) == 0, name
