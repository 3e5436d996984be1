"""Where the per-sample quantities of a step come from: the training step itself, or one recomputed pass.

The estimator (``diffin_lightning.step``) needs, for the samples ``i`` of an optimizer step
at the parameters ``theta`` it starts from:

- the batch gradient ``G_B``;
- ``<v, G_i>`` for a few directions ``v`` (the target gradients);
- ``<G_B, G_i>`` (``f_i``, whose finite difference is the Diff-In bracket) and ``|G_i|^2``;
- at a perturbed point ``theta + eps u``: ``f_i`` and ``<eps u, G_B>`` (the curvature along ``u``).
  Where every parameter is covered, that pass computes no parameter gradient for the layers
  whose ``f_i`` is in the Gram form and holds no parameter-sized buffer for the shift or ``G_B``.

:class:`CapturedStep` reads them from layer factors captured by :mod:`diffin_lightning.dots`
(each covered layer's inputs and output gradients; per layer the cheapest of the direct,
Gram and materialised forms), plus ``functional_dots`` for the parameters no rule covers and
only those. The factors come either from Lightning's own training step (hooks switched on
for recorded steps only; ``G_B`` is ``.grad`` as ``on_before_optimizer_step`` sees it) or from
:func:`capture_pass`, one forward+backward of the per-sample loss. Every extra pass runs the
module itself with its parameters moved in place and restored bit for bit, its buffers
restored, and each micro-batch's random state replayed, so dropout draws the training
step's own masks and batch-norm statistics never see the pass.

:class:`RecomputedStep` is the all-``torch.func`` path (``dot_products="functional"``).
Both give the estimator the :class:`StepGradients` interface. Under DDP each rank's view
holds its own shard's samples, while the batch gradients at ``theta`` and at the perturbed
point are the global batch's (``.grad`` already is; the recomputed and perturbed ones are
averaged over ranks, as DDP averages ``.grad``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from diffin_lightning import distributed
from diffin_lightning.dots import LayerCapture, PerSampleDots, functional_dots, functional_squared_norms, supported_layers_message
from diffin_lightning.precision import widened
from diffin_lightning.dots.stream import ProductStream
from diffin_lightning.per_sample import Params, PerSampleLoss

RngState = tuple[Tensor, Tensor | None]


class StepGradients(Protocol):
    """What the per-step maths reads from the model (every tensor on the model's device)."""

    batch_gradient: Params

    def dots(self, directions: Sequence[Params]) -> Tensor:
        """``[<v_d, G_i>]`` of shape ``[D, B]`` at ``theta``."""
        ...

    def gradient_dots(self) -> Tensor:
        """``[<G_B, G_i>]_i`` at ``theta``."""
        ...

    def squared_norms(self) -> Tensor:
        """``[|G_i|^2]_i`` at ``theta``."""
        ...

    def perturbed(self, shift: Params) -> tuple[Params, Tensor]:
        """``(G_B, [<G_B, G_i>]_i)`` at ``theta + shift``."""
        ...

    def perturbed_along(self, shift: ScaledShift, along: ScaledShift) -> tuple[Tensor, Tensor]:
        """``(<along, G_B>, [<G_B, G_i>]_i)`` at ``theta + shift``.

        What the Diff-In step needs from a perturbed point, without necessarily forming ``G_B`` there.
        """
        ...

    def release_theta(self, perturbed_passes_follow: bool = True) -> None:
        """Nothing more will be asked at ``theta`` except cached values: free what only served them.

        ``perturbed_passes_follow``: whether :meth:`perturbed_along` will be asked (what it needs
        from ``theta`` is kept; a first-order step skips preparing it).
        """
        ...


# ---------------------------------------------------------------------- random state


def save_rng_state(device: torch.device) -> RngState:
    """The generators a forward on ``device`` draws from (CPU, and the device's own on CUDA)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def replayed_rng(state: RngState | None, device: torch.device) -> Iterator[None]:
    """Run with the random state a training step started from, and leave the training's own RNG untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
        yield


# ---------------------------------------------------------------------- capture


@dataclass
class MicroBatch:
    """One micro-batch of a step: the batch, its sample count and the random state its training step started from."""

    batch: Any
    size: int
    rng: RngState | None = None


_CAPTURES: weakref.WeakSet[StepCapture] = weakref.WeakSet()


@contextlib.contextmanager
def other_captures_paused(own: StepCapture | None) -> Iterator[None]:
    """Keep every other callback's capture out of this callback's extra passes (several callbacks on one model).

    ``own`` ends disabled; the others get back the state they had.
    """
    states = [(capture, capture.layers.enabled) for capture in list(_CAPTURES) if capture is not own]
    for capture, _ in states:
        capture.layers.enabled = False
    try:
        yield
    finally:
        for capture, enabled in states:
            capture.layers.enabled = enabled


class StepCapture:
    """The capture hooks of :mod:`diffin_lightning.dots` on the model, switched on for recorded steps only.

    Args:
        module: the LightningModule.
        parameter_names: the trainable parameters' names.
    """

    def __init__(self, module: nn.Module, parameter_names: Sequence[str]) -> None:
        self.layers = LayerCapture(module, parameter_names)
        self.parameter_names = list(parameter_names)
        self.covered = tuple(self.layers.covered_parameter_names)
        self.uncovered = tuple(self.layers.uncovered_parameter_names)
        self.micro_batches: list[MicroBatch] = []
        _CAPTURES.add(self)

    def begin_micro_batch(self, batch: Any, size: int, rng: RngState | None, hooks: bool = True) -> None:
        """A recorded step's micro-batch is about to run its training step; ``hooks`` records its layers."""
        if not self.micro_batches:
            self.layers.clear()
        self.micro_batches.append(MicroBatch(batch, size, rng))
        self.layers.enabled = hooks

    def stop(self) -> None:
        self.layers.enabled = False

    def clear(self) -> None:
        self.layers.enabled = False
        self.layers.clear()
        self.micro_batches = []

    def remove(self) -> None:
        self.layers.remove()

    def fallback_message(self) -> str | None:
        """Which parameters go through the functional fallback and why (``None`` when all are covered)."""
        if not self.uncovered:
            return None
        # One reason per module (its parameters together), each naming the module by its path in the model.
        reasons = sorted(set(self.layers.uncovered_reasons.get(name, name) for name in self.uncovered))
        return (
            f"DiffInCallback: {len(self.uncovered)} of {len(self.parameter_names)} trainable parameters lie outside the "
            f"per-layer rules and use the functional fallback (jvp, or finite differences where forward-mode AD fails):"
            + "".join(f"\n  - {reason}" for reason in reasons[:6])
            + (f"\n  - and {len(reasons) - 6} more" if len(reasons) > 6 else "")
            + f"\nSupported layers: {supported_layers_message()}."
        )


# A dot product along a ScaledShift forms the share of a larger parameter in pieces of this many elements
# (1 MiB of float32): 4 pieces for the MLP's 1024 x 1024 weight, a dozen operations a recorded step.
DOT_CHUNK_ELEMENTS = 1 << 18


@dataclass(frozen=True)
class ScaledShift:
    """The shift ``step * direction / norm`` (``step`` and ``norm`` 0-d tensors), one parameter's share at a time.

    Each share is formed as ``(direction / norm) * step`` (the rounding of the unit direction
    times the step: the finite differences divide by ``eps`` and would magnify a different last
    bit into their eighth digit) in one scratch buffer (per dtype and device), as large as the largest parameter read,
    shared with the negated shift: the parameters are moved by it in place (the scratch is let go
    then, before the pass at the moved point) and its dot products read it. A parameter-sized
    copy of the shift is never held, and the step allocates one such buffer where it allocated
    three (a fresh 4 MB buffer cost 0.6-0.9 ms on the 256-1024-1024-10 MLP, its pages faulted in
    on first write, where an in-place update of the same size takes 0.1 ms). The per-sample
    products along it are ``scale`` times the direction's: no share at all.
    """

    direction: Params
    norm: Tensor
    step: Tensor
    # (dtype, device) -> scratch: parameters of several dtypes or devices each get their own.
    _scratch: dict[tuple[torch.dtype, torch.device], Tensor] = field(default_factory=dict, compare=False, repr=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.direction)

    @property
    def scale(self) -> Tensor:
        """``step / norm``, 0-d: the shift is ``scale * direction`` (up to rounding)."""
        return self.step / self.norm

    def negated(self) -> ScaledShift:
        return ScaledShift(self.direction, self.norm, -self.step, self._scratch)

    def _share(self, name: str) -> Tensor:
        """Parameter ``name``'s share, in the scratch buffer (valid until the next call)."""
        direction = self.direction[name]
        key = (direction.dtype, direction.device)
        scratch = self._scratch.get(key)
        if scratch is None or scratch.numel() < direction.numel():
            scratch = self._scratch[key] = direction.new_empty(direction.numel())
        share = scratch[: direction.numel()].view_as(direction)
        return torch.div(direction, self.norm, out=share).mul_(self.step)

    def _largest_first(self, names: Iterable[str]) -> list[str]:
        """The largest parameter first: the scratch is allocated once, at its final size."""
        return sorted(names, key=lambda name: -self.direction[name].numel())

    def _shares(self, names: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
        """``(name, share)`` for each name: the small parameters' shares formed together, the rest one at a time.

        On a GPU a small model's step is bound by the operations issued: one parameter at a time a
        share costs four (a transformer's biases and norms are most of its parameters), while the
        foreach operations form any number of them in two. They take fresh memory, so only the
        smallest parameters go together, as many as fit in the scratch's size (the largest
        parameter's): at most one more scratch, briefly. The elementwise operations are the
        same, so each share is the same to the bit. Each share is valid until the next one is read.
        """
        ordered = self._largest_first(names)
        largest = max((self.direction[name].numel() for name in self.direction), default=0)
        together: list[str] = []
        room = largest
        for name in reversed(ordered):
            size = self.direction[name].numel()
            if size > room or len(ordered) - len(together) <= 1:
                break
            together.append(name)
            room -= size
        alone = ordered[: len(ordered) - len(together)]
        for name in alone:
            yield name, self._share(name)
        if together:
            shares = torch._foreach_div([self.direction[name] for name in together], self.norm)
            torch._foreach_mul_(shares, self.step)
            yield from zip(together, shares)

    def add_to(self, parameters: Mapping[str, Tensor]) -> None:
        """``parameters[name] += shift[name]`` in place, for every name of the shift.

        The scratch is let go after: a whole pass at the moved point follows, whose peak it would raise.
        """
        for name, share in self._shares(self.direction):
            parameters[name].add_(share)
        self._scratch.clear()

    def release_scratch(self) -> None:
        """Let the scratch buffer go (a shift kept for later holds no memory meanwhile; the next share allocates it)."""
        self._scratch.clear()

    def materialised(self) -> Params:
        """The whole shift as a parameter dictionary (for the passes that need it as one)."""
        return {name: self._share(name).clone() for name in self.direction}

    def dot(self, other: Mapping[str, Tensor]) -> Tensor:
        """``<shift, other>`` over ``other``'s names (a subset of the shift's), a 0-d tensor; zero for none.

        A parameter larger than :data:`DOT_CHUNK_ELEMENTS` has its share formed and read a chunk at
        a time (each element rounded as in :meth:`_share`): a dot product needs no share as large as
        the largest parameter, whose scratch beside the training step's ``.grad`` was a Diff-In
        step's peak once its perturbed passes ran ahead of the forward.
        """
        if not other:
            return self.norm.new_zeros(())
        large = [name for name in other if self.direction[name].numel() > DOT_CHUNK_ELEMENTS]
        parts = {name: self._chunked_dot(name, other[name]) for name in large}
        parts.update((name, torch.dot(_flat(share), _flat(other[name]))) for name, share in self._shares([n for n in other if n not in parts]))
        return torch.stack([parts[name] for name in other]).sum()  # summed in the caller's order

    def _chunked_dot(self, name: str, other: Tensor) -> Tensor:
        direction, other = _flat(self.direction[name]), _flat(other)
        scratch = direction.new_empty(DOT_CHUNK_ELEMENTS)
        total = direction.new_zeros(())
        for start in range(0, direction.numel(), DOT_CHUNK_ELEMENTS):
            piece = direction[start : start + DOT_CHUNK_ELEMENTS]
            share = torch.div(piece, self.norm, out=scratch[: piece.numel()]).mul_(self.step)
            total = total + torch.dot(share, other[start : start + DOT_CHUNK_ELEMENTS])
        return total

    def per_sample_dots(self, per_sample: PerSampleDots, only: Iterable[str]) -> Tensor:
        """``[<shift, G_i>]_i`` over the parameters in ``only`` (their layers' per-sample products)."""
        return per_sample.dots([self.direction], only=set(only))[0] * self.scale


def _flat(tensor: Tensor) -> Tensor:
    """``tensor`` as a vector (no operation issued for one that is already one)."""
    return tensor if tensor.dim() == 1 else tensor.reshape(-1)


@contextlib.contextmanager
def module_moved_to(module: nn.Module, shift: Params | ScaledShift | None) -> Iterator[dict[str, Tensor]]:
    """The module's own parameters moved by ``shift`` in place, and its parameters and buffers restored bit for bit after.

    The capture rules read parameters from the modules (attention's rule copies its
    projections), so the extra passes run the module itself rather than a functional
    copy. Buffers (batch-norm statistics) are restored too: training never sees these passes.
    """
    parameters = dict(module.named_parameters())
    buffers = [b for b in module.buffers()]
    saved_buffers = [b.clone() for b in buffers]
    names = [] if shift is None else list(shift)
    with torch.no_grad():  # copies that autograd does not track, without a detach per parameter
        saved = [parameters[name].clone() for name in names]
    try:
        with torch.no_grad():
            if isinstance(shift, ScaledShift):
                shift.add_to(parameters)
            elif names:
                torch._foreach_add_([parameters[name] for name in names], [shift[name] for name in names])  # type: ignore[index]
        yield parameters
    finally:
        with torch.no_grad():
            if names:
                torch._foreach_copy_([parameters[name] for name in names], saved)
            if buffers:
                torch._foreach_copy_(buffers, saved_buffers)


def capture_pass(
    capture: StepCapture,
    loss: PerSampleLoss,
    names: Sequence[str],
    shift: Params | ScaledShift | None,
    micro_batches: Sequence[MicroBatch],
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    summed_gradient: bool | Sequence[str] | Literal["held"] = True,
    stream: ProductStream | None = None,
) -> tuple[Params, PerSampleDots]:
    """One forward and backward of the summed per-sample losses at ``theta + shift`` with the capture on.

    Each micro-batch replays its training step's random state (dropout draws its masks). Returns
    ``(G_sum, per-sample products)``; the parameters' ``.grad`` is never touched
    (``torch.autograd.grad``). ``summed_gradient`` says which parameter gradients ``G_sum``
    holds: all of ``names`` (``True``), none (``False``: the backward stops at the covered
    layers' outputs, ``G_sum`` is ``{}``, the products alone), or the names given (the other
    layers' products come from their output gradients, their weight products are skipped).
    ``stream``: take those products during the backward (:meth:`LayerCapture.stream_products`);
    with ``summed_gradient="held"`` (one micro-batch), ``G_sum`` holds the parameters of the
    calls the stream cannot take, decided after the forward, and no other.
    """
    held = summed_gradient == "held"
    if held:
        if len(micro_batches) != 1 or stream is None:
            raise ValueError("capture_pass: summed_gradient='held' needs one micro-batch and a stream.")
        wanted: list[str] = []
    elif isinstance(summed_gradient, bool):
        wanted = list(names) if summed_gradient else []
    else:
        asked = set(summed_gradient)
        wanted = [name for name in names if name in asked]
    summed: list[Tensor] | None = None
    with module_moved_to(loss.module, shift) as parameters:
        leaves = [parameters[name] for name in wanted]
        device = next(iter(parameters.values())).device
        capture.layers.clear()
        capture.layers.stream_products(stream)
        capture.layers.enabled = True
        capture.layers.keep_outputs = held or len(wanted) < len(names)
        try:
            for mb in micro_batches:
                with replayed_rng(mb.rng, device), forward_context(), torch.enable_grad():
                    losses = loss.module_values(mb.batch)
                    if held:
                        asked = capture.layers.held_parameter_names()
                        wanted = [name for name in names if name in asked]
                        leaves = [parameters[name] for name in wanted]
                    # The covered layers' outputs as inputs of the backward fire every capture hook
                    # even where no parameter gradient below them is asked for.
                    outputs = capture.layers.take_outputs() if capture.layers.keep_outputs else []
                    if leaves:
                        part = list(torch.autograd.grad(losses.sum(), leaves + outputs, allow_unused=True)[: len(leaves)])
                    elif outputs:
                        torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
                    # The layers' outputs and the losses (the graph's root) go now, not after the
                    # factors are built: held, they keep every layer's output alive (peak memory).
                    del outputs, losses
                    if not leaves:
                        continue
                part = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, part)]
                if summed is None:
                    summed = list(part)
                else:
                    torch._foreach_add_(summed, part)
        finally:
            capture.layers.enabled = False
            capture.layers.keep_outputs = False
        # Before the parameters move back: attention's rule keeps a copy of its projections.
        per_sample = capture.layers.per_sample(backprop_scale=1.0)
    capture.layers.clear()
    if not wanted:
        return {}, per_sample
    assert summed is not None, "capture_pass needs at least one micro-batch"
    return dict(zip(wanted, summed)), per_sample


