"""Surrogate derivatives and the MSG mask (docs/method.md, "Surrogate gradients" and "MSG")."""

import math

import pytest
import torch

from msgcli.snn import LIF
from msgcli.snn.surrogate import SURROGATES, SpikeSpec, arctan, piecewise_linear, rectangular, sigmoid


def _at(fn, x, alpha):
    return fn(torch.tensor(x, dtype=torch.float64), alpha).item()


# --- the four formulas at hand-picked points -------------------------------------------------


@pytest.mark.parametrize(
    "x, alpha, expected",
    [
        (0.0, 2.0, 2.0),  # peak = alpha
        (0.25, 2.0, 1.0),  # 2 - 4 * 0.25
        (-0.25, 2.0, 1.0),  # symmetric
        (0.1, 2.0, 1.6),  # 2 - 4 * 0.1
        (0.5, 2.0, 0.0),  # |x| = 1/alpha: edge of the support
        (0.7, 2.0, 0.0),  # outside the support
        (0.1, 4.0, 2.4),  # 4 - 16 * 0.1
    ],
)
def test_piecewise_linear(x, alpha, expected):
    assert _at(piecewise_linear, x, alpha) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "x, alpha, expected",
    [
        (0.0, 2.0, 2.0),  # alpha / (1 + 0)
        (1 / math.pi, 2.0, 1.0),  # pi/2 * 2 * (1/pi) = 1 -> 2 / (1 + 1)
        (-2 / math.pi, 2.0, 0.4),  # (pi/2 * 2 * 2/pi)^2 = 4 -> 2 / 5
        (1 / math.pi, 4.0, 0.8),  # pi/2 * 4 / pi = 2 -> 4 / 5
    ],
)
def test_arctan(x, alpha, expected):
    assert _at(arctan, x, alpha) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "x, alpha, expected",
    [
        (0.0, 2.0, 0.5),  # 2 * 0.5 * 0.5
        (0.5 * math.log(3.0), 2.0, 0.375),  # s(ln 3) = 3/4 -> 2 * 3/4 * 1/4
        (-0.5 * math.log(3.0), 2.0, 0.375),  # s(-ln 3) = 1/4 -> symmetric
        (0.25 * math.log(3.0), 4.0, 0.75),  # s(ln 3) = 3/4 -> 4 * 3/16
    ],
)
def test_sigmoid(x, alpha, expected):
    assert _at(sigmoid, x, alpha) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "x, alpha, expected",
    [
        (0.0, 2.0, 2.0),
        (0.49, 2.0, 2.0),  # |x| < 1/2
        (-0.49, 2.0, 2.0),
        (0.5, 2.0, 0.0),  # strict inequality at the edge
        (0.3, 4.0, 0.0),  # 0.3 > 1/4
        (0.2, 4.0, 4.0),
    ],
)
def test_rectangular(x, alpha, expected):
    assert _at(rectangular, x, alpha) == pytest.approx(expected, abs=1e-12)


def test_registry_holds_the_four_surrogates():
    assert set(SURROGATES) == {"piecewise_linear", "arctan", "sigmoid", "rectangular"}


@pytest.mark.parametrize("name", sorted(SURROGATES))
def test_forward_is_heaviside_at_or_above_threshold(name):
    # tau=2, V_th=0.5: H[0] = I/2, so I = 1.0 puts the membrane exactly at threshold.
    current = torch.tensor([[0.9999], [1.0], [1.0001], [-3.0]], dtype=torch.float64).T.unsqueeze(-1)  # [T=1, B=4, 1]
    for backend in ("reference", "fused"):
        spikes = LIF(surrogate=name, backend=backend)(current.clone().requires_grad_())
        assert spikes.flatten().tolist() == [0.0, 1.0, 1.0, 0.0], backend


# --- MSG --------------------------------------------------------------------------------------


def _one_step_grad(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """Input gradient of a T=1 LIF with upstream ones: dS/dV * (1/tau), i.e. the masked surrogate / 2."""
    current = x.clone().requires_grad_()
    lif(current).sum().backward()
    return current.grad * lif.tau


def _near_threshold(n: int, seed: int = 0) -> torch.Tensor:
    """[T=1, n] inputs whose membrane I/2 lies in (V_th - 0.4, V_th + 0.4): inside every support at alpha=2."""
    g = torch.Generator().manual_seed(seed)
    return (2 * (0.5 + 0.8 * (torch.rand(1, n, generator=g, dtype=torch.float64) - 0.5)))


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.8])
def test_masked_fraction_is_p_within_four_sigma(p, backend):
    n = 100_000
    x = _near_threshold(n)
    plain = piecewise_linear(x / 2 - 0.5, 2.0)
    torch.manual_seed(123)
    grad = _one_step_grad(LIF(mask_p=p, backend=backend), x)
    nonzero = plain != 0
    assert nonzero.sum() > 0.99 * n
    dropped = (grad[nonzero] == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / nonzero.sum().item())
    assert abs(dropped - p) < 4 * sigma
    # Kept entries are the plain surrogate, unscaled (release: no 1/(1-p)).
    kept = grad != 0
    torch.testing.assert_close(grad[kept], plain[kept], rtol=0, atol=1e-12)


