"""Ghost dot products (captured activations) equal the torch.func ones, in every layer arrangement they accept."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffin_lightning import ghost
from diffin_lightning.per_sample import PerSampleLoss


class Sequence2Class(nn.Module):
    """Linear layers applied per position (3-d activations) and one layer used twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 4, bias=False)

    def forward(self, x):
        h = torch.tanh(self.embed(x))  # [B, T, 5]
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(h.mean(1))


def _compare(model, batch, loss_fn):
    model = model.double()
    fast = PerSampleLoss(model, loss_fn, seed=0)
    slow = PerSampleLoss(model, loss_fn, seed=0, engine="functional")
    params = fast.parameters()
    assert fast.uses_ghost(params) and not slow.uses_ghost(params)
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    fast_gradient = fast.batch_gradient(params, [batch], keep_captures=True)
    slow_gradient = slow.batch_gradient(params, [batch])
    for name in params:
        torch.testing.assert_close(fast_gradient[name], slow_gradient[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.dots(params, [batch], direction), slow.dots(params, [batch], direction), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        fast.squared_gradient_norms(params, [batch], None), slow.squared_gradient_norms(params, [batch], None), rtol=1e-10, atol=1e-12
    )
    fast.clear_captures()
    # Without captures the ghost engine falls back to jvp for dots and captures afresh for norms.
    torch.testing.assert_close(fast.dots(params, [batch], direction), slow.dots(params, [batch], direction), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        fast.squared_gradient_norms(params, [batch], None), slow.squared_gradient_norms(params, [batch], None), rtol=1e-10, atol=1e-12
    )


def test_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    batch = {"x": torch.randn(7, 4, dtype=torch.float64), "y": torch.randint(0, 3, (7,))}
    _compare(model, batch, lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"))


def test_positions_and_shared_layers():
    torch.manual_seed(0)
    batch = {"x": torch.randn(6, 4, 3, dtype=torch.float64), "y": torch.randint(0, 4, (6,))}
    _compare(Sequence2Class(), batch, lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"))


def test_frozen_layers_are_constants():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    batch = {"x": torch.randn(5, 4, dtype=torch.float64), "y": torch.randint(0, 3, (5,))}
    _compare(model, batch, lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"))


def test_other_layers_use_torch_func():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    names = [n for n, p in conv.named_parameters() if p.requires_grad]
    assert not ghost.supports(conv, names)
    assert ghost.supports(nn.Linear(2, 2), ["weight", "bias"])