class CapturedStep:
    """A step's per-sample quantities from captured layer factors, plus the functional fallback for the rest.

    Args:
        capture: the hooks (the perturbed pass reuses them).
        loss: the per-sample loss (unseeded: each pass replays its micro-batch's random state).
        params: ``theta`` (the module's trainable parameters, detached).
        micro_batches: the step's micro-batches.
        per_sample: the covered layers' products at ``theta``, scaled to the samples' own gradients.
        batch_gradient: ``G_B``.
        forward_context: the precision context the training step's forward ran in.
        self_chunk_size: vmap chunk for the fallback's squared norms.
        stream_perturbed: perturbed passes of one micro-batch take their products during their
            backward (``DiffInSettings.stream_products``).
    """

    def __init__(
        self,
        capture: StepCapture,
        loss: PerSampleLoss,
        params: Params,
        micro_batches: Sequence[MicroBatch],
        per_sample: PerSampleDots,
        batch_gradient: Params,
        forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        self_chunk_size: int | None = None,
        stream_perturbed: bool = False,
    ) -> None:
        self.capture, self.loss, self.params = capture, loss, params
        self.micro_batches = list(micro_batches)
        self.per_sample = per_sample
        self.batch_gradient = batch_gradient
        self.batch_size = sum(mb.size for mb in self.micro_batches)
        self.forward_context = forward_context
        self.self_chunk_size = self_chunk_size
        self._gradient_dots: Tensor | None = None
        self._gram_form_parameters: set[str] | None = None
        self.from_training_step = False  # set by the recorder when the factors are the training step's own
        self.stream_perturbed = stream_perturbed

    def _losses_at(self, mb: MicroBatch) -> Callable[[Params], Tensor]:
        device = next(iter(self.params.values())).device

        def losses(point: Params) -> Tensor:
            with replayed_rng(mb.rng, device), self.forward_context():
                return self.loss.values(point, mb.batch)

        return losses

    def _fallback_dots(self, point: Params, directions: Sequence[Params]) -> Tensor | None:
        if not self.capture.uncovered:
            return None
        parts = [functional_dots(self._losses_at(mb), point, directions, only=self.capture.uncovered) for mb in self.micro_batches]
        return torch.cat(parts, dim=1)

    def dots(self, directions: Sequence[Params]) -> Tensor:
        out = self.per_sample.dots(directions) if self.capture.covered else None
        fallback = self._fallback_dots(self.params, directions)
        assert out is not None or fallback is not None
        return fallback if out is None else (out if fallback is None else out + fallback.to(out.dtype))

    def gradient_dots(self) -> Tensor:
        if self._gradient_dots is None:
            assert self.per_sample is not None, "gradient_dots at theta asked after release_theta()"
            self._gradient_dots = self._f(self.per_sample, self.params, self.batch_gradient)
        return self._gradient_dots

    def release_theta(self, perturbed_passes_follow: bool = True) -> None:
        # The captured activations and output gradients of the training step (about the size of its
        # activations) are not needed by the perturbed passes; the recorder already cleared the capture.
        # The perturbed passes see the same shapes: the layers' forms for f_i are decided here (the cost
        # model over every layer: 0.5 ms a step on the CNN, a tenth of its training step, so only when asked).
        if perturbed_passes_follow and self.per_sample is not None and self._gram_form_parameters is None:
            self._gram_form_parameters = self.per_sample.gram_form_parameters()
        self.per_sample = None  # type: ignore[assignment]

    def _f(self, per_sample: PerSampleDots, point: Params, gradient: Params) -> Tensor:
        """``<G_B, G_i>`` at ``point``: Gram or direct form on the covered layers, the fallback on the rest."""
        out = None
        if self.capture.covered:
            # The direct and materialised forms read `gradient` as the sum: handed the mean and its scale
            # instead of a parameter-sized copy of the sum.
            mean = {n: gradient[n] for n in self.capture.covered}
            # Under DDP G_B is the global batch's: the Gram form would sum this rank's samples only
            # (it never reads `gradient`), so the direct form, which does, is used there.
            form = "direct" if distributed.world_size() > 1 else None
            out = per_sample.gradient_dots(form=form, gradient=mean, gradient_scale=float(self.batch_size)) / self.batch_size
        fallback = self._fallback_dots(point, [gradient])
        if fallback is not None:
            out = fallback[0] if out is None else out + fallback[0].to(out.dtype)
        assert out is not None
        return out

    def squared_norms(self) -> Tensor:
        out = self.per_sample.squared_norms() if self.capture.covered else None
        if self.capture.uncovered:
            parts = []
            for mb in self.micro_batches:
                with replayed_rng(mb.rng, next(iter(self.params.values())).device), self.forward_context():
                    parts.append(
                        functional_squared_norms(
                            lambda p, b: self.loss.values(p, b), self.params, mb.batch, only=self.capture.uncovered, chunk_size=self.self_chunk_size
                        )
                    )
            fallback = torch.cat(parts)
            out = fallback if out is None else out + fallback.to(out.dtype)
        assert out is not None
        return out

    def perturbed(self, shift: Params | ScaledShift) -> tuple[Params, Tensor]:
        if self.capture.uncovered and isinstance(shift, ScaledShift):
            shift = shift.materialised()  # the fallback's functional pass reads the moved point as one dictionary
        # (A ScaledShift moves the module's parameters one share at a time: no parameter-sized copy of the shift.)
        summed, per_sample = capture_pass(self.capture, self.loss, list(self.params), shift, self.micro_batches, self.forward_context)
        point = self.params
        if self.capture.uncovered:
            assert not isinstance(shift, ScaledShift)
            point = dict(zip(self.params, torch._foreach_add(list(self.params.values()), [shift[n] for n in self.params])))
        torch._foreach_div_(list(summed.values()), float(self.batch_size))  # the mean, in place (no copy)
        gradient = distributed.mean_over_ranks(summed)  # the global batch's, like .grad
        return gradient, self._f(per_sample, point, gradient)

    def perturbed_along(self, shift: ScaledShift, along: ScaledShift) -> tuple[Tensor, Tensor]:
        if self.capture.uncovered or distributed.world_size() > 1:
            # The fallback reads G_B at the point as a direction, and under DDP f_i needs the global
            # batch's G_B: both need the parameter gradient itself.
            gradient, f = self.perturbed(shift)
            return along.dot(gradient), f
        if self.stream_perturbed and len(self.micro_batches) == 1:
            return self._streamed_perturbed_along(shift, along)
        # Every parameter is covered. The layers whose f_i is taken in the Gram form never read G_B:
        # their backward stops at their outputs (no weight gradient, no buffer of their size) and
        # their share of <along, G_B> is the sum of their per-sample products. The others (a
        # convolution's G_B is cheaper from autograd than from its unfolded inputs) get their gradient.
        gram = self._gram_form_parameters or set()
        needed = [name for name in self.params if name not in gram]
        summed, per_sample = capture_pass(
            self.capture, self.loss, list(self.params), shift, self.micro_batches, self.forward_context, summed_gradient=needed
        )
        along_dots = along.dot(summed)
        if gram:
            along_dots = along_dots + along.per_sample_dots(per_sample, gram).sum()
        f = per_sample.gradient_dots(gradient=summed)  # the Gram-form layers, absent from `summed`, use their factors
        return along_dots / self.batch_size, f / self.batch_size

    def _streamed_perturbed_along(self, shift: ScaledShift, along: ScaledShift) -> tuple[Tensor, Tensor]:
        """:meth:`perturbed_along` with every layer's products taken as its output gradient arrives.

        Each taken layer's captures go during the backward (the pass's peak is then about a plain
        step's); autograd forms no weight gradient for those layers, whose ``G_sum`` is built
        from their factors instead where their form reads it (the same cost). Only the layers a
        stream cannot take alone (tied, called twice, small) get their gradient from autograd;
        eager layers (normalisation) use their own factors.
        """
        stream = ProductStream(along=along, max_materialised_elements=self.capture.layers.max_materialised_elements)
        summed, per_sample = capture_pass(
            self.capture, self.loss, list(self.params), shift, self.micro_batches, self.forward_context, summed_gradient="held", stream=stream
        )
        along_dots = along.dot(summed)
        taken = per_sample.streamed_along()
        if taken is not None:
            along_dots = along_dots + taken
        rest = set(self.capture.covered) - set(summed) - per_sample.streamed_parameters()
        if rest:  # eager layers (and any a stream did not reach): their share of <along, G_B> from their per-sample products
            along_dots = along_dots + along.per_sample_dots(per_sample, rest).sum()
        f = per_sample.gradient_dots(gradient=summed)
        return along_dots / self.batch_size, f / self.batch_size


