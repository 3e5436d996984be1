"""target_extrapolation's g_V, step by step, against gradients taken afresh (float64), and what it holds."""

from __future__ import annotations

import torch

from diffin_lightning.engine import gradient_of_mean
from diffin_lightning.per_sample import PerSampleLoss
from diffin_lightning.targets import DatasetTarget
from helpers import TinyClassifier


def _as_batches(data):
    x, y = data.tensors
    return [{"input": x, "target": y}]


def test_the_extrapolated_gradient_is_formed_in_place_and_the_slope_comes_from_the_refreshed_gradients(tiny_data):
    """Refreshes at steps 0, 3, 6 (and the parameters moved between them); steps 4 and 5 in between.

    Between refreshes g_V is g(3) + (t - 3) (g(3) - g(0)) / 3, one object from step to step (the product stream
    knows a step's directions by identity), formed in the gradient's own memory: the target holds the gradient
    and the slope, no third vector. At the refresh at 6 the slope is (g(6) - g(3)) / 3 with g(3) the refreshed
    gradient (recovered from the extrapolated one), not the extrapolated g(5).
    """
    torch.manual_seed(0)
    model = TinyClassifier().double()
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    target = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate=True)
    device = torch.device("cpu")
    fresh = {}

    def at(step):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=p.dtype) + step).reshape(p.shape))
        params = loss.parameters()
        fresh[step] = {k: v.clone() for k, v in gradient_of_mean(loss, params, _as_batches(tiny_data.val)).items()}
        return target.target_gradient(loss, params, step, device, {})

    at(0)
    refreshed = at(3)
    assert target.slope is not None
    slope = {k: (fresh[3][k] - fresh[0][k]) / 3 for k in fresh[3]}
    for k in slope:
        torch.testing.assert_close(target.slope[k], slope[k], rtol=1e-12, atol=1e-14)
    fourth, fifth = at(4), at(5)
    assert fourth is fifth is refreshed  # one object: the refreshed gradient's own memory, extrapolated in place
    for k in slope:
        torch.testing.assert_close(fifth[k], fresh[3][k] + 2 * slope[k], rtol=1e-12, atol=1e-14)
    assert target.extrapolated_to == 5
    held = {id(v) for v in [*target.gradient.values(), *target.slope.values()]}
    assert len(held) == 2 * len(slope)  # the gradient and the slope, nothing else parameter-sized
    at(6)
    for k in slope:
        torch.testing.assert_close(target.gradient[k], fresh[6][k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(target.slope[k], (fresh[6][k] - fresh[3][k]) / 3, rtol=1e-10, atol=1e-13)
    assert target.extrapolated_to is None


def test_the_extrapolated_step_travels_in_the_state(tiny_data):
    """A checkpoint taken after an extrapolated step restores the gradient as it stands and the step it stands for."""
    torch.manual_seed(0)
    model = TinyClassifier().double()
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    device = torch.device("cpu")
    original = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate=True)
    for step in (0, 3, 4):
        with torch.no_grad():
            next(model.parameters()).add_(0.01 * (step + 1))
        original.target_gradient(loss, loss.parameters(), step, device, {})
    restored = DatasetTarget("val", tiny_data.val, batch_size=7, refresh_every_n_steps=3, extrapolate=True)
    restored.load_state_dict(original.state_dict(), device)
    assert restored.extrapolated_to == 4
    params = loss.parameters()
    expected, got = (t.target_gradient(loss, params, 5, device, {}) for t in (original, restored))
    for k in expected:
        assert torch.equal(expected[k], got[k])
    older = {k: v for k, v in original.state_dict().items() if k != "extrapolated_to"}  # a checkpoint from before the key
    restored.load_state_dict(older, device)
    assert restored.extrapolated_to is None
