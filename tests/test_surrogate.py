"""Surrogate derivatives and the MSG mask (docs/method.md, "Surrogate gradients" and "MSG"); the one table of
surrogates against both kernels; surrogates a user registers."""

import itertools
import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch

from msgcli import config as config_io
from msgcli.config import ConfigError, RunConfig
from msgcli.snn import LIF, build_model, kernels, surrogate
from msgcli.snn.msg import SpikeSpec
from msgcli.snn.options import MASK_MODES
from msgcli.snn.surrogate import BUILTIN, SURROGATES, arctan, piecewise_linear, rectangular, sigmoid
from tests.by_hand import DERIVATIVES, Spike
from tests.test_cuda import run_in_interpreter


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


# --- one table: torch's formula, the C kernel and the Triton kernel agree ----------------------

ALPHAS = (0.5, 2.0, 3.0)


def _points(alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """Many x = H - V_th across and beyond every support, the support's edges included."""
    x = torch.linspace(-3.0, 3.0, 1201, dtype=torch.float64) / alpha
    edges = torch.tensor([-1.0, 1.0], dtype=torch.float64) / alpha
    return torch.cat([x, edges, edges * (1 - 1e-6), edges * (1 + 1e-6), torch.zeros(1, dtype=torch.float64)]).to(dtype)


def _kernel_derivatives(ops, name: str, alpha: float, dtype: torch.dtype):
    """dS/dV of surrogate ``name`` by ``ops.lif_backward``, at T = 1, tau = 1, V_th = 0, upstream 1: as the
    surrogate itself, and as the fill of every masked entry (p = 1) under each other surrogate."""
    x = _points(alpha, dtype).view(1, -1)
    ones = torch.ones_like(x)
    plain = ops.lif_backward(ones, x, 1.0, 0.0, SpikeSpec(name, alpha), "hard", True)
    fills = [ops.lif_backward(ones, x, 1.0, 0.0, SpikeSpec(other.name, alpha, 1.0, "element", name), "hard", True)
             for other in BUILTIN]
    return x, plain, fills


def check_kernels_compute_the_tables_formulas(ops, dtype, tolerance) -> None:
    for entry, alpha in itertools.product(BUILTIN, ALPHAS):
        x, plain, fills = _kernel_derivatives(ops, entry.name, alpha, dtype)
        expected = entry(x, alpha)  # the table's torch formula, in the kernels' dtype
        assert plain.dtype == dtype
        torch.testing.assert_close(plain, expected, rtol=tolerance, atol=tolerance, msg=f"{entry.name} alpha={alpha}")
        for other, fill in zip(BUILTIN, fills):
            torch.testing.assert_close(fill, expected, rtol=tolerance, atol=tolerance,
                                       msg=f"{entry.name} as the fill of {other.name}, alpha={alpha}")


def triton_only():
    from tests.test_cuda import triton_only

    return triton_only()


def check_triton_kernels_compute_the_tables_formulas() -> None:
    check_kernels_compute_the_tables_formulas(triton_only(), torch.float32, 1e-6)


def test_the_kernel_ids_number_the_built_in_surrogates_from_zero():
    assert [s.kernel_id for s in BUILTIN] == list(range(len(BUILTIN)))
    assert [s.name for s in BUILTIN] == list(SURROGATES)[: len(BUILTIN)]


def test_the_c_kernels_compute_the_tables_formulas():
    if kernels.C_KERNELS.get() is None:
        pytest.skip("no C kernels here (no compiler): tests/test_cpu_kernels.py says why")
    check_kernels_compute_the_tables_formulas(kernels.CPU, torch.float64, 1e-12)
    check_kernels_compute_the_tables_formulas(kernels.CPU, torch.float32, 1e-6)


def test_the_triton_kernels_compute_the_tables_formulas():
    """Under Triton's CPU interpreter (float32): a surrogate whose kernel line is missing or misnumbered fails."""
    run_in_interpreter("from tests.test_surrogate import check_triton_kernels_compute_the_tables_formulas; "
                       "check_triton_kernels_compute_the_tables_formulas()")


# --- surrogates a user registers --------------------------------------------------------------


def laplace(x, alpha):
    """A surrogate the kernels do not know: alpha/2 exp(-alpha |x|), written as a user would."""
    return alpha / 2 * torch.exp(-alpha * x.abs())


@pytest.fixture
def registered(monkeypatch):
    """``laplace`` registered for this test only (the table and the notes of what was said are restored)."""
    monkeypatch.setattr(surrogate, "SURROGATES", dict(surrogate.SURROGATES))
    monkeypatch.setattr(surrogate, "_ON_TORCH_NOTED", set())
    surrogate.register_surrogate("laplace", laplace)
    return "laplace"


BY_HAND = {**DERIVATIVES, "laplace": laplace}  # the formulas the tests below use, and the one registered


def _by_hand(current, spec, tau=2.0, v_th=0.5):
    """The LIF by hand with autograd, hard reset through S: the yardstick, drawing the mask as torch.rand per step."""
    v = torch.zeros_like(current[0])
    out = []
    for t in range(current.shape[0]):
        v = v + (current[t] - v) / tau
        s = Spike.apply(v - v_th, spec, BY_HAND)
        v = v * (1 - s)
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("mask_mode", MASK_MODES)
@pytest.mark.parametrize("surrogate_name, fill", [("laplace", "zero"), ("laplace", "sigmoid"), ("arctan", "laplace"),
                                                  ("laplace", "laplace")])
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_a_registered_surrogate_gives_the_gradient_of_autograd_under_every_mask(registered, mask_mode, surrogate_name,
                                                                                fill, backend):
    """Same seed, same mask: the layer's gradient equals autograd's through the user's formula, with MSG on,
    the registered surrogate as the surrogate, as the fill, or both."""
    spec = SpikeSpec(surrogate=surrogate_name, alpha=2.0, mask_p=0.5, mask_mode=mask_mode, mask_fill=fill)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 3, 4, 3, 3, generator=g, dtype=torch.float64) * 0.8 + 0.4)
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    grads = []
    for layer in (LIF(surrogate=spec.surrogate, mask_p=0.5, mask_mode=mask_mode, mask_fill=spec.mask_fill,
                      backend=backend), lambda v: _by_hand(v, spec)):
        current = x.clone().requires_grad_()
        torch.manual_seed(7)
        layer(current).backward(up)
        grads.append(current.grad)
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("role", ["surrogate", "fill"])
def test_the_torch_operators_that_run_a_registered_surrogate_say_so_once(registered, role, caplog):
    lif = LIF(surrogate=registered if role == "surrogate" else "arctan", mask_p=0.5,
              mask_fill=registered if role == "fill" else "zero")
    caplog.set_level(logging.INFO, logger="msgcli")
    for _ in range(3):
        lif(torch.randn(4, 2, 6, requires_grad=True)).sum().backward()
    said = [r for r in caplog.records if registered in r.getMessage()]
    if kernels.CPU.fused_kernels() is None:
        assert not said  # no fused kernels here: nothing falls back
    else:
        assert len(said) == 1 and said[0].levelno == logging.INFO and "torch operators" in said[0].getMessage()