class RecomputedStep:
    """A step's per-sample quantities recomputed at ``theta`` with ``torch.func`` (seeded RNG).

    Args:
        loss: the per-sample loss, its ``seed`` set for this step.
        params: ``theta``.
        batches: the step's micro-batches.
        batch_size: ``|B|``.
        self_chunk_size: ``vmap`` chunk for squared norms.
    """

    def __init__(self, loss: PerSampleLoss, params: Params, batches: list[Any], batch_size: int, self_chunk_size: int | None = None) -> None:
        self.loss, self.params, self.batches, self.batch_size = loss, params, batches, batch_size
        self.self_chunk_size = self_chunk_size
        self._batch_gradient: Params | None = None
        self._gradient_dots: Tensor | None = None

    @property
    def batch_gradient(self) -> Params:  # type: ignore[override]
        if self._batch_gradient is None:
            local = self.loss.batch_gradient(self.params, self.batches, self.batch_size)
            self._batch_gradient = distributed.mean_over_ranks(local)  # the global batch's, as DDP's step uses
        return self._batch_gradient

    def dots(self, directions: Sequence[Params]) -> Tensor:
        return torch.stack([self.loss.dots(self.params, self.batches, direction) for direction in directions])

    def gradient_dots(self) -> Tensor:
        if self._gradient_dots is None:
            self._gradient_dots = self.loss.dots(self.params, self.batches, self.batch_gradient)
        return self._gradient_dots

    def squared_norms(self) -> Tensor:
        return self.loss.squared_gradient_norms(self.params, self.batches, self.self_chunk_size)

    def release_theta(self, perturbed_passes_follow: bool = True) -> None:
        return None

    def perturbed(self, shift: Params) -> tuple[Params, Tensor]:
        point = {name: value + shift[name] for name, value in self.params.items()}
        gradient = distributed.mean_over_ranks(self.loss.batch_gradient(point, self.batches, self.batch_size))
        return gradient, self.loss.dots(point, self.batches, gradient)

    def perturbed_along(self, shift: ScaledShift, along: ScaledShift) -> tuple[Tensor, Tensor]:
        gradient, f = self.perturbed(shift.materialised())
        return along.dot(gradient), f


