"""Batched per-sample primitives equal per-sample loops; evaluation never touches the module."""

from __future__ import annotations

import torch
from torch import nn

from diffin_lightning.per_sample import PerSampleLoss
from helpers import RTOL, TinyClassifier, leaf_params, sample_gradients


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def test_primitives_equal_per_sample_loops(tiny_data):
    model = TinyClassifier().double()
    x, y = tiny_data.train.tensors
    batches = [{"input": x[:5], "target": y[:5]}, {"input": x[5:9], "target": y[5:9]}]
    loss = PerSampleLoss(model, lambda m, b: m.per_sample_loss(b))
    params = loss.parameters()
    grads = torch.stack(sample_gradients(model, leaf_params(params), x[:9], y[:9]))
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    torch.testing.assert_close(_flat(loss.batch_gradient(params, batches, 9)), grads.mean(0), rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(loss.dots(params, batches, direction), grads @ _flat(direction), rtol=RTOL, atol=1e-12)
    torch.testing.assert_close(loss.squared_gradient_norms(params, batches, chunk_size=2), (grads**2).sum(1), rtol=RTOL, atol=1e-12)


def test_perturbed_evaluation_leaves_module_and_buffers_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = PerSampleLoss(model, lambda m, b: m(b).pow(2).sum(1))
    params = loss.parameters()
    shifted = {k: v + 1.0 for k, v in params.items()}
    loss.batch_gradient(shifted, [torch.randn(8, 3, dtype=torch.float64)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fixed_seed_gives_the_same_dropout_masks():
    model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double().train()
    loss = PerSampleLoss(model, lambda m, b: m(b).squeeze(1), seed=7)
    batch = torch.randn(10, 3, dtype=torch.float64)
    params = loss.parameters()
    torch.testing.assert_close(loss.values(params, batch), loss.values(params, batch), rtol=0, atol=0)
    loss.seed = 8
    assert not torch.equal(loss.values(params, batch), PerSampleLoss(model, loss._wrapper._loss_fn, seed=7).values(params, batch))
