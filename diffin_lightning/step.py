"""The per-step maths as pure functions: handed a step's per-sample quantities and tensors, never the Trainer.

For an in-run step ``t`` with learning rate ``eta``, batch ``B`` and a target gradient ``g_V``
(DESIGN.md, "The estimator"; :mod:`diffin_lightning.estimator` documents each term):

- first order ``(eta/|B|) <g_V, G_i>``;
- second order ``-(t eta^2/|B|) |g_V| (f_i(theta + eps u) - f_i(theta)) / eps`` with
  ``f_i = <G_B, G_i>`` and ``u = g_V/|g_V|`` (forward), or the central difference;
- the propagation factor ``clamp(1 - eta <u, H_B u>, 0, 1)^n`` of ``second_order="propagated"``,
  its curvature from the same perturbed batch gradient.

Every scalar that depends on the data (``eps``, ``|g_V|``, the curvature, the factor) stays a
0-d tensor on the model's device: no host synchronisation in the per-step path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffin_lightning.engine import ScaledShift, StepGradients
from diffin_lightning.per_sample import Params, PerSampleLoss, dot
from diffin_lightning.settings import FiniteDifferenceScheme

# torch.nn.utils.clip_grad_norm_'s (and so Lightning's) factor: max_norm / (total_norm + CLIP_NORM_EPS), at most 1.
CLIP_NORM_EPS = 1e-6


@dataclass(frozen=True)
class Contribution:
    """One target's contribution from one recorded step.

    Attributes:
        first: ``[B]`` first-order terms.
        second: ``[B]`` second-order terms (before normalization).
        factor: 0-d propagation factor, or ``None`` when the target has no second order.
        target_gradient: ``g_V`` used at this step (``None`` for ``"self"``).
    """

    first: Tensor
    second: Tensor
    factor: Tensor | None = None
    target_gradient: Params | None = None


def parameters_norm(params: Params) -> Tensor:
    """``|theta|`` as a 0-d tensor."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(params.values()))))


def finite_difference_step(eps: float | None, params: Params) -> Tensor:
    """The finite-difference step as a 0-d tensor: ``eps``, or ``sqrt(machine eps) * max(1, |theta|)``."""
    reference = next(iter(params.values()))
    if eps is not None:
        # Filled on the device (torch.tensor would copy it from the host, which waits on a GPU).
        return torch.full((), float(eps), dtype=reference.dtype, device=reference.device)
    return torch.finfo(reference.dtype).eps ** 0.5 * parameters_norm(params).clamp_min(1.0)


def propagation_factor(eta: float, curvature: Tensor, steps: int) -> Tensor:
    """``clamp(1 - eta lambda, 0, 1)^steps`` as a tensor (see :func:`diffin_lightning.estimator.propagation_factor`)."""
    return (1.0 - eta * curvature).clamp(0.0, 1.0) ** steps


@dataclass(frozen=True)
class PerturbedPasses:
    """One target's perturbed passes at one step: ``(<eps u, G_B>, f_i)`` at ``theta + eps u`` (``plus``) and,
    for the central scheme, at ``theta - eps u`` (``minus``).

    They read nothing of the training step (the batch, ``theta``, ``g_V`` and ``eps`` are known
    before its forward), so the recorder may take them before it: see
    :meth:`diffin_lightning.recorder.InfluenceRecorder.begin_micro_batch`.
    """

    plus: tuple[Tensor, Tensor]
    minus: tuple[Tensor, Tensor] | None = None
    # (|g_V|, eps u) they moved along, where the caller kept them: the step reuses them rather than take |g_V| again.
    unit: tuple[Tensor, ScaledShift] | None = None


def unit_shift(target_gradient: Params, eps: Tensor) -> tuple[Tensor, ScaledShift]:
    """``(|g_V|, eps u)`` with ``u = g_V / |g_V|``, the shift formed one parameter at a time.

    No parameter-sized buffer for the shift, nor for ``G_B`` at the moved point (each pass returns
    ``<eps u, G_B>`` there): each is 5 MB on the 256-1024-1024-10 MLP, whose plain fit grows by 27 MB.
    """
    target_norm = parameters_norm(target_gradient)
    return target_norm, ScaledShift(target_gradient, target_norm.clamp_min(torch.finfo(target_norm.dtype).tiny), eps)


def perturbed_passes(view: StepGradients, shift: ScaledShift, scheme: FiniteDifferenceScheme, target_norm: Tensor | None = None) -> PerturbedPasses:
    """The forward (one pass) or central (two passes) scheme's passes for one target along ``shift`` (:func:`unit_shift`).

    ``target_norm``: ``|g_V|`` from the same :func:`unit_shift`, given where the passes are kept for a later
    :func:`bracket_and_curvature` (taken before the forward): it then reuses both instead of a second norm of ``g_V``.
    """
    plus = view.perturbed_along(shift, shift)
    minus = view.perturbed_along(shift.negated(), shift) if scheme == "central" else None
    if target_norm is None:
        return PerturbedPasses(plus, minus)
    shift.release_scratch()  # kept through the training step: no buffer of its own held beside it
    return PerturbedPasses(plus, minus, (target_norm, shift))