# ---------------------------------------------------------------------- checks


def relative_difference(a: Params, b: Params) -> float:
    """``|a - b| / max(|b|, tiny)`` over all parameters (one host sync; used once per run).

    Per-parameter norms in the parameters' dtype (one difference of one parameter at a time, no
    float64 copies: they set the peak memory of a first-order run), combined in float64 (float32 on MPS).
    """
    difference = torch.stack([widened(torch.linalg.vector_norm(a[k] - b[k])) for k in b]).norm()
    scale = torch.stack([widened(torch.linalg.vector_norm(b[k])) for k in b]).norm()
    return float(difference / scale.clamp_min(1e-300))


# ---------------------------------------------------------------------- batched passes


def gradient_of_mean(loss: PerSampleLoss, params: Params, batches: Iterable[Any], across_ranks: bool = False) -> Params:
    """``grad (1/n) sum_i l_i`` over every sample of ``batches``: one plain forward+backward per batch, summed in place.

    With ``across_ranks``, ``batches`` are this rank's shard (possibly empty) and the mean is
    over every rank's samples together: the sums and counts are added over ranks first.
    """
    names = list(params)
    leaves = [params[name].detach().requires_grad_(True) for name in names]
    point = dict(zip(names, leaves))
    count = 0
    for batch in batches:
        with torch.enable_grad():
            losses = loss.values(point, batch)
            # Summed into the leaves' .grad as the backward produces each parameter's part (autograd adds
            # in place): never a whole parameter-sized gradient beside the running sum, which the sum of
            # returned gradients held (one parameter set of transient memory at every refresh).
            torch.autograd.backward(losses.sum(), inputs=leaves)
        count += int(losses.shape[0])
    # No samples: no gradient (an empty shard contributes zeros to the sum over ranks; alone, an error below).
    total = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves] if count else None
    if across_ranks:
        summed, count = distributed.sum_with_count_over_ranks(None if total is None else dict(zip(names, total)), count, params)
        total = [summed[name] for name in names]
    if total is None or count == 0:
        raise ValueError("the target yielded no samples; a gradient needs at least one.")
    torch._foreach_div_(total, float(count))
    return dict(zip(names, total))


