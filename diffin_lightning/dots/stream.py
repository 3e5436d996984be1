"""Per-sample products taken inside the backward, as each layer's output gradient arrives.

Held to the end of the backward, every covered layer's input and output gradient is about
one more copy of the model's activations (the transformer benchmark's first-order step
peaked at 73 MB against plain training's 33 MB, live). Where the directions are known before
the backward (a dataset target's gradient, refreshed before the forward), a layer's products
can be taken as soon as its output gradient arrives and its captures let go there. This
module says what to take (:class:`ProductStream`) and holds what was taken
(:class:`StreamedProducts`); :class:`~diffin_lightning.dots.capture.LayerCapture` decides
which calls may be taken (one output, one call of the module in the pass, no parameter
shared with another module) and :class:`~diffin_lightning.dots.per_sample_dots.PerSampleDots`
adds the taken products to the held layers'.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

from diffin_lightning.dots.factors import LayerFactors
from diffin_lightning.dots.per_sample_dots import DEFAULT_MAX_MATERIALISED_ELEMENTS, PerSampleDots
from diffin_lightning.precision import widened


# Where a taken layer's G_sum comes from, where its <G_sum, G_i> form reads it (the Gram form never does):
# "gram": nowhere, such a layer is held; "accumulated": its parameters' .grad, the call deferred until
# autograd has accumulated them (the training step's own backward of one micro-batch, .grad zeroed before);
# "factors": built from its own factors (a pass that computes no weight gradient of its own, or a check).
GradientSource = Literal["gram", "accumulated", "factors"]
Decision = Literal["now", "defer", "hold"]

# A call whose output has fewer elements than this is held even with a stream: taken alone, a layer costs a
# few Python calls (about 0.1 ms: a tenth of the bundled CNN's 2 ms step over its three layers) and saves
# at most its output's memory (2**17 float32 = 512 KiB); held, its products come in one call with the rest.
DEFAULT_MIN_STREAMED_ELEMENTS = 1 << 17


class Along(Protocol):
    """A perturbed pass's direction with its dot products and per-sample products (``engine.ScaledShift``)."""

    def __iter__(self) -> Iterator[str]: ...

    def dot(self, other: Mapping[str, Tensor]) -> Tensor: ...

    def per_sample_dots(self, per_sample: PerSampleDots, only: Iterable[str]) -> Tensor: ...