def bracket_and_curvature(
    view: StepGradients, target_gradient: Params, eps: Tensor, scheme: FiniteDifferenceScheme, passes: PerturbedPasses | None = None
) -> tuple[Tensor, Tensor]:
    """``<g_V, H_B G_i + H_i G_B>`` for every sample and ``<u, H_B u>``, by one (forward) or two (central) perturbed passes.

    ``passes``: the passes taken already (before the training step's forward) at the same
    ``theta``, ``g_V`` and ``eps``; ``None`` takes them here. A zero target gradient gives a zero
    bracket and zero curvature (the point is not moved).
    """
    # The passes' own (|g_V|, eps u) where they were taken before the forward: the same g_V and eps, so the same values.
    target_norm, shift = passes.unit if passes is not None and passes.unit is not None else unit_shift(target_gradient, eps)
    if scheme == "forward":
        # <eps u, G_B> at theta before the pass, with the same shift: its scratch is then let go when the
        # parameters are moved, not held through the pass (or here, when the passes ran ahead of the forward).
        along_reference, width = shift.dot(view.batch_gradient), eps
        along_plus, f_plus = (passes or perturbed_passes(view, shift, scheme)).plus
        f_reference = view.gradient_dots()
    else:
        passes = passes or perturbed_passes(view, shift, scheme)
        assert passes.minus is not None, "the central scheme needs the pass at theta - eps u"
        (along_plus, f_plus), (along_reference, f_reference) = passes.plus, passes.minus
        width = 2 * eps
    bracket = target_norm * (f_plus - f_reference) / width
    curvature = (along_plus - along_reference) / (eps * width)
    return bracket, curvature


@dataclass(frozen=True)
class ClipProjection:
    """A norm-clipped step's first-order products: ``<P v, G_i>`` with ``P = I - kappa G_B^ G_B^T``.

    ``C G_B / (|G_B| + 1e-6)`` (Lightning's clipped step, torch.nn.utils.clip_grad_norm_) has the
    Jacobian ``c P`` in ``G_B``, ``G_B^`` its unit direction and ``kappa = |G_B| / (|G_B| + 1e-6)``:
    ``<P v, G_i> = <v, G_i> - kappa <v, G_B> <G_B, G_i> / |G_B|^2``, from ``<G_B, G_i>`` (the
    second order's ``f_i`` at ``theta``) and parameter-sized dots, all on the device.
    """

    batch_gradient: Params
    gradient_dots: Tensor  # <G_B, G_i>
    scale: Tensor  # kappa / |G_B|^2

    @staticmethod
    def of(view: StepGradients) -> ClipProjection:
        return ClipProjection(view.batch_gradient, view.gradient_dots(), ClipProjection.scale_of(view.batch_gradient))

    @staticmethod
    def scale_of(batch_gradient: Params) -> Tensor:
        """``kappa / |G_B|^2``."""
        squared = dot(batch_gradient, batch_gradient)
        length = squared.sqrt()
        return length / (length + CLIP_NORM_EPS) / squared

    def along(self, direction: Params, products: Tensor) -> Tensor:
        """``<P v, G_i>`` from ``<v, G_i>``."""
        return products - (self.scale * dot(direction, self.batch_gradient)).to(products.dtype) * self.gradient_dots.to(products.dtype)

    def own(self, squared_norms: Tensor) -> Tensor:
        """``<P G_i, G_i>`` (the 'self' target) from ``|G_i|^2``."""
        return squared_norms - self.scale.to(squared_norms.dtype) * self.gradient_dots.to(squared_norms.dtype) ** 2


