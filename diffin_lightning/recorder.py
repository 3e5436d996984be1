"""The recording session behind the callback: targets, accumulator, engine choice, the per-step hand-off.

Handed batches, ids, gradients and learning rates by the callback's hooks; never sees the
Trainer. One :class:`InfluenceRecorder` per fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from diffin_lightning import distributed
from diffin_lightning.accumulator import InfluenceAccumulator
from diffin_lightning.precision import widened
from diffin_lightning.engine import (
    CapturedStep,
    MicroBatch,
    RecomputedStep,
    RngState,
    StepCapture,
    StepGradients,
    capture_pass,
    gradient_of_mean,
    other_captures_paused,
    relative_difference,
    replayed_rng,
)
from diffin_lightning.dots.stream import ProductStream, gradient_gap_parts
from diffin_lightning.finite import all_finite, finite_flag
from diffin_lightning.per_sample import LossFn, Params, PerSampleLoss
from diffin_lightning.results import RunRecord
from diffin_lightning.settings import DiffInSettings
from diffin_lightning.step import Contribution, PerturbedPasses, checkpoint_step, finite_difference_step, in_run_step, perturbed_passes, unit_shift
from diffin_lightning.targets import DatasetTarget, SelfTarget, Target, TrainingLossTarget

ForwardContext = Callable[[], contextlib.AbstractContextManager[Any]]

# Agreement between the training step's .grad and the recomputed mean of per_sample_loss's gradient
# on the first recorded step: float rounding of a different summation order stays far below these.
_CHECK_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
_CHECK_TOLERANCE_MIXED = 5e-2


@dataclasses.dataclass(frozen=True)
class StepGates:
    """A step's verdicts found on the device (booleans there; nothing read back to the host).

    ``model``: the parameters finite at this step and at every earlier step so checked (what
    the 'self' target needs); ``batch``: that and the batch gradient and the step's per-sample
    losses finite (what every target that uses ``G_B`` needs). A False gate makes the
    accumulator skip the step for the target and count it, as a host check would.
    """

    model: Tensor
    batch: Tensor

    def for_target(self, target: Target) -> Tensor:
        return self.model if isinstance(target, SelfTarget) else self.batch


@dataclasses.dataclass(frozen=True)
class EarlyPasses:
    """A recorded step's perturbed passes, taken before its forward, and what they were taken at.

    Attributes:
        eps: the finite-difference step (the step's own: ``theta`` does not move before the update).
        gradients: target name -> the ``g_V`` they moved along (the step uses them only with that very ``g_V``).
        passes: target name -> its passes.
    """

    eps: Tensor
    gradients: dict[str, Params]
    passes: dict[str, PerturbedPasses]

    def for_targets(self, target_gradients: dict[str, Params | None]) -> dict[str, PerturbedPasses]:
        return {name: self.passes[name] for name, gradient in target_gradients.items() if name in self.passes and self.gradients[name] is gradient}


class InfluenceRecorder:
    """Turns each recorded optimizer step into per-sample contributions.

    Args:
        settings: the callback's settings.
        targets: the target objects.
        module: the model.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``.
        record: the run's counters (shared with the callback).
    """

    def __init__(self, settings: DiffInSettings, targets: list[Target], module: nn.Module, loss_fn: LossFn, record: RunRecord) -> None:
        self.settings, self.targets, self.module = settings, targets, module
        # Passes over target batches, and every pass of the torch.func path (dot_products="functional") and of
        # the checkpoint schedule, are seeded per step (``seed``): their dropout masks are the run's to choose.
        self.loss = PerSampleLoss(module, loss_fn)
        # The capture path replays the training step's own random state instead.
        self.unseeded_loss = PerSampleLoss(module, loss_fn, seed=None)
        names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.fast = settings.dot_products == "auto"
        self.capture = StepCapture(module, names) if self.fast else None
        reuse = settings.reuse_training_step if settings.reuse_training_step is not None else settings.loss_fn is None
        self.use_capture = self.fast and reuse and settings.schedule == "in_run"
        self.verified = False
        self.reuses_autocast_step = False  # see adopt_mixed_precision
        # Lightning clips this run's gradients by norm: a step's first-order products then need <G_B, G_i> too
        # (in_run_step's projection), so the training step's stream takes them (set by the callback at the fit's start).
        self.norm_clipping = False
        self._model_nonfinite_warned = False
        self._stream: ProductStream | None = None  # what the current step's capture takes during its backward
        self._early: EarlyPasses | None = None  # the current step's perturbed passes, taken before its forward
        # Paths without the capture (torch.func's, the checkpoint schedule's): the step's micro-batches with the RNG
        # state their training forward started from, replayed by their recomputations (the training step's masks).
        self._step_rng_states: list[tuple[Any, RngState]] = []
        self.record = record
        record.engine = (
            "captured from the training step"
            if self.use_capture
            else "captured from one recomputed forward+backward per step"
            if self.fast and settings.schedule == "in_run"
            else "recomputed (torch.func)"  # (the checkpoint schedule's passes are torch.func's whatever dot_products says)
        )
        self.accumulator: InfluenceAccumulator | None = None
        # The training step's micro-batch size: the default batch of every extra pass (targets, training set).
        self.micro_batch_size: int | None = None
        self.drift: dict[str, Tensor] = {}
        self.step_losses: list[Tensor] = []
        self._wrapped_loss = False
        self._in_training_step = False
        self._warned: set[tuple[str, str]] = set()
        if self.use_capture:
            self.record_training_losses()
        message = self.capture.fallback_message() if self.capture is not None else None
        if message:
            rank_zero_info(message)

    def adopt_micro_batch_size(self, size: int | None) -> None:
        """Learn the training micro-batch size (once): the default batch of the target and training-set passes."""
        if size is None or self.micro_batch_size is not None:
            return
        self.micro_batch_size = max(1, int(size))
        for target in self.targets:
            if isinstance(target, DatasetTarget):
                target.adopt_batch_size(self.micro_batch_size)

    @property
    def first_order_only(self) -> bool:
        """Whether no recorded step takes a finite difference (no second-order term): first-order products, 'self', 'train'."""
        return not (self.settings.compute_second_order and any(target.has_second_order for target in self.targets))

    def adopt_mixed_precision(self, reusable: bool) -> None:
        """The training step runs under mixed precision; ``reusable``: its captures and ``.grad`` may serve (bf16-mixed).

        Only a run without a finite difference reads them (a difference of bfloat16 products would be
        their rounding); its products then come from the step's bfloat16 captures read in float32, and
        every other run's from one full-precision recomputation per recorded step.
        """
        self.reuses_autocast_step = reusable and self.first_order_only and self.use_capture
        if self.use_capture:
            self.record.engine = (
                "captured from the training step (bf16-mixed: its bfloat16 captures read in the parameters' dtype)"
                if self.reuses_autocast_step
                else "captured from one recomputed full-precision forward+backward per step (mixed precision)"
            )

    def teardown(self) -> None:
        """Remove the capture hooks and the loss wrapper from the model."""
        if self.capture is not None:
            self.capture.remove()
        if self._wrapped_loss:
            del self.module.per_sample_loss
            self._wrapped_loss = False

    # ------------------------------------------------------------------ per micro-batch

    def begin_micro_batch(
        self,
        batch: Any,
        size: int,
        rng: RngState | None,
        step: int = 0,
        micro_batches_per_step: int = 1,
        mixed_precision: bool = False,
        forward_context: ForwardContext = contextlib.nullcontext,
        release_stale_gradients: bool = False,
    ) -> None:
        """A recorded step's micro-batch is about to run its training step (``step``: its ``global_step``).

        Where the step's products are streamed (:meth:`_product_stream`) and it has one micro-batch,
        its perturbed passes run here, ahead of its forward (:meth:`_early_passes`).
        ``release_stale_gradients``: the previous step's ``.grad`` is dead here (the callback checked
        that Lightning discards it before the backward) and goes before those passes.
        """
        if (self.capture is None or self.settings.schedule != "in_run") and rng is not None:
            self._step_rng_states.append((batch, rng))
        if self.capture is not None and self.settings.schedule == "in_run":
            first = not self.capture.micro_batches
            # A refresh below batches the target by the training micro-batch: known from here on, where the
            # loader did not say (a refresh in 256s would hold twice the activations of a step in 128s).
            self.adopt_micro_batch_size(size)
            # Before the capture and the loss wrapper are on: a refresh here is none of the step's.
            stream = self._product_stream(step, micro_batches_per_step, mixed_precision, release_stale_gradients) if first else self._stream
            if first:
                self.step_losses = []
                self._stream = stream
                self._early = None
                if stream is not None and stream.second_order and micro_batches_per_step == 1:
                    self._early = self._early_passes(stream, MicroBatch(batch, size, rng), forward_context)
            self.capture.begin_micro_batch(batch, size, rng, hooks=self.use_capture)
            if stream is not None:
                self.capture.layers.stream_products(stream)
            self._in_training_step = True

    def _product_stream(self, step: int, micro_batches_per_step: int, mixed_precision: bool, release_stale_gradients: bool = False) -> ProductStream | None:
        """Before a recorded step's first forward: what the capture is to take during the step's backward, if it can.

        The directions must be known before the backward, so the dataset targets' gradients are
        refreshed here when due (at the same parameters, on a forked RNG: the same ``g_V`` as a
        refresh after the backward). Steps it cannot serve keep every capture to the end of the
        backward: a 'train' target (its direction folds in this step's gradient), DDP (a refresh
        is a collective, and the second order there uses the global batch gradient), mixed or
        float16 precision (products of unscaled float16 gradients underflow; a bf16-mixed step whose
        captures serve, :meth:`adopt_mixed_precision`, streams them, read in float32), and the forward
        scheme's ``<G_B, G_i>`` over several micro-batches (each sample pairs with every
        micro-batch's samples).
        """
        capture, settings = self.capture, self.settings
        if (
            capture is None
            or not capture.covered
            or not settings.stream_products
            or settings.schedule != "in_run"
            or not self.use_capture
            or (mixed_precision and not self.reuses_autocast_step)
            or distributed.world_size() > 1
            or self.record.model_nonfinite_known is not None  # (not model_nonfinite_step: that reads the device back)
            or any(isinstance(target, TrainingLossTarget) for target in self.targets)
        ):
            return None
        params = self.loss.parameters()
        reference = next(iter(params.values()))
        if reference.dtype == torch.float16:
            return None
        datasets = [target for target in self.targets if not isinstance(target, SelfTarget)]
        second_order = settings.compute_second_order and bool(datasets)
        gradient_dots = (second_order and settings.finite_difference == "forward") or self.norm_clipping
        if gradient_dots and micro_batches_per_step != 1:
            return None
        if release_stale_gradients:
            for parameter in self.module.parameters():
                parameter.grad = None
        self._seed_passes(step)  # the refresh's dropout masks, as on every other path
        # The refresh's own forward and backward reach no capture: another callback's may be on for its step already.
        with other_captures_paused(capture), replayed_rng(None, reference.device):
            directions = tuple(target.target_gradient(self.loss, params, step, reference.device, {}) for target in datasets)
        return ProductStream(
            directions=directions,
            squared_norms=len(datasets) < len(self.targets),
            gradient_dots=gradient_dots,
            gradient_source="accumulated",  # the training step's own backward accumulates .grad
            second_order=second_order,
            max_materialised_elements=capture.layers.max_materialised_elements,
        )

    def _early_passes(self, stream: ProductStream, micro_batch: MicroBatch, forward_context: ForwardContext) -> EarlyPasses:
        """The step's perturbed passes, before its forward: they read only the batch, ``theta``, ``g_V`` and ``eps``.

        The same passes as after the backward (the batch's random state replayed, the parameters
        and buffers restored bit for bit), so the same scores; but run here, they do not sit
        beside the training step's ``.grad`` (one parameter-sized buffer of peak memory, the
        fit's peak on the 256-1024-1024-10 MLP). A step later skipped just drops them.
        """
        params = self.loss.parameters()
        eps = finite_difference_step(self.settings.eps, params)
        view = CapturedStep(
            self.capture, self.unseeded_loss, params, [micro_batch], None, {}, forward_context, self.settings.self_chunk_size,  # type: ignore[arg-type]
            stream_perturbed=self.settings.stream_products,
        )
        datasets = [target for target in self.targets if not isinstance(target, SelfTarget)]
        gradients = {target.name: gradient for target, gradient in zip(datasets, stream.directions)}
        passes = {}
        reference = next(iter(params.values()))
        with other_captures_paused(self.capture), replayed_rng(None, reference.device):
            for name, gradient in gradients.items():
                target_norm, shift = unit_shift(gradient, eps)
                passes[name] = perturbed_passes(view, shift, self.settings.finite_difference, target_norm)
        return EarlyPasses(eps, gradients, passes)

    def _seed_passes(self, step: int) -> None:
        """Seed the passes ``self.loss`` runs at ``step`` (target batches, the end-of-fit pass, torch.func's and the
        checkpoints' own): fixed dropout masks from ``seed`` and the step, the same on every path."""
        self.loss.seed = self.settings.seed * 1_000_003 + step

    def abandon_step(self) -> None:
        """Forget the current step's captures (a skipped step)."""
        self._in_training_step = False
        self._stream = None
        self._early = None
        self._step_rng_states = []
        if self.capture is not None:
            self.capture.clear()

    # ------------------------------------------------------------------ per step

    def record_step(
        self,
        step: int,
        eta: float,
        batches: list[Any],
        ids: Tensor,
        gradients: Params | None,
        gradient_to_mean: float,
        backprop_scale: Tensor | float,
        forward_context: ForwardContext,
        mixed_precision: bool,
        every_rank_has_gradients: bool = True,
        clipped: bool = False,
    ) -> None:
        """Accumulate one in-run step.

        Args:
            step: ``global_step`` before the update.
            eta: learning rate.
            batches: the step's micro-batches; ``ids`` their sample ids, concatenated.
            gradients: the parameters' ``.grad`` (``None`` when the capture cannot be used this step).
            gradient_to_mean: what turns ``.grad`` into the mean of per-sample gradients (``k |b| / |B|``).
            backprop_scale: what turns a captured output gradient into that sample's own loss gradient.
            forward_context: the precision context of the training step's forward.
            mixed_precision: whether that context is autocast (looser first-step check).
            every_rank_has_gradients: under DDP, whether every rank has its ``gradients``
                (agreed by the caller with the step's other checks): the paths that depend on them
                (reusing the training step, the device gates) issue different collectives from
                the others, so the ranks take one together.
            clipped: Lightning's norm clipping scales this step's gradient (``eta`` holds its factor);
                see :func:`~diffin_lightning.step.in_run_step`.
        """
        assert self.accumulator is not None
        self._in_training_step = False
        self.record.steps_recorded += 1
        self.record.steps_represented += self.settings.every_n_steps
        params = self.loss.parameters()
        gates: StepGates | None = None
        # (Under DDP only what every rank knows alike picks the path: not model_nonfinite_known, which a read
        # on one rank, rank zero's file write, settles there alone; once the parameters are non-finite the
        # gates say so on every rank.)
        known_finite = self.record.model_nonfinite_known is None or distributed.world_size() > 1
        if math.isfinite(eta) and gradients is not None and every_rank_has_gradients and known_finite:
            # The common case: the parameters, the training step's .grad and its per-sample losses checked on the
            # device, and the step gated by the verdicts instead of branching on them (a read back would stall
            # a GPU every step). Nothing branches on a gate, so under DDP every rank issues the same collectives.
            gates = self._device_gates(step, params, gradients)
        # Step-level quantities: a non-finite one leaves nothing of this step that can be trusted.
        elif not self.check_model_finite(step) or not math.isfinite(eta):
            what = "the model's parameters" if self.record.model_nonfinite_step is not None else f"the learning rate ({eta})"
            for target in self.targets:
                self.skip_step(target.name, step, what)
            self.abandon_step()
            return
        batch_size = int(ids.numel())
        with other_captures_paused(self.capture):
            self._record_step(
                step, eta, batches, ids, params, batch_size, gradients, gradient_to_mean, backprop_scale, forward_context, mixed_precision, gates,
                every_rank_has_gradients, clipped,
            )

    def _device_gates(self, step: int, params: Params, gradients: Params) -> StepGates:
        """This step's verdicts on the device; the first step with non-finite parameters is kept there too."""
        device = next(iter(params.values())).device
        pending = self.record.model_nonfinite_pending
        if pending is None:
            pending = torch.full((), -1, dtype=torch.int64, device=device)
        pending = torch.where((pending < 0) & ~finite_flag(params.values(), device), step, pending)
        self.record.model_nonfinite_pending = pending  # read back when reported (RunRecord.model_nonfinite_step)
        model = pending < 0
        # The parameters and the averaged .grad are the same on every rank; the per-sample losses are this
        # rank's own: a non-finite one skips the step on every rank (as the global batch's G_B is then non-finite).
        batch = distributed.true_on_every_rank(model & finite_flag([*gradients.values(), *self.step_losses], device))
        return StepGates(model, batch)

    def _record_step(
        self,
        step: int,
        eta: float,
        batches: list[Any],
        ids: Tensor,
        params: Params,
        batch_size: int,
        gradients: Params | None,
        gradient_to_mean: float,
        backprop_scale: Tensor | float,
        forward_context: ForwardContext,
        mixed_precision: bool,
        gates: StepGates | None,
        every_rank_has_gradients: bool,
        clipped: bool,
    ) -> None:
        view: StepGradients
        try:
            # This step's passes over target batches (and, on the torch.func path, over its own batches).
            self._seed_passes(step)
            if self.capture is None:
                self.loss.replay_rng_states(self._step_rng_states)
                view = RecomputedStep(self.loss, params, batches, batch_size, self.settings.self_chunk_size)
            else:
                capture = self.capture
                capture.stop()
                micro_batches = list(capture.micro_batches)
                if len(micro_batches) != len(batches):  # a step whose start was not seen (resumed mid-step)
                    micro_batches = [MicroBatch(batch, int(part.numel())) for batch, part in zip(batches, ids.split(batch_size))]
                # Under DDP the ranks reuse the training step only together (a rank whose micro-batches
                # differ in size cannot, so all recapture at that step).
                if self.use_capture and gradients is not None and every_rank_has_gradients:
                    assert gradients is not None
                    # In place: the capture is cleared as soon as the view is built (no copy of every output gradient).
                    per_sample = capture.layers.per_sample(backprop_scale=backprop_scale, in_place=True)
                    if gradient_to_mean != 1.0:
                        gradients = dict(zip(gradients, torch._foreach_mul(list(gradients.values()), gradient_to_mean)))
                    view = CapturedStep(
                        capture, self.unseeded_loss, params, micro_batches, per_sample, gradients, forward_context, self.settings.self_chunk_size,
                        stream_perturbed=self.settings.stream_products,
                    )
                    view.from_training_step = True
                    if not self.verified:
                        view = self._verify(view, forward_context, mixed_precision)
                else:
                    view = self._recaptured(params, micro_batches, forward_context, self.unseeded_loss)
                capture.clear()
            self._accumulate_step(view, step, eta, params, ids, batch_size, gates, clipped)
        finally:
            self._stream = None
            self._early = None
            self._step_rng_states = []
            self.loss.clear_captures()
            if self.capture is not None:
                self.capture.clear()

    def _recaptured(
        self,
        params: Params,
        micro_batches: list[MicroBatch],
        forward_context: ForwardContext,
        loss: PerSampleLoss,
        across_ranks: bool = True,
        products_only: bool = False,
        stream: ProductStream | None = None,
    ) -> CapturedStep:
        """The step's products from one forward+backward of the per-sample loss with the capture on.

        ``products_only``: no batch gradient (the view's ``batch_gradient`` is empty), the
        backward computes no parameter gradient, and materialised per-sample gradients are not
        kept from one product to the next (one product is taken from such a view).
        """
        assert self.capture is not None
        summed, per_sample = capture_pass(
            self.capture, loss, list(params), None, micro_batches, forward_context, summed_gradient=not products_only, stream=stream
        )
        if products_only:
            per_sample.keep_materialised = False  # one product is taken from such a view (the end-of-fit pass)
        size = sum(mb.size for mb in micro_batches)
        if summed:
            torch._foreach_div_(list(summed.values()), float(size))  # the mean, in place (no parameter-sized copy)
        gradient = summed
        if across_ranks and not products_only:
            gradient = distributed.mean_over_ranks(gradient)  # under DDP the global batch's, as .grad is
        return CapturedStep(
            self.capture, loss, params, micro_batches, per_sample, gradient, forward_context, self.settings.self_chunk_size,
            stream_perturbed=self.settings.stream_products,
        )

    def _verify(self, view: CapturedStep, forward_context: ForwardContext, mixed: bool) -> CapturedStep:
        """Once: is the training step's gradient the mean of ``per_sample_loss``'s, and do the captures say the same?"""
        self.verified = True
        # The recomputation takes what the training step's stream took, the same way: the step's captures
        # and the recomputation's are then never held together (that was the fit's peak memory).
        stream = self._stream
        dtype = next(iter(view.params.values())).dtype
        tolerance = _CHECK_TOLERANCE_MIXED if mixed else _CHECK_TOLERANCE.get(dtype, 1e-2)
        recomputed: CapturedStep | None = None
        # (Its pass keeps the layers' outputs for the backward: where a layer's are kept whole (attention's), their
        # gradients would stand in for the parameter-sized one, no smaller on a transformer: +1.9 MB, 36.3 -> 38.2 MB
        # on the 2x64 encoder's first order; there the whole recomputation.)
        if stream is not None and len(view.micro_batches) == 1 and not self.capture.uncovered and not self.capture.layers.keeps_whole_outputs:
            gradient_gap, expected = self._streamed_check(view, stream, forward_context)
        else:
            # Its backward computes no .grad: G_sum, where a form reads it, from the layers' own factors.
            recheck = None if stream is None else dataclasses.replace(stream, gradient_source="factors")
            recomputed = self._recaptured(view.params, view.micro_batches, forward_context, self.unseeded_loss, stream=recheck)
            gradient_gap = relative_difference(view.batch_gradient, recomputed.batch_gradient)
            expected = _checked_products(recomputed, stream)
        # Each kind of product the stream took is compared on its own scale (a small one's error is not hidden by a large one's).
        capture_gap = max(
            float((widened(a) - widened(b)).abs().max() / widened(b).abs().max().clamp_min(1e-300))
            for a, b in zip(_checked_products(view, stream), expected, strict=True)
        )
        passed = gradient_gap <= tolerance and capture_gap <= tolerance
        # Under DDP every rank must take the same path (their passes meet in collectives): the
        # check passes only where it passes on every rank.
        if distributed.sum_scalars_over_ranks([float(passed)])[0] == distributed.world_size():
            return view
        self.use_capture = False
        self.record.engine = "captured from one recomputed forward+backward per step: the training step's gradient is not the mean of per_sample_loss's"
        rank_zero_warn(
            "DiffInCallback: the training step's gradient differs from the gradient of the mean of `per_sample_loss` "
            f"(relative gap {gradient_gap:.2e}; per-sample products gap {capture_gap:.2e}; tolerance {tolerance:.0e}), so "
            "the callback cannot reuse the training step's backward and runs one more forward+backward per recorded "
            "step instead (slower; same scores). Causes: training_step returns a sum instead of a mean, adds a "
            "regulariser, weights samples, or uses a different loss. Make training_step return "
            "per_sample_loss(batch).mean() to get the fast path."
        )
        if recomputed is None:  # (the streamed check kept no view to go on with)
            recomputed = self._recaptured(view.params, view.micro_batches, forward_context, self.unseeded_loss)
        return recomputed

    def _streamed_check(self, view: CapturedStep, stream: ProductStream, forward_context: ForwardContext) -> tuple[float, list[Tensor]]:
        """``_verify``'s recomputation with no parameter-sized gradient: ``(gradient gap, expected products)``.

        Each layer the stream takes builds its ``G_sum`` from its factors, compares ``G_sum / B`` with
        the training step's ``.grad`` and lets it go there (:attr:`ProductStream.gradient_check`);
        autograd forms the gradients of the layers it holds only, and the eager layers' come from
        their factors. The recomputed gradient was the first recorded step's peak (beside ``.grad``
        and ``g_V``: the fit's peak of a first-order run on the MLP). The gap is
        :func:`~diffin_lightning.engine.relative_difference`'s ``|.grad - G_B| / |G_B|``.
        """
        assert self.capture is not None
        mean = view.batch_gradient
        size = view.batch_size
        recheck = dataclasses.replace(stream, gradient_source="factors", gradient_check=mean)
        summed, per_sample = capture_pass(
            self.capture, self.unseeded_loss, list(view.params), None, view.micro_batches, forward_context, summed_gradient="held", stream=recheck
        )
        # <G_B, G_i> taken here, before the held gradients become differences below.
        expected = _stream_products(stream, lambda: per_sample.gradient_dots(gradient=summed) / size, per_sample.dots, per_sample.squared_norms)
        parts = [part for part in [per_sample.streamed_check()] if part is not None]
        if summed:
            parts.append(gradient_gap_parts(summed, mean, size))
        rest = set(self.capture.covered) - set(summed) - per_sample.streamed_parameters()
        if rest:  # eager layers (normalisation): their G_sum from their factors
            parts.append(gradient_gap_parts({name: value.clone() for name, value in per_sample.summed_gradient(rest).items()}, mean, size))
        difference, reference = torch.stack(parts).sum(dim=0).sqrt()
        return float(difference / reference.clamp_min(1e-300)), expected

    def _accumulate_step(
        self, view: StepGradients, step: int, eta: float, params: Params, ids: Tensor, batch_size: int, gates: StepGates | None, clipped: bool = False
    ) -> None:
        """One step's contributions; ``gates``: the step's verdicts on the device (None: checked on the host)."""
        assert self.accumulator is not None
        settings = self.settings
        device = ids.device
        # Per-sample losses the training step itself computed (capture path): a non-finite one makes this
        # step's G_B, as the mean of per_sample_loss defines it, non-finite, even where training dropped it.
        losses = self.step_losses if isinstance(view, CapturedStep) and view.from_training_step else None
        bad_samples = None if not losses else ~torch.isfinite(torch.cat(losses))
        needs_batch_gradient = any(not isinstance(t, SelfTarget) for t in self.targets)
        batch_gradient_finite = True
        if needs_batch_gradient:
            # G_B (and the step's losses) finite, checked before any target sees G_B: the 'train' target folds
            # it into its running average. Already in the gates when G_B is the training step's own .grad.
            if gates is not None:
                if not (isinstance(view, CapturedStep) and view.from_training_step):
                    gates = StepGates(gates.model, gates.batch & finite_flag([*view.batch_gradient.values(), *(losses or [])], device))
            else:
                batch_gradient_finite = all_finite([*view.batch_gradient.values(), *(losses or [])])
            if gates is None and distributed.world_size() > 1:
                # The per-sample losses are this rank's: the ranks skip together (a target's refresh is a collective).
                agreed = distributed.sum_scalars_over_ranks([float(batch_gradient_finite)])[0]
                batch_gradient_finite = agreed == distributed.world_size()
        target_gradients: dict[str, Params | None] = {}
        for target in self.targets:
            if isinstance(target, SelfTarget):
                target_gradients[target.name] = None
                continue
            if not batch_gradient_finite:
                self.skip_step(target.name, step, "the batch gradient G_B")
                continue
            if isinstance(target, TrainingLossTarget):
                usable = None if gates is None else gates.batch
                gradient = target.target_gradient(self.loss, params, step, device, view.batch_gradient, usable=usable)
            else:
                gradient = target.target_gradient(self.loss, params, step, device, {})
            # A dataset target's gradient changes only at a refresh, here or before the step's forward
            # (_product_stream), which says whether it was finite (a device flag; targets.py zeroes a non-finite
            # one). Under the device gates that flag gates the target's steps until its next refresh (no read
            # back, so no earlier retry); checked on the host, the step is skipped and the target refreshed again.
            # The 'train' target's fold is checked every step, unless the gates guard it.
            if isinstance(target, DatasetTarget):
                if gates is None and target.refreshed_at_step == step and not bool(target.gradient_finite):
                    self.skip_step(target.name, step, "the target gradient g_V")
                    target.refreshed_at_step = None  # refresh again next step
                    continue
            elif gates is None and not _all_finite(gradient):
                self.skip_step(target.name, step, "the target gradient g_V")
                continue
            target_gradients[target.name] = gradient
        early = self._early
        if early is not None:
            eps = early.eps  # (the same tensor finite_difference_step gives: theta has not moved since)
        else:
            eps = finite_difference_step(settings.eps, params) if settings.compute_second_order else torch.zeros(())
        if settings.compute_second_order:
            previous = self.record.last_eps
            # A gated step's eps may be non-finite (non-finite parameters): the last usable step's is reported.
            if gates is not None and isinstance(previous, Tensor):
                eps_reported = torch.where(gates.model, eps, previous)
            else:
                eps_reported = eps
            self.record.last_eps = eps_reported
        # Under DDP a sample weighs its share of the global update, eta / (W |B_r|).
        batch_size = distributed.effective_batch_size(batch_size)
        contributions = in_run_step(
            view,
            step=step,
            eta=eta,
            batch_size=batch_size,
            every_n_steps=settings.every_n_steps,
            target_gradients=target_gradients,
            compute_second_order=settings.compute_second_order,
            eps=eps,
            scheme=settings.finite_difference,
            passes=None if early is None else early.for_targets(target_gradients),
            clipped=clipped,
        )
        for name, contribution in contributions.items():
            # A non-finite propagation factor skips the step for its target inside the accumulator, counted
            # on the device (no host synchronisation here); see InfluenceAccumulator.nonfinite_factor_steps.
            if bad_samples is not None:
                nan = torch.full_like(contribution.first, float("nan"))
                contribution = Contribution(
                    torch.where(bad_samples, nan, contribution.first),
                    contribution.second,
                    contribution.factor,
                    contribution.target_gradient,
                )
            target = next(t for t in self.targets if t.name == name)
            usable = None if gates is None else gates.for_target(target)
            if usable is not None and isinstance(target, DatasetTarget) and target.gradient_finite is not None:
                usable = usable & target.gradient_finite
            self.accumulator.add(name, ids, contribution, float(settings.every_n_steps), eta, batch_size, step_usable=usable)

    def skip_step(self, name: str, step: int, what: str) -> None:
        """A non-finite step- or target-level quantity: this step gives target ``name`` nothing; counted."""
        skipped = self.record.nonfinite_steps_skipped
        skipped[name] = skipped.get(name, 0) + 1
        if (name, what) not in self._warned:
            self._warned.add((name, what))
            rank_zero_warn(
                f"DiffInCallback: {what} is non-finite at step {step}: the step is skipped for target {name!r} "
                "(nothing of it reaches the scores; later such steps are skipped without a warning and counted in the "
                "metadata's 'nonfinite_steps_skipped'). A diverging loss, an inf learning rate or an eps too small "
                "for the dtype can cause this."
            )

    def check_model_finite(self, step: int) -> bool:
        """Whether the parameters are finite (once they are not, no later step is scored).

        Reads back what the per-step gates found on the device (the first step with non-finite
        parameters), then checks the parameters as they are now.
        """
        if self.record.model_nonfinite_step is None and not _all_finite(self.loss.parameters()):  # (the read settles the device's)
            self.record.model_nonfinite_step = step
        first = self.record.model_nonfinite_step
        if first is not None and not self._model_nonfinite_warned:
            self._model_nonfinite_warned = True
            rank_zero_warn(
                f"DiffInCallback: the model's parameters are non-finite at step {first}; no later step can be scored. "
                "The files will say complete: false with the reason. Lower the learning rate or guard the loss."
            )
        return first is None

    # ------------------------------------------------------------------ the training step's own losses

    def record_training_losses(self) -> None:
        """Wrap the module's ``per_sample_loss`` so the training step's own per-sample losses are kept (recorded steps only)."""
        module = self.module
        original = getattr(type(module), "per_sample_loss", None)
        if original is None or self.settings.loss_fn is not None or "per_sample_loss" in vars(module):
            return

        def per_sample_loss(*args: Any, **kwargs: Any) -> Any:
            losses = original(module, *args, **kwargs)
            # Its capture is paused while another callback's extra pass (a target refresh before the step's
            # forward, say) runs this module: those losses are none of this step's.
            recording = self._in_training_step and self.capture is not None and self.capture.layers.enabled
            if recording and torch.is_grad_enabled() and isinstance(losses, Tensor):
                self.step_losses.append(losses.detach())
            return losses

        module.per_sample_loss = per_sample_loss  # type: ignore[method-assign]
        self._wrapped_loss = True

    def record_checkpoint(
        self,
        step: int,
        eta: float,
        batches: list[Any],
        ids: Tensor,
        weight: float,
        training_set: Callable[[], Iterable[tuple[Any, Tensor]]],
        clipped: bool = False,
    ) -> None:
        """schedule='checkpoints': score every training sample with this step's batch as the proxy batch (``clipped``: see record_step)."""
        try:
            with other_captures_paused(self.capture):
                self._record_checkpoint(step, eta, batches, ids, weight, training_set, clipped)
        finally:
            self._step_rng_states = []

    def _record_checkpoint(
        self,
        step: int,
        eta: float,
        batches: list[Any],
        ids: Tensor,
        weight: float,
        training_set: Callable[[], Iterable[tuple[Any, Tensor]]],
        clipped: bool,
    ) -> None:
        assert self.accumulator is not None and self.record.num_samples is not None
        # The same step-level guards as the in-run schedule: a non-finite model or learning rate leaves
        # nothing of this checkpoint that can be trusted; a non-finite target gradient drops that target.
        if not self.check_model_finite(step) or not math.isfinite(eta):
            what = "the model's parameters" if self.record.model_nonfinite_step is not None else f"the learning rate ({eta})"
            for target in self.targets:
                self.skip_step(target.name, step, what)
            self.record.steps_recorded += 1
            self.record.steps_represented += weight
            return
        self._seed_passes(step)
        loss = self.loss
        loss.replay_rng_states(self._step_rng_states)  # the checkpoint step's own batches: their training masks
        params = loss.parameters()
        proxy = RecomputedStep(loss, params, batches, int(ids.numel()), self.settings.self_chunk_size)
        target_gradients: dict[str, Params | None] = {}
        for target in self.targets:
            if isinstance(target, SelfTarget):
                target_gradients[target.name] = None
            elif isinstance(target, TrainingLossTarget):
                # The full-data gradient: one pass over the training set (each rank its share).
                target_gradients[target.name] = gradient_of_mean(loss, params, (b for b, _ in training_set()), across_ranks=True)
            else:
                # Checkpoints lie far apart: each one takes the target's gradient afresh.
                target_gradients[target.name] = target.fresh_gradient(loss, params, step, ids.device)
        for name in [name for name, gradient in target_gradients.items() if gradient is not None and not _all_finite(gradient)]:
            self.skip_step(name, step, "the target gradient")
            del target_gradients[name]
        eps = finite_difference_step(self.settings.eps, params)
        self.record.last_eps = eps
        try:
            for sample_ids, contributions in checkpoint_step(
                loss,
                params,
                proxy,
                step=step,
                eta=eta,
                num_samples=self.record.num_samples,
                target_gradients=target_gradients,
                compute_second_order=self.settings.compute_second_order,
                eps=eps,
                scheme=self.settings.finite_difference,
                training_set=training_set(),
                self_chunk_size=self.settings.self_chunk_size,
                clipped=clipped,
            ):
                for name, contribution in contributions.items():
                    self.accumulator.add(name, sample_ids, contribution, weight, eta, self.record.num_samples)
        finally:
            loss.clear_captures()
        self.record.steps_recorded += 1
        self.record.steps_represented += weight

    # ------------------------------------------------------------------ end of fit

    def compute_drift(self, step: int, device: torch.device, training_set: Iterable[tuple[Any, Tensor]]) -> None:
        """The target-drift correction of second_order='propagated', one pass over the training set.

        ``sum over visits of (eta/|B|) <g_V(theta_T) - g_V(theta_s), G_i>`` with ``G_i(theta_s)``
        approximated by ``G_i(theta_T)``: ``decayed_weight_i <g_V(theta_T), G_i> - <sum_t (eta_t/N)
        g_V(theta_t) (decayed), G_i>``, two per-sample dot products at the final parameters.
        """
        with other_captures_paused(self.capture):
            self._compute_drift(step, device, training_set)

    def _compute_drift(self, step: int, device: torch.device, training_set: Iterable[tuple[Any, Tensor]]) -> None:
        assert self.accumulator is not None
        self._seed_passes(step)
        loss = self.loss
        params = loss.parameters()
        finals: dict[str, Params] = {}
        for target in self.targets:
            if target.name not in self.accumulator.parameter_states or isinstance(target, SelfTarget):
                continue
            if isinstance(target, DatasetTarget):
                finals[target.name] = target.fresh_gradient(loss, params, step, device)
            else:
                finals[target.name] = target.current_estimate()
        for name in [name for name, gradient in finals.items() if not _all_finite(gradient)]:
            del finals[name]  # no drift correction without a finite final target gradient
            self.skip_step(name, step, "the final target gradient of the drift correction")
        if not finals:
            return
        sums = self.accumulator.sums
        drifts = {name: torch.zeros_like(sums[name]["decayed_weight"]) for name in finals}
        # Under DDP this rank's share of the training set holds samples visited on any rank:
        # each sample's visit weight is the sum over ranks.
        visit_weights = {name: sums[name]["decayed_weight"] for name in finals}
        if distributed.world_size() > 1:
            visit_weights = distributed.sum_over_ranks(visit_weights)
        names = list(finals)
        directions = [finals[n] for n in names] + [self.accumulator.parameter_states[n] for n in names]
        # Each layer's products taken as its output gradient arrives, its captures let go there (peak memory).
        stream = None
        if self.capture is not None and self.settings.stream_products:
            stream = ProductStream(directions=tuple(directions), max_materialised_elements=self.capture.layers.max_materialised_elements)
        for batch, ids in training_set:
            if self.capture is not None:
                # Only the dot products are read: no batch gradient (and none over ranks: shards may hold unequal batch counts).
                view = self._recaptured(
                    params, [MicroBatch(batch, int(ids.numel()))], contextlib.nullcontext, loss, across_ranks=False, products_only=True,
                    stream=stream,
                )
                dots = view.dots(directions)  # all directions through one matrix product per layer
                del view  # this batch's factors go before the next batch's pass, not after it (peak memory)
            else:
                dots = torch.stack([loss.dots(params, [batch], direction) for direction in directions])
            for k, name in enumerate(names):
                drift = drifts[name]
                toward_final, toward_past = dots[k].to(drift.dtype), dots[len(names) + k].to(drift.dtype)
                correction = visit_weights[name][ids] * toward_final - toward_past
                finite = torch.isfinite(correction)
                self.accumulator.nonfinite_samples[name] += (~finite).sum()
                drift.index_add_(0, ids, torch.where(finite, correction, 0))
        self.drift.update(drifts)



def _checked_products(view: CapturedStep, stream: ProductStream | None) -> list[Tensor]:
    """The products the first-step check compares: each kind the step's stream took (``<G_B, G_i>`` without one)."""
    if stream is None:
        return [view.gradient_dots()]
    return _stream_products(stream, view.gradient_dots, view.dots, view.squared_norms)


def _stream_products(
    stream: ProductStream, gradient_dots: Callable[[], Tensor], dots: Callable[[list[Any]], Tensor], squared_norms: Callable[[], Tensor]
) -> list[Tensor]:
    """Each kind of product ``stream`` takes, in one order (the check pairs the step's with its recomputation's)."""
    products = [gradient_dots()] if stream.gradient_dots else []
    if stream.directions:
        products.append(dots(list(stream.directions)))
    if stream.squared_norms or not products:
        products.append(squared_norms())
    return products


def _all_finite(tensors: dict[str, Tensor]) -> bool:
    return all_finite(tensors.values())