@dataclass(kw_only=True)
class ProductStream:
    """What to take from each layer during one step's backward.

    Attributes:
        directions: the D directions of ``<V_d, G_i>``, parameter dictionaries holding every
            covered parameter. :meth:`PerSampleDots.dots` later answers for these very
            objects (by identity), in any order or subset.
        squared_norms: also ``|G_i|^2``.
        gradient_dots: also ``<G_sum, G_i>``. Only the Gram form can take it from the output
            gradient alone; the other forms read ``G_sum``, which ``gradient_source`` says where
            to find (see :data:`GradientSource`).
        gradient_source: ``"gram"``, ``"accumulated"`` or ``"factors"``.
        min_elements: calls whose output has fewer elements are held (see
            :data:`DEFAULT_MIN_STREAMED_ELEMENTS`).
        second_order: a perturbed pass follows; each taken layer records whether its
            ``<G_sum, G_i>`` would take the Gram form (that pass then skips its weight gradient).
        max_materialised_elements: the cost model's cap on materialised per-sample gradients.
        along: a perturbed pass's direction. Such a pass computes no parameter gradient of its
            own for the layers taken (their backward stops at their outputs), so every layer can
            be taken: its ``G_sum`` is built from its factors where its form reads it (the cost
            autograd's weight gradient would have had), and ``<G_sum, G_i>`` (whatever the form)
            and ``<along, G_sum>`` (:attr:`StreamedProducts.along`) are taken.
        gradient_check: a batch gradient (the mean) to compare each taken layer's ``G_sum / B``
            with, built from its factors and let go there (:attr:`StreamedProducts.check`): the
            first recorded step's check of the training step's ``.grad`` without a parameter-sized
            recomputed gradient beside it.
    """

    directions: tuple[Mapping[str, Tensor], ...] = ()
    squared_norms: bool = False
    gradient_dots: bool = False
    gradient_source: GradientSource = "gram"
    second_order: bool = False
    max_materialised_elements: int = DEFAULT_MAX_MATERIALISED_ELEMENTS
    along: Along | None = None
    gradient_check: Mapping[str, Tensor] | None = None
    min_elements: int = field(default_factory=lambda: DEFAULT_MIN_STREAMED_ELEMENTS)
    # Set by the capture that runs the stream: modules whose parameters another covered module shares.
    shared_modules: frozenset[str] = frozenset()

    def _single(self, block: LayerFactors, parameter_names: Sequence[str]) -> PerSampleDots:
        single = PerSampleDots([[block]], [block.batch_size], parameter_names, self.max_materialised_elements)
        # Only the directions' products asked (the end-of-fit pass): materialised gradients would serve nothing else.
        single.keep_materialised = not self._dots_only
        return single

    @property
    def _dots_only(self) -> bool:
        return not (self.squared_norms or self.gradient_dots or self.second_order or self.along is not None)

    def decision(self, blocks: Sequence[LayerFactors], parameter_names: Sequence[str]) -> Decision:
        """Take a call's blocks now, once its parameters' ``.grad`` has accumulated, or hold them to the end of the backward."""
        if not self.gradient_dots or self.along is not None or self.gradient_source == "factors":
            return "now"
        if all(self._gram(self._single(block, parameter_names)) for block in blocks):
            return "now"
        return "defer" if self.gradient_source == "accumulated" else "hold"

    @staticmethod
    def _gram(single: PerSampleDots) -> bool:
        return single.plan("gradient_dots", gradient_given=True)[0][1] == "gram"

    def take(
        self, blocks: Sequence[LayerFactors], parameter_names: Sequence[str], gradient: Mapping[str, Tensor] | None = None
    ) -> StreamedProducts:
        """The blocks' products, summed (from unscaled output gradients: :meth:`StreamedProducts.scaled` rescales).

        ``gradient``: the blocks' parameters' ``.grad`` (a deferred call), read as ``G_sum`` up to
        the output gradients' scale: ``.grad = G_sum / s`` when the captured gradients are the
        samples' own divided by ``s``, so ``<.grad, G_i / s>`` scales by ``s^2`` like the Gram form.
        """
        total = StreamedProducts(blocks[0].batch_size, self.directions)
        for block in blocks:
            single = self._single(block, parameter_names)
            if self.along is not None:
                total.add(self._perturbed(block, single))
                continue
            part = StreamedProducts(
                block.batch_size,
                self.directions,
                dots=single.dots(self.directions) if self.directions else None,
                norms=single.squared_norms() if self.squared_norms else None,
                gradient_dots=self._gradient_dots(single, gradient) if self.gradient_dots else None,
                layers=1,
                gram_parameters=set(block.slices) if self.second_order and self._gram(single) else set(),
                parameters=set(block.slices),
            )
            if self.gradient_check is not None:
                part.check = gradient_gap_parts(single.summed_gradient(block.slices), self.gradient_check, block.batch_size, block.slices)
            total.add(part)
        return total

    def _gradient_dots(self, single: PerSampleDots, gradient: Mapping[str, Tensor] | None) -> Tensor:
        if gradient is not None:
            return single.gradient_dots(gradient=gradient)
        if self.gradient_source == "factors":
            return single.gradient_dots()  # the cheapest form, building G_sum from the factors where it reads it
        return single.gradient_dots(form="gram")

    def _perturbed(self, block: LayerFactors, single: PerSampleDots) -> StreamedProducts:
        assert self.along is not None
        f = single.gradient_dots()  # the cheapest form, building G_sum from the factors where it reads it
        built = single.built_summed_gradient()
        if all(name in built for name in block.slices):
            along = self.along.dot({name: built[name] for name in block.slices})
        else:  # the Gram form: no G_sum; <along, G_sum> is the sum of the per-sample products
            along = self.along.per_sample_dots(single, block.slices).sum()
        return StreamedProducts(block.batch_size, (), gradient_dots=f, layers=1, parameters=set(block.slices), along=along)


