"""The leave-one-out harness is right: replays match the real run, exact SGD-influence matches retrained truth."""

from __future__ import annotations

import torch

from benchmarks.harness import (
    TrajectoryRecorder,
    exact_sgd_influence,
    functional_cross_entropy,
    leave_one_out_truth,
    mean_target_loss,
    parameters_close,
    replay_sgd,
)
from helpers import TinyClassifier, TinyData, trainer


def _run(tmp_path, tiny_data, lr, epochs):
    model = TinyClassifier(lr=lr).double()
    recorder = TrajectoryRecorder()
    trainer(default_root_dir=tmp_path, max_epochs=epochs, callbacks=[recorder]).fit(model, tiny_data.loader())
    return model, recorder


def test_replay_of_the_full_weights_reproduces_the_lightning_run(tmp_path, tiny_data):
    model, recorder = _run(tmp_path, tiny_data, lr=0.3, epochs=3)
    x, y = tiny_data.train.tensors
    final = replay_sgd(functional_cross_entropy(model), recorder.steps, x, y, torch.ones(2, len(y), dtype=torch.float64))
    assert parameters_close({k: v[0] for k, v in final.items()}, recorder.final, rtol=1e-10)
    assert parameters_close({k: v[1] for k, v in final.items()}, recorder.final, rtol=1e-10)


def test_zero_weight_changes_only_steps_that_held_the_sample(tmp_path, tiny_data):
    model, recorder = _run(tmp_path, tiny_data, lr=0.3, epochs=1)
    x, y = tiny_data.train.tensors
    first_batch = recorder.steps[0].ids
    outsider = next(i for i in range(len(y)) if i not in sum((s.ids for s in recorder.steps[:1]), []))
    weights = torch.ones(3, len(y), dtype=torch.float64)
    weights[1, first_batch[0]] = 0.0
    weights[2, outsider] = 0.0
    one_step = replay_sgd(functional_cross_entropy(model), recorder.steps[:1], x, y, weights)
    assert not torch.equal(one_step["net.0.weight"][1], one_step["net.0.weight"][0])
    assert torch.equal(one_step["net.0.weight"][2], one_step["net.0.weight"][0])


def test_exact_sgd_influence_matches_retrained_truth_within_2_percent(tmp_path):
    # One sample of 32 per batch and a cool learning rate: the regime where removal is nearly linear.
    data = TinyData.make(num_train=64, num_val=16, seed=0)
    model = TinyClassifier(lr=0.05).double()
    recorder = TrajectoryRecorder()
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[recorder]).fit(model, data.loader(batch_size=32))
    loss = functional_cross_entropy(model)
    train, target = data.train.tensors, data.val.tensors
    truth, full = leave_one_out_truth(loss, recorder.steps, train, target, ids=list(range(64)), chunk=40)
    assert parameters_close(full, recorder.final, rtol=1e-10)
    exact = exact_sgd_influence(loss, recorder.steps, recorder.final, train, target)
    relative = float((exact - truth).norm() / truth.norm())
    assert relative < 0.02, relative
    assert torch.corrcoef(torch.stack([exact, truth]))[0, 1] > 0.999


def test_exact_sgd_influence_is_the_derivative_of_the_replay(tmp_path, tiny_data):
    """Down-weighting by 1e-4 instead of removing: the linearisation must then be exact to rounding and O(delta)."""
    model, recorder = _run(tmp_path, tiny_data, lr=0.3, epochs=3)
    loss = functional_cross_entropy(model)
    (x, y), target = tiny_data.train.tensors, tiny_data.val.tensors
    delta = 1e-4
    weights = torch.ones(len(y) + 1, len(y), dtype=torch.float64)
    weights[torch.arange(1, len(y) + 1), torch.arange(len(y))] = 1 - delta
    losses = mean_target_loss(loss, replay_sgd(loss, recorder.steps, x, y, weights), *target)
    derivative = (losses[1:] - losses[0]) / delta
    exact = exact_sgd_influence(loss, recorder.steps, recorder.final, (x, y), target)
    assert float((exact - derivative).norm() / derivative.norm()) < 1e-3


def test_replay_of_a_dropout_run_draws_the_training_masks(tmp_path, tiny_data):
    """With dropout, the replay restores each step's RNG state: the full-weights replay is the Lightning run."""
    from test_callback_side_effects import DropoutClassifier

    model = DropoutClassifier().double()
    recorder = TrajectoryRecorder()
    torch.manual_seed(5)
    trainer(default_root_dir=tmp_path, max_epochs=2, callbacks=[recorder]).fit(model, tiny_data.loader())
    x, y = tiny_data.train.tensors
    loss = functional_cross_entropy(model, training=True)
    final = replay_sgd(loss, recorder.steps, x, y, torch.ones(2, len(y), dtype=torch.float64))
    assert parameters_close({k: v[0] for k, v in final.items()}, recorder.final, rtol=1e-10)
    assert parameters_close({k: v[1] for k, v in final.items()}, recorder.final, rtol=1e-10)


def test_the_paired_bootstrap_of_a_spearman_difference():
    """The interval holds the difference, is a point for identical scores, and narrows with more ids."""
    from benchmarks.harness import paired_spearman_difference
    from torchmetrics.functional import spearman_corrcoef

    generator = torch.Generator().manual_seed(0)
    truth = torch.randn(400, generator=generator, dtype=torch.float64)
    good = truth + 0.5 * torch.randn(400, generator=generator, dtype=torch.float64)
    worse = truth + 1.0 * torch.randn(400, generator=generator, dtype=torch.float64)
    assert paired_spearman_difference(good, good, truth, resamples=200) == (0.0, 0.0, 0.0)
    difference, low, high = paired_spearman_difference(worse, good, truth, resamples=500)
    expected = float(spearman_corrcoef(worse, truth) - spearman_corrcoef(good, truth))
    assert abs(difference - expected) < 1e-12 and low < difference < high and high < 0  # clearly worse, and resolved
    _, low_few, high_few = paired_spearman_difference(worse[:50], good[:50], truth[:50], resamples=500)
    assert high_few - low_few > high - low  # 50 ids resolve less than 400
