"""The fallback: jvp exact, finite differences within their stated bound, "auto" on kernels without forward AD."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from diffin_lightning.dots import functional_dots, functional_squared_norms
from diffin_lightning.dots import functional as functional_module


class CausalAttention(nn.Module):
    """Raw-parameter attention through SDPA (on CPU its flash kernel: no forward-mode AD)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(3 * width, width) / width**0.5)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        q, k, v = (x @ self.qkv.T).chunk(3, -1)
        batch, length, width = q.shape
        q, k, v = (t.view(batch, length, 2, width // 2).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, width)
        return self.head(out.mean(1))


def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def _setup(make, shape, dtype=torch.float64):
    torch.manual_seed(0)
    model = make().to(dtype)
    x, y = torch.randn(shape, dtype=dtype), torch.randint(0, 3, (shape[0],))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_vector(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")

    rows = []
    for i in range(shape[0]):
        gradients = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
        rows.append(torch.cat([g.flatten() for g in gradients]))
    generator = torch.Generator().manual_seed(1)
    directions = [{n: torch.randn(p.shape, generator=generator, dtype=dtype) for n, p in params.items()} for _ in range(3)]
    return model, params, loss_vector, torch.stack(rows), directions, x, y


def _expected(flat, directions, names, keep):
    return torch.stack([flat @ torch.cat([d[n].flatten() if n in keep else torch.zeros_like(d[n]).flatten() for n in names]) for d in directions])


def test_jvp_is_exact_and_restricted_to_only():
    model, params, loss_vector, flat, directions, x, y = _setup(_mlp, (7, 6))
    names = list(params)
    only = ["2.weight", "4.bias"]
    torch.testing.assert_close(functional_dots(loss_vector, params, directions, only=only, method="jvp"), _expected(flat, directions, names, only), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(functional_dots(loss_vector, params, directions, method="jvp"), _expected(flat, directions, names, names), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make,shape", [(_mlp, (7, 6)), (CausalAttention, (6, 5, 8))], ids=["mlp", "sdpa"])
def test_finite_difference_error_bound(make, shape):
    """The docstring's bound: float64 within 1e-8, float32 within 5e-4, of max_i |<v, G_i>| (measured ~1e-10 and ~5e-5)."""
    model, params, loss_vector, flat, directions, x, y = _setup(make, shape)
    names = list(params)
    exact = _expected(flat, directions, names, names)
    scale = exact.abs().max()
    approximate = functional_dots(loss_vector, params, directions, method="finite_difference")
    assert (approximate - exact).abs().max() <= 1e-8 * scale
    single = make()
    single.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x32 = {n: p.detach() for n, p in single.named_parameters()}
    approximate32 = functional_dots(
        lambda p: F.cross_entropy(functional_call(single, p, (x.float(),)), y, reduction="none"),
        x32,
        [{n: v.float() for n, v in d.items()} for d in directions],
        method="finite_difference",
    )
    assert (approximate32.double() - exact).abs().max() <= 5e-4 * scale


def test_auto_falls_back_once_with_one_message_and_jvp_raises(caplog):
    model, params, loss_vector, flat, directions, x, y = _setup(CausalAttention, (6, 5, 8))
    names = list(params)
    with pytest.raises((NotImplementedError, RuntimeError), match="forward AD"):
        functional_dots(loss_vector, params, directions, only=["qkv"], method="jvp")
    functional_module._ANNOUNCED.clear()
    with caplog.at_level(logging.INFO, logger="diffin_lightning.dots"):
        first = functional_dots(loss_vector, params, directions, only=["qkv"])
        functional_dots(loss_vector, params, directions, only=["qkv"])
    messages = [r.getMessage() for r in caplog.records if "finite differences" in r.getMessage()]
    assert len(messages) == 1 and "<root>" in messages[0] and "flash" in messages[0]
    expected = _expected(flat, directions, names, ["qkv"])
    assert (first - expected).abs().max() <= 1e-8 * expected.abs().max()


def test_zero_direction_and_argument_errors():
    _, params, loss_vector, _, directions, _, _ = _setup(_mlp, (4, 6))
    zero = {n: torch.zeros_like(p) for n, p in params.items()}
    assert torch.equal(functional_dots(loss_vector, params, [zero], method="finite_difference"), torch.zeros(1, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="`method` must be one of"):
        functional_dots(loss_vector, params, directions, method="forward")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`only` must name entries of `params`"):
        functional_dots(loss_vector, params, directions, only=["missing"])
    with pytest.raises(ValueError, match="at least one parameter"):
        functional_dots(loss_vector, params, directions, only=[])


@pytest.mark.parametrize("make,shape", [(_mlp, (5, 6)), (CausalAttention, (4, 5, 8))], ids=["mlp-vmap", "sdpa"])
def test_squared_norms(make, shape):
    model, params, _, flat, _, x, y = _setup(make, shape)
    norms = functional_squared_norms(lambda p, b: F.cross_entropy(functional_call(model, p, (b["x"],)), b["y"], reduction="none"), params, {"x": x, "y": y})
    torch.testing.assert_close(norms, flat.pow(2).sum(1), rtol=1e-10, atol=1e-12)
    names = list(params)
    only = names[:1]
    sizes = [params[n].numel() for n in names]
    restricted = functional_squared_norms(lambda p, b: F.cross_entropy(functional_call(model, p, (b["x"],)), b["y"], reduction="none"), params, {"x": x, "y": y}, only=only)
    torch.testing.assert_close(restricted, flat[:, : sizes[0]].pow(2).sum(1), rtol=1e-10, atol=1e-12)
