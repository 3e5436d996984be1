"""The finite-difference bracket against exact Hessian-vector products: O(eps) forward, O(eps^2) central."""

from __future__ import annotations

import math

import pytest
import torch

from diffin_lightning.estimator import (
    FiniteDifferenceBracket,
    propagation_factor,
    normalize_second_order,
    resolve_eps,
)
from diffin_lightning.per_sample import PerSampleLoss
from helpers import TinyClassifier, exact_brackets, leaf_params, mean_gradient, sample_gradients


def _setup(tiny_data):
    model = TinyClassifier().double()
    x, y = tiny_data.train.tensors
    xv, yv = tiny_data.val.tensors
    batch = {"input": x[:6], "target": y[:6], "index": torch.arange(6)}
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    params = loss.parameters()
    target = mean_gradient(model, leaf_params(params), xv, yv)
    offsets = torch.cumsum(torch.tensor([0] + [p.numel() for p in params.values()]), 0)
    target_dict = {n: target[offsets[i] : offsets[i + 1]].view_as(p) for i, (n, p) in enumerate(params.items())}
    exact = exact_brackets(model, params, x[:6], y[:6], target)
    return loss, params, [batch], target_dict, exact


def _bracket(loss, params, batches, target, eps, scheme):
    """The in-run use: G_B from the batch, the bracket for the batch's own samples."""
    f_at_params = loss.dots(params, batches, loss.batch_gradient(params, batches, 6))
    return FiniteDifferenceBracket(loss, params, batches, 6, target, eps, scheme).evaluate(batches, f_at_params)


def _error(tiny_data, eps, scheme):
    loss, params, batches, target, exact = _setup(tiny_data)
    approx = _bracket(loss, params, batches, target, eps, scheme)
    return float((approx - exact).norm() / exact.norm())


@pytest.mark.parametrize(("scheme", "order"), [("forward", 1), ("central", 2)])
def test_finite_difference_error_shrinks_at_its_order(tiny_data, scheme, order):
    coarse, fine = _error(tiny_data, 1e-2, scheme), _error(tiny_data, 1e-3, scheme)
    assert coarse < 0.1
    # Error ~ C eps^order: ten times smaller eps, 10^order times smaller error (within a factor 3).
    ratio = coarse / fine
    assert 10**order / 3 < ratio < 10**order * 3, ratio


def test_automatic_eps_is_accurate_in_float64(tiny_data):
    loss, params, batches, target, exact = _setup(tiny_data)
    eps = resolve_eps(None, params)
    norm = math.sqrt(sum(float((p * p).sum()) for p in params.values()))
    assert eps == pytest.approx(math.sqrt(torch.finfo(torch.float64).eps) * max(1.0, norm))
    approx = _bracket(loss, params, batches, target, eps, "forward")
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def test_zero_target_gradient_gives_zero_bracket(tiny_data):
    loss, params, batches, target, _ = _setup(tiny_data)
    zero = {k: torch.zeros_like(v) for k, v in target.items()}
    assert torch.count_nonzero(_bracket(loss, params, batches, zero, 1e-4, "forward")) == 0


def test_normalizations_by_name():
    total = torch.tensor([4.0, -8.0])
    assert torch.equal(normalize_second_order(total, "sum", 4), total)
    assert torch.equal(normalize_second_order(total, "paper", 4), total / 4)
    with pytest.raises(ValueError, match="`normalization` must be one of"):
        normalize_second_order(total, "mean", 4)  # type: ignore[arg-type]


def test_curvature_along_the_target_matches_the_exact_hessian(tiny_data):
    loss, params, batches, target, _ = _setup(tiny_data)
    model = loss.module
    x, y = tiny_data.train.tensors
    flat_target = torch.cat([v.reshape(-1) for v in target.values()])
    u = flat_target / flat_target.norm()
    p = leaf_params(params)
    batch_gradient = torch.stack(sample_gradients(model, p, x[:6], y[:6], create_graph=True)).mean(0)
    hvp = torch.autograd.grad(batch_gradient @ u, list(p.values()))
    exact = float(torch.cat([h.reshape(-1) for h in hvp]) @ u)
    gradient = loss.batch_gradient(params, batches, 6)
    for scheme, tolerance in (("forward", 1e-3), ("central", 1e-6)):
        bracket = FiniteDifferenceBracket(loss, params, batches, 6, target, 1e-4, scheme)
        assert bracket.curvature(gradient) == pytest.approx(exact, rel=tolerance)


def test_propagation_factor_is_the_product_of_one_step_factors():
    assert propagation_factor(0.1, 2.0, 3) == pytest.approx(0.8**3)
    assert propagation_factor(0.1, 0.0, 5) == 1.0


def test_propagation_factor_is_clamped_to_the_unit_interval():
    assert propagation_factor(0.1, -3.0, 2) == 1.0  # negative curvature: treated as flat
    assert propagation_factor(1.0, 5.0, 1) == 0.0  # overshoot: nothing survives, no sign flip