def training_set_batches(dataset: Any, batch_size: int, device: torch.device, collate: Callable[[list[Any]], Any] | None = None) -> Iterator[Any]:
    """The training set in id order, ``batch_size`` samples at a time, each batch moved to ``device``.

    ``collate``: the training loader's ``collate_fn`` (the batches must look like the training
    step's; ``None`` or PyTorch's default: the default). An ``IndexedDataset`` over a
    ``TensorDataset`` with the default collate is sliced directly (no per-sample Python
    ``__getitem__``, the same batches the default collate makes); anything else goes through a
    ``DataLoader`` with ``collate``. Under DDP, this rank's share (every W-th sample): a pass over
    the training set runs once in total, not once per rank.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

    from diffin_lightning.data import INDEX_KEY, IndexedDataset

    if collate is default_collate:
        collate = None
    world, rank = distributed.world_size(), distributed.rank()
    inner = dataset.dataset if isinstance(dataset, IndexedDataset) else None
    if isinstance(inner, TensorDataset) and len(inner.tensors) == 2 and collate is None:
        inputs, targets = inner.tensors
        if world == 1:
            for start in range(0, len(inner), batch_size):
                stop = min(start + batch_size, len(inner))
                batch = {INDEX_KEY: torch.arange(start, stop), "input": inputs[start:stop], "target": targets[start:stop]}
                yield move_data_to_device(batch, device)
            return
        shard = torch.arange(rank, len(inner), world)
        for start in range(0, len(shard), batch_size):
            ids = shard[start : start + batch_size]
            yield move_data_to_device({INDEX_KEY: ids, "input": inputs[ids], "target": targets[ids]}, device)
        return
    if world > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world))  # a range, not a list of N/W Python ints
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **({"collate_fn": collate} if collate else {}))
    for batch in loader:
        yield move_data_to_device(batch, device)


def number_of_batches(dataset: Any, batch_size: int) -> int:
    """How many batches :func:`training_set_batches` yields on rank zero (the largest shard)."""
    return math.ceil(math.ceil(len(dataset) / distributed.world_size()) / batch_size)

