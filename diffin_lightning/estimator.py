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

The ``"propagated"`` second-order term (the callback's default) reuses the same
perturbed batch gradient for the curvature ``<u, H_B u>`` along the target direction and
carries every earlier contribution through each later step by
:func:`propagation_factor`; the callback adds the target-drift correction at the end of fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from diffin_lightning.per_sample import Params, PerSampleLoss, add_scaled, dot, norm

from diffin_lightning.settings import (  # noqa: F401  (re-exported: the names' one home is settings.py)
    FINITE_DIFFERENCE_SCHEMES,
    SCHEDULES,
    SECOND_ORDER_TERMS,
    FiniteDifferenceScheme,
    Schedule,
    SecondOrderTerm,
)

Normalization = Literal["paper", "sum"]
NORMALIZATIONS: tuple[Normalization, ...] = ("paper", "sum")


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


class FiniteDifferenceBracket:
    """``<g_V, H_B G_i + H_i G_B>`` for any samples ``i``, by a finite difference of ``f_i`` along ``g_V``.

    The batch ``B`` that defines ``G_B`` (the step's batch in-run, a proxy batch at a
    checkpoint) is fixed at construction, where ``G_B`` is computed at the perturbed
    point(s) once; :meth:`evaluate` then costs one ``jvp`` per perturbed point for any
    set of samples.

    Args:
        loss: the per-sample loss.
        params: the point ``theta``.
        gradient_batches: the micro-batches of ``B``.
        batch_size: ``|B|``.
        target_gradient: ``g_V``.
        eps: the step along ``u = g_V/|g_V|``.
        scheme: ``"forward"`` or ``"central"``.
    """

    def __init__(
        self,
        loss: PerSampleLoss,
        params: Params,
        gradient_batches: Sequence[Any],
        batch_size: int,
        target_gradient: Params,
        eps: float,
        scheme: FiniteDifferenceScheme,
    ) -> None:
        self.loss, self.eps, self.scheme = loss, eps, scheme
        self.target_norm = norm(target_gradient)
        self.points: list[tuple[Params, Params]] = []
        if float(self.target_norm) == 0.0:
            return
        direction = {k: v / self.target_norm for k, v in target_gradient.items()}
        self.direction = direction
        for sign in (1.0, -1.0) if scheme == "central" else (1.0,):
            point = add_scaled(params, direction, sign * eps)
            self.points.append((point, loss.batch_gradient(point, gradient_batches, batch_size)))

    def evaluate(self, sample_batches: Sequence[Any], f_at_params: Tensor) -> Tensor:
        """The bracket for every sample of ``sample_batches``; ``f_at_params`` is ``[<G_B, G_i>]_i`` at ``theta``."""
        if not self.points:
            return torch.zeros_like(f_at_params)
        f_plus = self.loss.dots(self.points[0][0], sample_batches, self.points[0][1])
        if self.scheme == "forward":
            return self.target_norm * (f_plus - f_at_params) / self.eps
        f_minus = self.loss.dots(self.points[1][0], sample_batches, self.points[1][1])
        return self.target_norm * (f_plus - f_minus) / (2 * self.eps)


    def curvature(self, batch_gradient: Params) -> float:
        """``lambda = <u, H_B u>``, the batch loss's curvature along the target direction, from the same points.

        ``batch_gradient`` is ``G_B`` at ``theta`` (the forward scheme needs it).
        """
        if not self.points:
            return 0.0
        plus = self.points[0][1]
        if self.scheme == "forward":
            return float(dot(self.direction, {k: plus[k] - batch_gradient[k] for k in plus})) / self.eps
        minus = self.points[1][1]
        return float(dot(self.direction, {k: plus[k] - minus[k] for k in plus})) / (2 * self.eps)


def propagation_factor(eta: float, curvature: float, steps: int) -> float:
    """``clamp(1 - eta lambda, 0, 1)^steps``: how much of an earlier displacement along ``g_V`` survives.

    Removing a sample moves the parameters; every later SGD step multiplies that
    displacement by ``(I - eta H_B)``. Along the target direction ``u`` this is the scalar
    ``1 - eta <u, H_B u>``. Diff-In's Eq. 9 keeps only the first-order expansion
    ``1 - t eta lambda`` of the product, which over-corrects once ``t eta lambda`` is large;
    the product itself does not. The factor is clamped to [0, 1]: a one-direction model
    cannot tell growth along ``u`` (negative curvature) from a rotation away from it, and an
    overshooting step (``eta lambda > 1``) does not flip the sign of what it carries; both
    clamps measured neutral or better on the fidelity benchmark.
    """
    return min(1.0, max(0.0, 1.0 - eta * curvature)) ** steps


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
