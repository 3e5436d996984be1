"""The maths of one optimizer step: each visited sample's Diff-In components.

For step ``t`` with batch ``B`` (all its micro-batches), learning rate ``eta`` and a
target gradient ``g_V`` (DESIGN.md, "The estimator"):

- first order:  ``F_t(i) = (eta/|B|) <g_V, G_i>``
- second order: ``S_t(i) = -(t eta^2/|B|) <g_V, H_B G_i + H_i G_B>``

``S_t`` is the paper's Eq. 9 term ``a_t <g_V, H_B G_i + H_i G_B>`` with
``a_t = -t eta^2/N`` times the in-run factor ``N/|B|`` (each sample's term is taken
when the sample is visited). The normalization (``"paper"``: divide the sum by the
number of steps it stands for, the ``1/m`` of Eq. 9; ``"sum"``: the all-steps sum)
is applied when scores are read, see :func:`normalize_second_order`.

The bracket is one directional derivative of ``f_i(theta) = <G_B(theta), G_i(theta)>``
along ``u = g_V/|g_V|`` (its gradient is ``H_B G_i + H_i G_B``), taken by a finite
difference: ``forward``, ``|g_V| (f_i(theta + eps u) - f_i(theta)) / eps``, error O(eps);
or ``central``, ``|g_V| (f_i(theta + eps u) - f_i(theta - eps u)) / (2 eps)``, error O(eps^2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from diffin_lightning.per_sample import Params, PerSampleLoss, add_scaled, norm

FiniteDifferenceScheme = Literal["forward", "central"]
Normalization = Literal["paper", "sum"]
NORMALIZATIONS: tuple[Normalization, ...] = ("paper", "sum")
FINITE_DIFFERENCE_SCHEMES: tuple[FiniteDifferenceScheme, ...] = ("forward", "central")


def resolve_eps(eps: float | None, params: Params) -> float:
    """The finite-difference step: ``eps`` itself, or when ``None`` ``sqrt(machine eps) * max(1, |theta|)``.

    The automatic choice balances the O(eps) truncation error against the
    O(machine eps / eps) rounding error of the difference, on the parameters' scale:
    about 3.5e-4 |theta| in float32 and 1.5e-8 |theta| in float64.
    """
    if eps is not None:
        return float(eps)
    dtype = next(iter(params.values())).dtype
    return math.sqrt(torch.finfo(dtype).eps) * max(1.0, float(norm(params)))


def batch_gradient_dots(loss: PerSampleLoss, params: Params, batches: Sequence[Any], batch_size: int) -> tuple[Params, Tensor]:
    """``(G_B, [<G_B, G_i>]_i)`` at ``params``: the batch gradient and ``f_i`` for every sample."""
    batch_gradient = loss.batch_gradient(params, batches, batch_size)
    return batch_gradient, loss.dots(params, batches, batch_gradient)


def hessian_gradient_bracket(
    loss: PerSampleLoss,
    params: Params,
    batches: Sequence[Any],
    batch_size: int,
    f_at_params: Tensor,
    target_gradient: Params,
    eps: float,
    scheme: FiniteDifferenceScheme,
) -> Tensor:
    """``[<g_V, H_B G_i + H_i G_B>]_i`` by a finite difference of ``f_i`` along ``g_V``.

    ``f_at_params`` is ``[<G_B, G_i>]_i`` at ``params`` (reused from the step; the
    central scheme does not need it).
    """
    target_norm = norm(target_gradient)
    if float(target_norm) == 0.0:
        return torch.zeros_like(f_at_params)
    direction = {k: v / target_norm for k, v in target_gradient.items()}
    _, f_plus = batch_gradient_dots(loss, add_scaled(params, direction, eps), batches, batch_size)
    if scheme == "forward":
        return target_norm * (f_plus - f_at_params) / eps
    _, f_minus = batch_gradient_dots(loss, add_scaled(params, direction, -eps), batches, batch_size)
    return target_norm * (f_plus - f_minus) / (2 * eps)


def first_order_term(eta: float, batch_size: int, target_dots: Tensor) -> Tensor:
    """``(eta/|B|) <g_V, G_i>``: how much the target loss would rise at this step without sample i."""
    return (eta / batch_size) * target_dots


def second_order_term(eta: float, step: int, batch_size: int, bracket: Tensor) -> Tensor:
    """``-(t eta^2/|B|) <g_V, H_B G_i + H_i G_B>``: the in-run Eq. 9 term before normalization."""
    return (-step * eta**2 / batch_size) * bracket


def normalize_second_order(second_order_sum: Tensor, normalization: Normalization, steps_represented: int) -> Tensor:
    """The stored second-order sum under a named normalization.

    ``"paper"`` divides by the number of optimizer steps the recorded steps stand for
    (Eq. 9's ``1/m``, with every step a checkpoint); ``"sum"`` keeps the all-steps sum.
    """
    if normalization == "sum":
        return second_order_sum
    if normalization == "paper":
        return second_order_sum / max(steps_represented, 1)
    raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}; got {normalization!r}.")
