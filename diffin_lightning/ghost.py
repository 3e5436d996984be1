"""Per-sample dot products from one backward pass: "ghost" dot products for Linear layers.

For a Linear layer with input ``a_i`` and output gradient ``delta_i`` (of sample i's own
loss), sample i's weight gradient is ``sum_positions delta_i a_i^T``, so for any direction
``V`` (same shape as the weight)

    <V, G_i> = sum_positions delta_i^T V a_i          (bias: sum_positions <v_b, delta_i>)
    |G_i|^2  = sum_{s,t} (delta_s . delta_t) (a_s . a_t)   (bias: |sum_positions delta_i|^2)

without ever forming ``G_i``. One forward and backward of the summed per-sample losses
yields the batch gradient and, through module hooks, every ``a_i`` and ``delta_i``; after
that each extra direction costs a few matrix products instead of a forward-mode pass.
Models with trainable parameters outside Linear layers use the ``torch.func`` path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]


@dataclass
class LayerUse:
    """One call of a Linear layer in the forward pass: its input and its output's gradient."""

    weight: str
    bias: str | None
    inputs: Tensor
    output_gradients: Tensor | None = None


@dataclass
class GhostCapture:
    """What one backward pass left behind for per-sample dot products."""

    uses: list[LayerUse] = field(default_factory=list)

    def dots(self, direction: Params) -> Tensor:
        """``[<direction, G_i>]_i`` for the captured batch."""
        total: Tensor | None = None
        for use in self.uses:
            assert use.output_gradients is not None, "backward did not reach a captured layer"
            delta = use.output_gradients.flatten(1, -2) if use.output_gradients.dim() > 2 else use.output_gradients.unsqueeze(1)
            inputs = use.inputs.flatten(1, -2) if use.inputs.dim() > 2 else use.inputs.unsqueeze(1)
            part = ((delta @ direction[use.weight]) * inputs).sum(dim=(1, 2))
            if use.bias is not None:
                part = part + (delta * direction[use.bias]).sum(dim=(1, 2))
            total = part if total is None else total + part
        assert total is not None
        return total

    def squared_norms(self) -> Tensor:
        """``[|G_i|^2]_i``, the layers' contributions summed (a layer used twice counts as one gradient)."""
        by_parameter: dict[str, list[LayerUse]] = {}
        for use in self.uses:
            by_parameter.setdefault(use.weight, []).append(use)
        total: Tensor | None = None
        for uses in by_parameter.values():
            deltas = torch.cat([_positions(u.output_gradients) for u in uses], dim=1)
            inputs = torch.cat([_positions(u.inputs) for u in uses], dim=1)
            part = ((deltas @ deltas.transpose(1, 2)) * (inputs @ inputs.transpose(1, 2))).sum(dim=(1, 2))
            if uses[0].bias is not None:
                part = part + deltas.sum(dim=1).pow(2).sum(dim=1)
            total = part if total is None else total + part
        assert total is not None
        return total


def _positions(tensor: Tensor | None) -> Tensor:
    assert tensor is not None
    return tensor.flatten(1, -2) if tensor.dim() > 2 else tensor.unsqueeze(1)


def linear_owners(module: nn.Module) -> dict[str, nn.Linear]:
    """Parameter name -> the Linear layer it belongs to, for every Linear in ``module``."""
    owners: dict[str, nn.Linear] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            prefix = f"{name}." if name else ""
            owners[f"{prefix}weight"] = layer
            if layer.bias is not None:
                owners[f"{prefix}bias"] = layer
    return owners


def supports(module: nn.Module, parameter_names: list[str]) -> bool:
    """Whether every trainable parameter belongs to a Linear layer (the ghost path then covers them all)."""
    owners = linear_owners(module)
    return bool(parameter_names) and all(name in owners for name in parameter_names)


def gradient_with_capture(
    module: nn.Module, losses_at: Callable[[Params], Tensor], params: Params
) -> tuple[Params, Tensor, GhostCapture]:
    """``(grad sum_i l_i, losses, capture)`` at ``params`` from one forward and backward.

    ``losses_at(params)`` evaluates the per-sample losses with ``params`` swapped into ``module``.
    """
    names = {id(layer): name for name, layer in module.named_modules() if isinstance(layer, nn.Linear)}
    capture = GhostCapture()
    handles = []

    def remember(layer: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        name = names[id(layer)]
        prefix = f"{name}." if name else ""
        use = LayerUse(
            weight=f"{prefix}weight",
            bias=f"{prefix}bias" if getattr(layer, "bias", None) is not None else None,
            inputs=inputs[0].detach(),
        )
        capture.uses.append(use)
        if output.requires_grad:
            output.register_hook(lambda gradient, use=use: setattr(use, "output_gradients", gradient.detach()))

    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            handles.append(layer.register_forward_hook(remember))
    try:
        leaves = {name: value.detach().requires_grad_(True) for name, value in params.items()}
        with torch.enable_grad():
            losses = losses_at(leaves)
            gradients = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    capture.uses = [use for use in capture.uses if use.weight in params]
    for use in capture.uses:
        if use.bias is not None and use.bias not in params:
            use.bias = None  # a frozen bias is a constant, not a variable
    summed = {
        name: torch.zeros_like(value) if gradient is None else gradient
        for (name, value), gradient in zip(params.items(), gradients)
    }
    return summed, losses.detach(), capture
