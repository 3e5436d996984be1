"""The accumulator's declared states and their updates, against a hand-written float64 reference."""

from __future__ import annotations

import torch

from diffin_lightning.accumulator import InfluenceAccumulator
from diffin_lightning.step import Contribution, propagation_factor


def test_add_and_propagate_match_the_recurrence():
    n, cpu = 6, torch.device("cpu")
    acc = InfluenceAccumulator(["val"], n, cpu, torch.float64)
    assert {name for name, spec in acc.declared.items() if spec.update == "propagate"} == {"decayed_first", "decayed_weight"}
    assert all(spec.reduce == "sum" for spec in acc.declared.values())
    g = torch.Generator().manual_seed(0)
    expected = {key: torch.zeros(n, dtype=torch.float64) for key in acc.declared}
    target_sum = torch.zeros(3, dtype=torch.float64)
    for step, ids in enumerate([[0, 2], [1, 2, 5], [4]]):
        ids = torch.tensor(ids)
        first, second = torch.randn(len(ids), generator=g, dtype=torch.float64), torch.randn(len(ids), generator=g, dtype=torch.float64)
        factor = torch.tensor(0.5 + 0.1 * step, dtype=torch.float64)
        gradient = {"w": torch.randn(3, generator=g, dtype=torch.float64)}
        eta, weight = 0.1 * (step + 1), 2.0
        acc.add("val", ids, Contribution(first, second, factor, gradient), weight, eta, len(ids))
        expected["first_order"][ids] += weight * first
        expected["second_order_sum"][ids] += weight * second
        expected["visits"][ids] += 1
        expected["decayed_first"] = factor * expected["decayed_first"]
        expected["decayed_first"][ids] += weight * first
        expected["decayed_weight"] = factor * expected["decayed_weight"]
        expected["decayed_weight"][ids] += weight * eta / len(ids)
        target_sum = factor * target_sum + weight * eta / n * gradient["w"]
    for key, value in expected.items():
        torch.testing.assert_close(acc.sums["val"][key], value, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(acc.parameter_states["val"]["w"], target_sum, rtol=1e-12, atol=1e-15)


def test_nonfinite_contributions_are_skipped_and_counted_on_the_device():
    acc = InfluenceAccumulator(["s"], 4, torch.device("cpu"), torch.float64)
    first = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    acc.add("s", torch.tensor([0, 1, 3]), Contribution(first, torch.zeros(3, dtype=torch.float64)), 1.0, 0.1, 3)
    assert isinstance(acc.nonfinite, torch.Tensor) and int(acc.nonfinite) == 1
    assert acc.sums["s"]["visits"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert acc.sums["s"]["first_order"].tolist() == [1.0, 0.0, 0.0, 2.0]


def test_a_nonfinite_factor_carries_everything_unchanged():
    acc = InfluenceAccumulator(["v"], 3, torch.device("cpu"), torch.float64)
    gradient = {"w": torch.ones(2, dtype=torch.float64)}
    one = torch.ones(1, dtype=torch.float64)
    acc.add("v", torch.tensor([0]), Contribution(one, 0 * one, torch.tensor(0.5, dtype=torch.float64), gradient), 1.0, 1.0, 1)
    before = {k: v.clone() for k, v in acc.sums["v"].items()}
    acc.add("v", torch.tensor([1]), Contribution(one, 0 * one, torch.tensor(float("nan"), dtype=torch.float64), gradient), 1.0, 1.0, 1)
    for key, value in before.items():  # every state, sample 1's finite contribution included: nothing added, nothing scaled
        torch.testing.assert_close(acc.sums["v"][key], value, rtol=0, atol=0)
    torch.testing.assert_close(acc.parameter_states["v"]["w"], gradient["w"] / 3)
    # One factor step counted; not skipped samples, not a gated step.
    assert int(acc.nonfinite_factor_steps["v"]) == 1 and int(acc.nonfinite) == 0 and int(acc.nonfinite_gated_steps["v"]) == 0
    assert propagation_factor(0.1, torch.tensor(-3.0), 2) == 1.0  # the tensor form clamps like the float form


def test_a_gated_step_adds_nothing_and_is_counted_once():
    """``step_usable`` False (a step-level quantity non-finite, found on the device): nothing added, the factor
    not applied, one gated step counted (not a factor step, not skipped samples), and the count survives a checkpoint."""
    acc = InfluenceAccumulator(["v", "s"], 3, torch.device("cpu"), torch.float64)
    gradient = {"w": torch.ones(2, dtype=torch.float64)}
    one = torch.ones(1, dtype=torch.float64)
    acc.add("v", torch.tensor([0]), Contribution(one, 0 * one, torch.tensor(0.5, dtype=torch.float64), gradient), 1.0, 1.0, 1)
    before = {k: v.clone() for k, v in acc.sums["v"].items()}
    nan = torch.full((1,), float("nan"), dtype=torch.float64)
    no = torch.tensor(False)
    acc.add("v", torch.tensor([1]), Contribution(nan, nan, torch.tensor(float("nan"), dtype=torch.float64), gradient), 1.0, 1.0, 1, step_usable=no)
    acc.add("s", torch.tensor([1]), Contribution(nan, 0 * one), 1.0, 1.0, 1, step_usable=no)
    for key, value in before.items():
        torch.testing.assert_close(acc.sums["v"][key], value)
    torch.testing.assert_close(acc.parameter_states["v"]["w"], gradient["w"] / 3)
    assert acc.sums["s"]["visits"].tolist() == [0.0, 0.0, 0.0]
    assert {n: int(c) for n, c in acc.nonfinite_gated_steps.items()} == {"v": 1, "s": 1}
    assert int(acc.nonfinite_factor_steps["v"]) == 0 and int(acc.nonfinite) == 0
    # A usable step through the same path adds as an ungated one does.
    acc.add("s", torch.tensor([2]), Contribution(2 * one, 0 * one), 1.0, 1.0, 1, step_usable=torch.tensor(True))
    assert acc.sums["s"]["first_order"].tolist() == [0.0, 0.0, 2.0]
    restored = InfluenceAccumulator(["v", "s"], 3, torch.device("cpu"), torch.float64)
    restored.load_state_dict(acc.state_dict())
    assert {n: int(c) for n, c in restored.nonfinite_gated_steps.items()} == {"v": 1, "s": 1}


def test_a_state_declared_with_its_rule_is_updated_reduced_and_carried_with_no_other_change():
    """add() updates every state from its declaration (it once named each state itself: a new one was never updated)."""
    import pytest

    n, cpu = 5, torch.device("cpu")
    acc = InfluenceAccumulator(["val", "self"], n, cpu, torch.float64)
    acc.add_state("second_order_decayed", "propagate", "second-order sum carried by the factors", lambda v: v.second * v.keep)
    acc.add_state("squared_first", "add", "sum of squared first-order terms", lambda v: v.first**2)
    gradient = {"w": torch.ones(2, dtype=torch.float64)}
    expected_decayed, expected_squares = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for step, ids in enumerate([[0, 3], [1, 3], [4]]):
        ids = torch.tensor(ids)
        first, second = torch.full((len(ids),), 0.5 + step, dtype=torch.float64), torch.full((len(ids),), 2.0 - step, dtype=torch.float64)
        factor = torch.tensor(0.8, dtype=torch.float64)
        acc.add("val", ids, Contribution(first, second, factor, gradient), 1.0, 0.1, len(ids))
        acc.add("self", ids, Contribution(first, second), 1.0, 0.1, len(ids))  # no factor: propagated states untouched
        expected_decayed = 0.8 * expected_decayed
        expected_decayed[ids] += second
        expected_squares[ids] += first**2
    torch.testing.assert_close(acc.sums["val"]["second_order_decayed"], expected_decayed, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.sums["val"]["squared_first"], expected_squares, rtol=1e-12, atol=0)
    assert torch.equal(acc.sums["self"]["second_order_decayed"], torch.zeros(n, dtype=torch.float64))
    torch.testing.assert_close(acc.sums["self"]["squared_first"], expected_squares, rtol=1e-12, atol=0)
    assert "squared_first" in acc.reduced().sums["val"]  # one process: the copy holds the declared state too
    with pytest.raises(ValueError, match=r"add_state\('bad'\): update must be 'add' or 'propagate' and reduce 'sum'; got update='max'"):
        acc.add_state("bad", "max", "?", lambda v: v.first)  # type: ignore[arg-type]