def test_mask_is_drawn_afresh_at_every_backward():
    torch.manual_seed(0)
    current = _near_threshold(2000).requires_grad_()
    spikes = LIF(mask_p=0.5, backend="fused")(current)
    grads = []
    for _ in range(2):
        (g,) = torch.autograd.grad(spikes.sum(), current, retain_graph=True)
        grads.append(g != 0)
    assert not torch.equal(grads[0], grads[1])
    # Both draws drop roughly half (so the difference is the draw, not a broken mask).
    for kept in grads:
        assert 0.4 < kept.double().mean().item() < 0.6


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_rescale_divides_kept_entries_by_one_minus_p(p):
    x = _near_threshold(5000)
    plain = piecewise_linear(x / 2 - 0.5, 2.0)
    torch.manual_seed(1)
    grad = _one_step_grad(LIF(mask_p=p, rescale=True), x)
    kept = grad != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(grad[kept], plain[kept] / (1 - p), rtol=0, atol=1e-12)


def test_mask_fill_puts_arctan_derivative_at_masked_positions():
    # Membranes up to 1.0 away from V_th: piecewise_linear is 0 for |x| >= 0.5, arctan never is.
    x = 2 * (0.5 + 2.0 * (torch.rand(1, 4000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5))
    v = x / 2 - 0.5
    plain, fill = piecewise_linear(v, 2.0), arctan(v, 2.0)
    torch.manual_seed(3)
    grad = _one_step_grad(LIF(mask_p=0.5, mask_fill="arctan"), x)
    is_plain = (grad - plain).abs() < 1e-12
    is_fill = (grad - fill).abs() < 1e-12
    assert bool((is_plain | is_fill).all())
    distinct = (plain - fill).abs() > 1e-6
    frac_fill = (is_fill & distinct).sum().item() / distinct.sum().item()
    assert 0.45 < frac_fill < 0.55
    # Outside the triangle the only non-zero values come from the arctan fill.
    outside = plain == 0
    assert (grad[outside] != 0).any()


def test_mask_p_one_with_fill_equals_the_fill_surrogate():
    x = _near_threshold(500)
    grad = _one_step_grad(LIF(mask_p=1.0, mask_fill="arctan"), x)
    torch.testing.assert_close(grad, arctan(x / 2 - 0.5, 2.0), rtol=0, atol=1e-12)


def _rectangular_mask(mode: str, shape, seed: int) -> torch.Tensor:
    """Keep-pattern of a T=1 LIF: rectangular surrogate is alpha everywhere near threshold, so grad != 0 <=> kept."""
    g = torch.Generator().manual_seed(seed)
    x = 1.0 + 0.4 * (torch.rand(1, *shape, generator=g, dtype=torch.float64) - 0.5)  # membrane 0.5 +- 0.1
    torch.manual_seed(seed)
    grad = _one_step_grad(LIF(mask_p=0.5, surrogate="rectangular", mask_mode=mode), x)
    assert bool(((grad == 0) | (grad == 2.0)).all())
    return (grad != 0)[0]


def test_channel_mask_drops_whole_channels():
    kept = _rectangular_mask("channel", (16, 8, 3, 3), seed=4)  # [B, C, H, W]
    per_channel = kept.flatten(2)
    assert bool((per_channel.all(-1) | ~per_channel.any(-1)).all())  # constant within (sample, channel)
    frac = per_channel[..., 0].double().mean().item()
    assert 0.3 < frac < 0.7
    # Not one draw per sample: channels of one sample differ.
    assert bool((per_channel[..., 0].any(1) & ~per_channel[..., 0].all(1)).any())


def test_timestep_mask_drops_whole_samples_of_a_timestep():
    kept = _rectangular_mask("timestep", (64, 4, 3, 3), seed=5)  # [B, C, H, W]
    per_sample = kept.flatten(1)
    assert bool((per_sample.all(-1) | ~per_sample.any(-1)).all())
    frac = per_sample[:, 0].double().mean().item()
    assert 0.3 < frac < 0.7


def test_structured_masks_are_drawn_per_timestep():
    spec = SpikeSpec(mask_p=0.5, mask_mode="channel")
    torch.manual_seed(6)
    draws = [spec.keep_mask(torch.zeros(32, 8, 4, 4)) for _ in range(2)]
    assert draws[0].shape == (32, 8, 1, 1)
    assert not torch.equal(draws[0], draws[1])


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mask_p": 1.5}, "mask_p"),
        ({"mask_p": -0.1}, "mask_p"),
        ({"surrogate": "foo"}, "surrogate"),
        ({"reset": "x"}, "reset"),
        ({"mask_mode": "x"}, "mask_mode"),
        ({"mask_fill": "x"}, "mask_fill"),
        ({"alpha": 0.0}, "alpha"),
        ({"backend": "x"}, "backend"),
    ],
)
def test_bad_options_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LIF(**kwargs)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="piecewise_linear.*arctan.*sigmoid.*rectangular"):
        LIF(surrogate="foo")
    with pytest.raises(ValueError, match="hard, soft"):
        LIF(reset="x")
    with pytest.raises(ValueError, match="element, channel, timestep"):
        LIF(mask_mode="x")


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_wrong_rank_input_raises(backend):
    with pytest.raises(ValueError, match=r"LIF input.*\[T, B"):
        LIF(backend=backend)(torch.zeros(5))
