"""Multi-step LIF: the equations of docs/method.md, fused == reference, MSG limits, no state between calls."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from msgcli.snn import LIF
from tests.by_hand import Spike

SURROGATES = ("piecewise_linear", "arctan", "sigmoid", "rectangular")
CASES = list(itertools.product(SURROGATES, ("hard", "soft"), (False, True)))

def by_hand_lif(current, surrogate, reset, detach_reset, tau=2.0, v_th=0.5):
    """V[t] = V[t-1] + (I[t] - V[t-1]) / tau; S = H(V - V_th); hard V(1 - S) or soft V - V_th S.detach()."""
    v = torch.zeros_like(current[0])
    out = []
    for t in range(current.shape[0]):
        v = v + (current[t] - v) / tau
        s = Spike.apply(v - v_th, SimpleNamespace(surrogate=surrogate, alpha=2.0, mask_p=0.0))
        r = s.detach() if detach_reset else s
        v = v * (1 - r) if reset == "hard" else v - v_th * r
        out.append(s)
    return torch.stack(out)


def _inputs(seed=0, shape=(6, 3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.8 + 0.4
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, upstream


def _run(lif, x, upstream, seed=None):
    current = x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    spikes = lif(current)
    spikes.backward(upstream)
    return spikes.detach(), current.grad


# --- anchored to the equations ----------------------------------------------------------------


def test_reference_matches_a_gradient_derived_by_hand():
    """T=3, one neuron, hard reset through S, piecewise linear alpha=2, tau=2, V_th=0.5.

    Forward, I = [1.2, 0.6, 1.0]:
      t0: H = 0 + 1.2/2 = 0.6,            x = 0.1  -> S=1, g = 2 - 4*0.1 = 1.6, V = 0
      t1: H = 0 + 0.6/2 = 0.3,            x = -0.2 -> S=0, g = 2 - 4*0.2 = 1.2, V = 0.3
      t2: H = 0.3 + (1.0-0.3)/2 = 0.65,   x = 0.15 -> S=1, g = 2 - 4*0.15 = 1.4
    Backward with dL/dS = [1, 2, 3]:
      dH2 = 3*1.4 = 4.2;                          dI2 = 4.2/2 = 2.1;    dV1 = 4.2*(1-1/2) = 2.1
      dS1 = 2 + dV1*(-H1) = 2 - 0.63 = 1.37;      dH1 = dV1*(1-S1) + dS1*g1 = 2.1 + 1.644 = 3.744
      dI1 = 3.744/2 = 1.872;                      dV0 = 3.744/2 = 1.872
      dS0 = 1 + dV0*(-H0) = 1 - 1.1232 = -0.1232; dH0 = dV0*(1-S0) + dS0*g0 = 0 - 0.19712
      dI0 = -0.19712/2 = -0.09856
    """
    current = torch.tensor([1.2, 0.6, 1.0], dtype=torch.float64).view(3, 1, 1)
    for backend in ("reference", "fused"):
        x = current.clone().requires_grad_()
        spikes = LIF(backend=backend)(x)
        spikes.backward(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(3, 1, 1))
        assert spikes.flatten().tolist() == [1.0, 0.0, 1.0], backend
        torch.testing.assert_close(x.grad.flatten(), torch.tensor([-0.09856, 1.872, 2.1], dtype=torch.float64), rtol=0, atol=1e-12)


def test_soft_reset_by_hand():
    """Soft reset V - 0.5 S, I = [1.2, 0.6, 1.0]: H = 0.6 (S=1, V=0.1), H = 0.1+0.25 = 0.35 (S=0),
    H = 0.35 + (1.0-0.35)/2 = 0.675 (S=1)."""
    current = torch.tensor([1.2, 0.6, 1.0], dtype=torch.float64).view(3, 1, 1)
    for backend in ("reference", "fused"):
        assert LIF(reset="soft", backend=backend)(current.requires_grad_()).flatten().tolist() == [1.0, 0.0, 1.0]
    # Without the reset the second step would be H = 0.6 + (0.6-0.6)/2 = 0.6 and spike.
    assert LIF(reset="soft", v_threshold=10.0)(current).sum() == 0


@pytest.mark.parametrize("surrogate, reset, detach_reset", CASES)
def test_reference_equals_the_equations_written_by_hand(surrogate, reset, detach_reset):
    x, upstream = _inputs(1)
    lif = LIF(surrogate=surrogate, reset=reset, detach_reset=detach_reset, backend="reference")
    s_ref, g_ref = _run(lif, x, upstream)
    current = x.clone().requires_grad_()
    s_hand = by_hand_lif(current, surrogate, reset, detach_reset)
    s_hand.backward(upstream)
    assert torch.equal(s_ref, s_hand.detach())
    torch.testing.assert_close(g_ref, current.grad, rtol=0, atol=1e-10)


# --- fused == reference -----------------------------------------------------------------------


@pytest.mark.parametrize("surrogate, reset, detach_reset", CASES)
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_fused_equals_reference(surrogate, reset, detach_reset, p):
    x, upstream = _inputs(2)
    opts = dict(surrogate=surrogate, reset=reset, detach_reset=detach_reset, mask_p=p)
    s_ref, g_ref = _run(LIF(backend="reference", **opts), x, upstream, seed=7)
    s_fus, g_fus = _run(LIF(backend="fused", **opts), x, upstream, seed=7)
    rate = s_ref.mean().item()
    assert 0.05 < rate < 0.95  # many neurons near threshold, both outcomes present
    assert torch.equal(s_ref, s_fus)
    assert g_ref.abs().sum() > 0
    torch.testing.assert_close(g_fus, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_fused_equals_reference_with_other_constants(reset):
    x, upstream = _inputs(10)
    opts = dict(tau=3.0, v_threshold=0.3, alpha=4.0, surrogate="sigmoid", reset=reset, mask_p=0.3)
    s_ref, g_ref = _run(LIF(backend="reference", **opts), x, upstream, seed=11)
    s_fus, g_fus = _run(LIF(backend="fused", **opts), x, upstream, seed=11)
    assert torch.equal(s_ref, s_fus)
    torch.testing.assert_close(g_fus, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_fused_saves_at_most_one_float_tensor_of_activation_size(p):
    """Memory: one float tensor [T, B, ...] (the membrane) plus bool/uint8 spikes; the MSG mask is not stored."""
    x, _ = _inputs(11)
    current = x.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        spikes = LIF(backend="fused", mask_p=p)(current)
    floats = [t for t in saved if t.is_floating_point()]
    others = [t for t in saved if not t.is_floating_point()]
    assert saved and sum(t.numel() for t in floats) <= x.numel()
    assert all(t.dtype in (torch.bool, torch.uint8) for t in others)
    assert sum(t.numel() for t in others) <= x.numel()
    spikes.sum().backward()  # the saved state is enough for backward


def test_fused_differs_from_reference_under_different_seeds():
    """The p=0.5 comparison above is only meaningful if the mask actually depends on the seed."""
    x, upstream = _inputs(2)
    _, g_a = _run(LIF(backend="fused", mask_p=0.5), x, upstream, seed=7)
    _, g_b = _run(LIF(backend="fused", mask_p=0.5), x, upstream, seed=8)
    assert not torch.allclose(g_a, g_b)


def test_auto_backend_on_cpu_is_the_fused_function():
    x, upstream = _inputs(0)
    spikes = LIF()(x.clone().requires_grad_())
    assert isinstance(spikes.grad_fn, torch.autograd.function.BackwardCFunction)  # one custom Function node
    s_auto, g_auto = _run(LIF(), x, upstream)
    s_fus, g_fus = _run(LIF(backend="fused"), x, upstream)
    assert torch.equal(s_auto, s_fus) and torch.equal(g_auto, g_fus)


def test_float32_fused_close_to_reference():
    x, upstream = _inputs(3)
    x, upstream = x.float(), upstream.float()
    s_ref, g_ref = _run(LIF(backend="reference"), x, upstream)
    s_fus, g_fus = _run(LIF(backend="fused"), x, upstream)
    assert torch.equal(s_ref, s_fus)
    torch.testing.assert_close(g_fus, g_ref, rtol=1e-5, atol=1e-5)


# --- MSG limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("surrogate, reset, detach_reset", CASES)
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_mask_p_zero_is_the_plain_surrogate_gradient(surrogate, reset, detach_reset, backend):
    x, upstream = _inputs(5)
    _, g = _run(LIF(surrogate=surrogate, reset=reset, detach_reset=detach_reset, mask_p=0.0, backend=backend), x, upstream)
    current = x.clone().requires_grad_()
    by_hand_lif(current, surrogate, reset, detach_reset).backward(upstream)
    torch.testing.assert_close(g, current.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reset, detach_reset", [("hard", True), ("hard", False), ("soft", True), ("soft", False)])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_mask_p_one_leaves_no_spike_path_gradient(reset, detach_reset, backend):
    """All of dS/dV masked: the input gradient equals that of a zero surrogate, which is exactly 0
    since every path from I to the spikes crosses dS/dV (the leak and reset paths alone carry none)."""
    x, upstream = _inputs(6)
    _, g = _run(LIF(mask_p=1.0, reset=reset, detach_reset=detach_reset, backend=backend), x, upstream)
    current = x.clone().requires_grad_()
    by_hand_lif(current, "zero", reset, detach_reset).backward(upstream)
    assert torch.equal(g, current.grad)
    assert torch.count_nonzero(g) == 0


# --- no state between calls -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_two_calls_give_the_same_output(backend):
    lif = LIF(backend=backend)
    x, upstream = _inputs(8)
    s1, g1 = _run(lif, x, upstream)
    s2, g2 = _run(lif, x, upstream)
    assert torch.equal(s1, s2)
    assert torch.equal(g1, g2)
    # A different batch in between changes nothing either.
    lif(torch.ones_like(x) * 5)
    assert torch.equal(lif(x), s1)


def test_membrane_starts_at_zero_every_call():
    lif = LIF()
    # One step of I = 0.9 gives H = 0.45 < 0.5; if V leaked from a previous call of I = 0.9 it would spike.
    x = torch.full((1, 2, 3), 0.9)
    assert lif(x).sum() == 0
    assert lif(x).sum() == 0


def test_no_grad_fused_path_stores_nothing_and_gives_the_same_spikes():
    x, _ = _inputs(9)
    current = x.clone().requires_grad_()
    with_grad = LIF(backend="fused")(current)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        without = LIF(backend="fused")(current)
    assert without.grad_fn is None and not without.requires_grad
    assert torch.equal(without, with_grad.detach())
    assert torch.equal(LIF(backend="fused")(x), with_grad.detach())  # input without requires_grad


def test_output_shape_and_dtype_follow_the_input():
    for shape in [(4, 2), (4, 2, 3), (4, 2, 3, 5, 5)]:
        x = torch.randn(shape)
        s = LIF()(x)
        assert s.shape == x.shape and s.dtype == x.dtype
        assert set(s.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("option, value", [("mask_p", "x"), ("mask_p", 1.5), ("alpha", "a"), ("alpha", 0.0),
                                           ("v_threshold", "v"), ("tau", 0.5), ("reset", "zero"),
                                           ("surrogate", "tanh"), ("mask_mode", "row"), ("backend", "cuda")])
def test_a_bad_option_is_named_in_the_error(option, value):
    with pytest.raises(ValueError, match=f"^{option}: .*{value}"):
        LIF(**{option: value})