def test_a_network_with_a_registered_surrogate_trains(registered):
    torch.manual_seed(0)
    model = build_model("vggsnn_tiny", in_channels=2, num_classes=4, T=3, input_size=16, surrogate=registered, mask_p=0.5,
                        mask_mode="channel", mask_fill=registered)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.rand(8, 3, 2, 16, 16), torch.arange(8) % 4
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).mean(0), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and min(losses[-3:]) < losses[0]


def test_the_config_takes_a_registered_name_and_still_refuses_an_unknown_one(registered):
    cfg = config_io.apply_overrides(RunConfig(), {"model.neuron.surrogate": registered, "model.neuron.mask_fill": registered})
    assert (cfg.model.neuron.surrogate, cfg.model.neuron.mask_fill) == (registered, registered)
    assert config_io.from_dict(config_io.to_dict(cfg)).model.neuron.surrogate == registered  # a saved config.yaml
    with pytest.raises(ConfigError, match=r"model\.neuron\.surrogate: 'laplac' is not allowed; choose one of "
                                          r"piecewise_linear.*laplace.*did you mean 'laplace'"):
        config_io.apply_overrides(RunConfig(), {"model.neuron.surrogate": "laplac"})
    with pytest.raises(ConfigError, match=r"model\.neuron\.mask_fill: 'ziro' is not allowed.*did you mean 'zero'"):
        config_io.apply_overrides(RunConfig(), {"model.neuron.mask_fill": "ziro"})


def test_an_unregistered_name_is_refused_by_the_config():
    with pytest.raises(ConfigError, match=r"model\.neuron\.surrogate: 'laplace' is not allowed"):
        config_io.apply_overrides(RunConfig(), {"model.neuron.surrogate": "laplace"})


def test_registering_a_name_twice_warns_and_the_second_replaces_the_first(registered):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        surrogate.register_surrogate(registered, laplace)  # the same function again: nothing to say
    with pytest.warns(RuntimeWarning, match="'laplace' was already registered"):
        surrogate.register_surrogate(registered, arctan)
    assert SpikeSpec(registered).derivative is not None and surrogate.get_surrogate(registered).derivative is arctan
    with pytest.warns(RuntimeWarning, match="'sigmoid' was already registered"):
        surrogate.register_surrogate("sigmoid", laplace)
    assert surrogate.get_surrogate("sigmoid").kernel_id is None  # a user's formula: torch operators run it


@pytest.mark.parametrize("name, fn", [("zero", laplace), ("", laplace), (3, laplace), ("ok", "not a function")])
def test_a_bad_registration_is_refused(name, fn):
    with pytest.raises(ValueError, match="register_surrogate"):
        surrogate.register_surrogate(name, fn)


def test_register_surrogate_is_public_and_needs_no_torch():
    code = ("import sys, msgcli; from msgcli.snn import register_surrogate as a; "
            "assert msgcli.register_surrogate is a; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
