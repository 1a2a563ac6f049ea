"""TWO, the temporally weighted output: both update rules against numbers computed by hand."""

import pytest
import torch

from msgcli.snn import TWO


def _logits(correct, total, K=2):
    """[T, total, K] logits and targets (all class 0) where timestep t is right for the first correct[t] samples."""
    T = len(correct)
    logits = torch.zeros(T, total, K)
    for t, n in enumerate(correct):
        logits[t, :n, 0] = 1.0
        logits[t, n:, 1] = 1.0
    return logits, torch.zeros(total, dtype=torch.long)


def _epoch(two, correct, total=100, batches=2):
    """Observe one epoch in `batches` equal batches."""
    logits, targets = _logits(correct, total)
    for chunk_l, chunk_t in zip(logits.chunk(batches, dim=1), targets.chunk(batches)):
        two.observe(chunk_l, chunk_t)


def test_observe_counts_per_timestep():
    two = TWO(3)
    _epoch(two, [50, 80, 90])
    assert two.correct.tolist() == [50, 80, 90]
    assert two.seen.item() == 100
    torch.testing.assert_close(two.timestep_accuracy(), torch.tensor([0.5, 0.8, 0.9], dtype=torch.float64))


def test_release_rule_warmup_then_hand_numbers():
    two = TWO(3, rule="release")
    # Epochs 0..4: end_epoch(e) sets the factors for epoch e + 1 <= 5, still the warm-up.
    for epoch in range(5):
        _epoch(two, [10, 60, 90])
        two.end_epoch(epoch)
        assert two.factors.tolist() == [1.0, 1.0, 1.0], epoch
        assert two.correct.tolist() == [0, 0, 0] and two.seen.item() == 0  # cleared every epoch
    # End of epoch 5 -> factors for epoch 6, the first change.
    # acc = [.5, .8, .9], mean = 2.2/3 = 0.7333..., new = acc/mean = [15/22, 24/22, 27/22]
    # a = 0.7 * 1 + 0.3 * new = [0.7 + 4.5/22, 0.7 + 7.2/22, 0.7 + 8.1/22]
    _epoch(two, [50, 80, 90])
    two.end_epoch(5)
    torch.testing.assert_close(two.factors, torch.tensor([0.9045454545, 1.0272727273, 1.0681818182]), rtol=0, atol=1e-6)
    # Epoch 6: acc = [.6, .6, .9], mean = .7, new = [6/7, 6/7, 9/7] = [0.857142857, 0.857142857, 1.285714286]
    # a = 0.7 * [0.904545455, 1.027272727, 1.068181818] + 0.3 * new
    #   = [0.633181818 + 0.257142857, 0.719090909 + 0.257142857, 0.747727273 + 0.385714286]
    _epoch(two, [60, 60, 90])
    two.end_epoch(6)
    torch.testing.assert_close(two.factors, torch.tensor([0.8903246753, 0.9762337662, 1.1334415584]), rtol=0, atol=1e-6)


def test_release_rule_all_wrong_keeps_factors_finite():
    two = TWO(2, rule="release", warmup_epochs=0)
    _epoch(two, [0, 0])
    two.end_epoch(0)
    assert torch.isfinite(two.factors).all()


def test_paper_rule_hand_numbers():
    two = TWO(2, rule="paper")
    assert two.factors.tolist() == [0.5, 0.5]  # 1/T
    # delta = [.6, .9]: f = 0.7 * 0.5 + 0.3 * delta = [0.35 + 0.18, 0.35 + 0.27]
    _epoch(two, [60, 90])
    two.end_epoch(0)  # no warm-up in the paper's rule
    torch.testing.assert_close(two.factors, torch.tensor([0.53, 0.62]), rtol=0, atol=1e-6)
    # delta = [.5, 1.0]: f = 0.7 * [0.53, 0.62] + 0.3 * delta = [0.371 + 0.15, 0.434 + 0.3]
    _epoch(two, [50, 100])
    two.end_epoch(1)
    torch.testing.assert_close(two.factors, torch.tensor([0.521, 0.734]), rtol=0, atol=1e-6)


O = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])  # [T=2, B=1, K=2]


def test_release_output_is_mean_of_weighted_timesteps():
    two = TWO(2, rule="release")
    torch.testing.assert_close(two(O), torch.tensor([[2.0, 3.0]]))  # factors 1: plain mean
    two.factors.copy_(torch.tensor([0.5, 1.5]))
    # (0.5 * [1, 2] + 1.5 * [3, 4]) / 2 = ([0.5, 1] + [4.5, 6]) / 2
    torch.testing.assert_close(two(O), torch.tensor([[2.5, 3.5]]))


def test_paper_output_is_weighted_sum():
    two = TWO(2, rule="paper")
    torch.testing.assert_close(two(O), torch.tensor([[2.0, 3.0]]))  # 0.5 * [1, 2] + 0.5 * [3, 4]
    two.factors.copy_(torch.tensor([0.53, 0.62]))
    # 0.53 * [1, 2] + 0.62 * [3, 4] = [0.53 + 1.86, 1.06 + 2.48]
    torch.testing.assert_close(two(O), torch.tensor([[2.39, 3.54]]))


@pytest.mark.parametrize("rule", ["release", "paper"])
def test_disabled_is_the_plain_mean_and_never_updates(rule):
    two = TWO(2, rule=rule, enabled=False, warmup_epochs=0)
    two.factors.copy_(torch.tensor([0.1, 5.0]))
    torch.testing.assert_close(two(O), torch.tensor([[2.0, 3.0]]))
    _epoch(two, [10, 90])
    two.end_epoch(10)
    assert two.factors.tolist() == pytest.approx([0.1, 5.0])


def test_output_is_differentiable_and_factors_are_not_parameters():
    two = TWO(2)
    assert list(two.parameters()) == []
    logits = O.clone().requires_grad_()
    two.factors.copy_(torch.tensor([0.5, 1.5]))
    two(logits).sum().backward()
    # d/dO[t] of mean_t(a_t O[t]) = a_t / T
    torch.testing.assert_close(logits.grad[:, 0, 0], torch.tensor([0.25, 0.75]))


def test_state_dict_round_trip():
    two = TWO(3, rule="release", warmup_epochs=0)
    _epoch(two, [50, 80, 90])
    two.end_epoch(0)
    _epoch(two, [20, 30, 40])  # counts in flight
    state = two.state_dict()
    assert {"factors", "correct", "seen"} <= set(state)
    fresh = TWO(3, rule="release", warmup_epochs=0)
    assert fresh.factors.tolist() == [1.0, 1.0, 1.0]
    fresh.load_state_dict(state)
    assert torch.equal(fresh.factors, two.factors)
    assert fresh.correct.tolist() == [20, 30, 40] and fresh.seen.item() == 100
    assert not torch.equal(fresh.factors, torch.ones(3))


def test_bad_arguments_raise_value_error_naming_them():
    with pytest.raises(ValueError, match="rule.*release, paper"):
        TWO(4, rule="foo")
    with pytest.raises(ValueError, match="T"):
        TWO(0)
    with pytest.raises(ValueError, match="T"):
        TWO(2.5)
    with pytest.raises(ValueError, match="momentum"):
        TWO(4, momentum=1.5)
    with pytest.raises(ValueError, match=r"T=4"):
        TWO(4)(torch.zeros(3, 2, 10))
    with pytest.raises(ValueError, match=r"\[T=4, B, K\]"):
        TWO(4)(torch.zeros(4, 10))