def gradient_gap_parts(summed: Mapping[str, Tensor], mean: Mapping[str, Tensor], size: int, rows: Mapping[str, slice | None] | None = None) -> Tensor:
    """``[|G_sum / size - mean|^2, |G_sum / size|^2]`` (float64; float32 on MPS) over ``summed``'s parameters.

    ``rows``: per parameter, the rows a block answers for (a projection's share of a stacked
    weight), ``None`` for all. ``summed`` is consumed: each tensor is turned into its difference
    in place (no second copy of a layer's gradient), so it must be the caller's own.
    """
    parts = []
    for name, whole in summed.items():
        part_rows = None if rows is None else rows.get(name)
        gradient = whole if part_rows is None else whole[part_rows]
        reference_mean = mean[name] if part_rows is None else mean[name][part_rows]
        gradient.div_(size)
        reference = widened(torch.linalg.vector_norm(gradient))
        parts.append(torch.stack([widened(torch.linalg.vector_norm(gradient.sub_(reference_mean))) ** 2, reference**2]))
    return torch.stack(parts).sum(dim=0)


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


@dataclass
class StreamedProducts:
    """The products of the layers taken during one pass's backward, summed over those layers.

    Attributes:
        batch_size: the pass's samples.
        directions: what ``dots`` rows stand for (the stream's directions, by identity).
        dots: ``[D, B]`` or ``None``; norms, gradient_dots: ``[B]`` or ``None``.
        layers: how many layer blocks were taken (zero: nothing to add).
        gram_parameters: parameters of the taken layers whose ``<G_sum, G_i>`` takes the Gram form.
        parameters: the taken layers' parameters.
        along: ``<along, G_sum>`` over the taken layers (0-d), for a perturbed pass's stream.
    """

    batch_size: int
    directions: tuple[Mapping[str, Tensor], ...]
    dots: Tensor | None = None
    norms: Tensor | None = None
    gradient_dots: Tensor | None = None
    layers: int = 0
    gram_parameters: set[str] = field(default_factory=set)
    parameters: set[str] = field(default_factory=set)
    along: Tensor | None = None
    check: Tensor | None = None  # [|G_sum/B - mean|^2, |G_sum/B|^2] over the taken layers (ProductStream.gradient_check)

    def add(self, other: StreamedProducts) -> None:
        self.dots = _plus(self.dots, other.dots)
        self.norms = _plus(self.norms, other.norms)
        self.gradient_dots = _plus(self.gradient_dots, other.gradient_dots)
        self.layers += other.layers
        self.gram_parameters |= other.gram_parameters
        self.parameters |= other.parameters
        self.along = _plus(self.along, other.along)
        self.check = _plus(self.check, other.check)

    def scaled(self, scale: float | Tensor) -> StreamedProducts:
        """The products for output gradients multiplied by ``scale`` (dots scale once, the quadratic ones twice)."""
        square = scale * scale
        if self.check is not None and not (isinstance(scale, float) and scale == 1.0):
            raise ValueError("StreamedProducts: a gradient check compares G_sum itself; its pass's output gradients must be the samples' own (scale 1).")
        return StreamedProducts(
            self.batch_size,
            self.directions,
            None if self.dots is None else self.dots * scale,
            None if self.norms is None else self.norms * square,
            None if self.gradient_dots is None else self.gradient_dots * square,
            self.layers,
            set(self.gram_parameters),
            set(self.parameters),
            None if self.along is None else self.along * scale,
            self.check,
        )

    def reference(self) -> Tensor | None:
        for value in (self.dots, self.norms, self.gradient_dots):
            if value is not None:
                return value
        return None

    def rows(self, directions: Sequence[Mapping[str, Tensor]]) -> Tensor:
        """``[len(directions), B]``: the taken dots of these directions (each one of the stream's, by identity)."""
        indices = []
        for index, direction in enumerate(directions):
            found = next((j for j, known in enumerate(self.directions) if known is direction), None)
            if found is None or self.dots is None:
                raise RuntimeError(
                    f"PerSampleDots: `directions[{index}]` is not one of the directions given to the ProductStream before the "
                    f"backward, and {self.layers} layer block(s) let their captures go once their products with those were "
                    "taken. Fix: ask for the stream's directions (the same dictionaries), or run the step without a stream."
                )
            indices.append(found)
        if indices == list(range(self.dots.shape[0])):
            return self.dots  # every row in order (the usual ask): no indexing issued
        return self.dots[indices]

    def require(self, what: str, value: Tensor | None) -> Tensor:
        if value is None:
            raise RuntimeError(
                f"PerSampleDots: {what} was not taken during the backward ({self.layers} layer block(s) let their captures go "
                f"there). Fix: set `ProductStream.{what}=True` before the backward, or run the step without a stream."
            )
        return value