def in_run_step(
    view: StepGradients,
    *,
    step: int,
    eta: float,
    batch_size: int,
    every_n_steps: int,
    target_gradients: Mapping[str, Params | None],
    compute_second_order: bool,
    eps: Tensor,
    scheme: FiniteDifferenceScheme,
    passes: Mapping[str, PerturbedPasses] | None = None,
    clipped: bool = False,
) -> dict[str, Contribution]:
    """Every target's contribution from one in-run step.

    Args:
        view: the step's per-sample quantities.
        step: ``t`` (Lightning's ``global_step`` before the update).
        eta: the step's learning rate.
        batch_size: ``|B|``.
        every_n_steps: the steps this one stands for (the propagation factor's power).
        target_gradients: name -> ``g_V``, or ``None`` for a ``"self"`` target.
        compute_second_order: ``False`` gives zero second-order terms and no factor.
        eps: the finite-difference step (0-d tensor).
        scheme: ``"forward"`` or ``"central"``.
        passes: name -> that target's perturbed passes, taken before the step's forward at the
            same ``theta``, ``g_V`` and ``eps`` (the others are taken here).
        clipped: the step's gradient was clipped by norm, ``eta`` already times the factor ``c``.
            Lightning's clipped step is ``C G_B / (|G_B| + 1e-6)``: removing sample i turns it
            instead of shortening it, so its first-order term is taken along the step's Jacobian,
            ``(eta/|B|) <g - kappa <g, G_B^> G_B^, G_i>`` (:class:`ClipProjection`); the second-order
            terms take the step at ``eta`` (its factor held constant).
    """
    passes = passes or {}
    names = [name for name, gradient in target_gradients.items() if gradient is not None]
    dots = view.dots([target_gradients[name] for name in names]) if names else None  # type: ignore[misc]
    projection = ClipProjection.of(view) if clipped and target_gradients else None
    out: dict[str, Contribution] = {}
    for name, gradient in target_gradients.items():
        if gradient is None:
            squared = view.squared_norms() if projection is None else projection.own(view.squared_norms())
            first = (eta / batch_size) * squared
            out[name] = Contribution(first, torch.zeros_like(first))
    if names and compute_second_order and scheme == "forward":
        view.gradient_dots()  # f_i(theta), cached, before the perturbed passes ...
    # ... so that everything read at theta is read by now, and the view can let the step's captured
    # factors go: a perturbed pass then never holds them beside its own (peak memory).
    view.release_theta(perturbed_passes_follow=compute_second_order and any(name not in passes for name in names))
    for name in names:
        gradient = target_gradients[name]
        assert dots is not None and gradient is not None
        along = dots[names.index(name)]
        first = (eta / batch_size) * (along if projection is None else projection.along(gradient, along))
        if not compute_second_order:
            out[name] = Contribution(first, torch.zeros_like(first))
            continue
        bracket, curvature = bracket_and_curvature(view, gradient, eps, scheme, passes.get(name))
        second = (-step * eta**2 / batch_size) * bracket
        out[name] = Contribution(first, second, propagation_factor(eta, curvature, every_n_steps), gradient)
    return out


def checkpoint_step(
    loss: PerSampleLoss,
    params: Params,
    proxy: StepGradients,
    *,
    step: int,
    eta: float,
    num_samples: int,
    target_gradients: Mapping[str, Params | None],
    compute_second_order: bool,
    eps: Tensor,
    scheme: FiniteDifferenceScheme,
    training_set: Iterable[tuple[Any, Tensor]],
    self_chunk_size: int | None,
    clipped: bool = False,
) -> Iterable[tuple[Tensor, dict[str, Contribution]]]:
    """The paper's checkpoint estimator at one step: every training sample, the step's batch as proxy ``B``.

    Yields ``(ids, name -> Contribution)`` per training-set batch. The perturbed batch
    gradients of the proxy batch are computed once and shared by all training-set batches.
    ``clipped``: as in :func:`in_run_step` (``eta`` holds the factor; the first-order terms
    are taken along the clipped step's Jacobian, from ``<G_B, G_i>`` over the training set).
    """
    from diffin_lightning.engine import RecomputedStep

    perturbed: dict[str, tuple[Tensor, list[tuple[Params, Params]], float]] = {}
    if compute_second_order:
        for name, gradient in target_gradients.items():
            if gradient is None:
                continue
            target_norm = parameters_norm(gradient)
            unit = {k: v / target_norm.clamp_min(torch.finfo(target_norm.dtype).tiny) for k, v in gradient.items()}
            points = []
            for sign in (1.0, -1.0) if scheme == "central" else (1.0,):
                point = {k: params[k] + sign * eps * unit[k] for k in params}
                points.append((point, proxy.perturbed({k: sign * eps * unit[k] for k in params})[0]))
            perturbed[name] = (target_norm, points, 1.0 if scheme == "forward" else 2.0)
    proxy_gradient = proxy.batch_gradient
    clip_scale = ClipProjection.scale_of(proxy_gradient) if clipped else None
    for batch, ids in training_set:
        samples = RecomputedStep(loss, params, [batch], int(ids.numel()), self_chunk_size)
        f_at = loss.dots(params, [batch], proxy_gradient) if perturbed or clipped else None
        projection = None if clip_scale is None else ClipProjection(proxy_gradient, f_at, clip_scale)  # type: ignore[arg-type]
        contributions: dict[str, Contribution] = {}
        for name, gradient in target_gradients.items():
            if gradient is None:
                squared = samples.squared_norms() if projection is None else projection.own(samples.squared_norms())
                first = (eta / num_samples) * squared
                contributions[name] = Contribution(first, torch.zeros_like(first))
                continue
            along = loss.dots(params, [batch], gradient)
            first = (eta / num_samples) * (along if projection is None else projection.along(gradient, along))
            if name not in perturbed:
                contributions[name] = Contribution(first, torch.zeros_like(first))
                continue
            target_norm, points, width = perturbed[name]
            f_plus = loss.dots(points[0][0], [batch], points[0][1])
            f_reference = f_at if len(points) == 1 else loss.dots(points[1][0], [batch], points[1][1])
            assert f_reference is not None
            bracket = target_norm * (f_plus - f_reference) / (width * eps)
            contributions[name] = Contribution(first, (-step * eta**2 / num_samples) * bracket)
        yield ids, contributions
