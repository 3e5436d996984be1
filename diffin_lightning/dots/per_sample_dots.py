"""Per-sample products over one captured optimizer step, each layer in its cheapest form."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from diffin_lightning.dots.factors import Form, LayerFactors, cat_parts as _cat

if TYPE_CHECKING:
    from diffin_lightning.dots.stream import StreamedProducts

# Materialised per-sample gradients above this many elements (per layer and micro-batch) are
# never chosen by the cost model (a forced form ignores the cap): 2**27 float32 = 512 MiB.
DEFAULT_MAX_MATERIALISED_ELEMENTS = 1 << 27

# A layer whose share of one direction has at least this many elements takes several directions one
# at a time in the direct form (see PerSampleDots.dots): 2**20 float32 = 4 MiB.
_LARGE_DIRECTION_ELEMENTS = 1 << 20


def _overlap(a: slice | None, b: slice | None) -> bool:
    if a is None or b is None:
        return True
    return a.start < b.stop and b.start < a.stop


# What writing one element of per-sample gradients materialised for a single product costs beyond its
# multiply-adds, in multiply-adds (a products-only view, ``keep_materialised=False``: the end-of-fit pass).
# The count alone had the transformer benchmark's feed-forward layers (128 samples x 32 positions, 256 x 64)
# materialise 2M fresh elements for two directions: 5.5 ms a product, pages faulting in, where the
# direct form takes 1.6 ms. Views whose materialised gradients serve several quantities are not charged.
SINGLE_USE_ELEMENT_COST = 64


class _StackedDirections(Mapping[str, Tensor]):
    """D directions as ``[D, *shape]`` per parameter, stacked when a layer reads it (one direction: a view)."""

    def __init__(self, directions: Sequence[Mapping[str, Tensor]], names: set[str]) -> None:
        self.directions, self.names = directions, names

    def __getitem__(self, name: str) -> Tensor:
        if len(self.directions) == 1:
            return self.directions[0][name].unsqueeze(0)
        return torch.stack([direction[name] for direction in self.directions])

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class PerSampleDots:
    """``<V, G_i>``, ``<G_sum, G_i>``, ``|G_i|^2`` and ``G_i`` for every sample of a captured step.

    Built by :meth:`LayerCapture.per_sample`; covers exactly
    :attr:`parameter_names` (``G_i`` here is sample i's gradient restricted to them). The
    sample axis is the micro-batches' samples concatenated in the order they ran. For every
    layer and quantity the cheapest form (see :mod:`~diffin_lightning.dots.factors`) by the
    layers' cost models is used unless ``form=`` forces one.

    Args:
        passes: per micro-batch, the merged factors of every covered layer.
        batch_sizes: samples per micro-batch.
        parameter_names: the covered parameters.
        max_materialised_elements: the cost model never materialises a layer's per-sample
            gradients above this size (per micro-batch).
        streamed: per micro-batch, the products of the layers taken during its backward
            (:mod:`~diffin_lightning.dots.stream`; already scaled), or ``None``. Those layers
            hold no factors: the products they took are added, and only those can be asked for.
    """

    def __init__(
        self,
        passes: Sequence[Sequence[LayerFactors]],
        batch_sizes: Sequence[int],
        parameter_names: Sequence[str],
        max_materialised_elements: int = DEFAULT_MAX_MATERIALISED_ELEMENTS,
        streamed: Sequence[StreamedProducts | None] | None = None,
    ) -> None:
        self.passes = [list(blocks) for blocks in passes]
        self.batch_sizes = [int(size) for size in batch_sizes]
        self.streamed = [part if part is not None and part.layers else None for part in (streamed or [None] * len(self.passes))]
        if len(self.streamed) != len(self.passes):
            raise ValueError(f"`streamed` must hold one entry per pass ({len(self.passes)}); got {len(self.streamed)}.")
        self.parameter_names = tuple(parameter_names)
        self.max_materialised_elements = max_materialised_elements
        self._tied = self._tied_keys()
        # G_sum per parameter, built on demand for the layers whose form reads it (never all of them
        # at once unless asked: a parameter-sized dictionary is the callback's memory on a wide model).
        self._summed: dict[str, Tensor] = {}
        # Per-sample gradients a layer materialised once serve every later quantity for free.
        self._materialised: dict[tuple[int, Hashable], dict[str, Tensor]] = {}
        # False where one product is all that will be asked (the end-of-fit pass): each layer's
        # materialised gradients then go as soon as its product is taken, instead of every layer's
        # being held until the end (B x parameters: 50 MB at the transformer benchmark's batch of 128).
        self.keep_materialised = True

    def _gradients_of(self, index: int, block: LayerFactors) -> dict[str, Tensor]:
        cache_key = (index, block.key)
        if cache_key in self._materialised:
            return self._materialised[cache_key]
        gradients = block.per_sample_gradients()
        if self.keep_materialised:
            self._materialised[cache_key] = gradients
        return gradients

    def _materialised_dots(self, index: int, block: LayerFactors, stacked: Mapping[str, Tensor]) -> Tensor:
        total: Tensor | None = None
        for name, grads in self._gradients_of(index, block).items():
            part = stacked[name].flatten(1) @ grads.flatten(1).T
            total = part if total is None else total + part
        assert total is not None
        return total

    def _materialised_cost(self, index: int, block: LayerFactors, cost: float, build: float) -> float:
        """``cost`` without the materialisation's own share when it is already cached."""
        return cost - build if (index, block.key) in self._materialised else cost

    @property
    def sample_count(self) -> int:
        """B_total, the samples of every captured micro-batch."""
        return sum(self.batch_sizes)

    def _tied_keys(self) -> set[Hashable]:
        """Keys of blocks that share a parameter's rows with another block (a parameter used by two modules)."""
        uses: dict[str, list[tuple[Hashable, slice | None]]] = {}
        for blocks in self.passes:
            for block in blocks:
                for name, rows in block.slices.items():
                    if (block.key, rows) not in uses.setdefault(name, []):
                        uses[name].append((block.key, rows))
        tied: set[Hashable] = set()
        for entries in uses.values():
            for index, (key, rows) in enumerate(entries):
                for other_key, other_rows in entries[index + 1 :]:
                    if other_key != key and _overlap(rows, other_rows):
                        tied.update((key, other_key))
        return tied

    def _pick(self, block: LayerFactors, allowed: Sequence[Form], costs: Callable[[Form], float], form: Form | None) -> Form:
        available = [f for f in allowed if f in block.forms()] or list(block.forms())
        if form is not None:
            return form if form in available else available[0]
        if "materialised" in available and len(available) > 1 and block.materialised_elements() > self.max_materialised_elements:
            available.remove("materialised")
        return min(available, key=costs)

    @staticmethod
    def _direction_elements(direction: Mapping[str, Tensor], block: LayerFactors) -> int:
        return sum(direction[name].numel() for name in block.slices)

    def _sum(self, parts: list[Tensor], *shape: int) -> Tensor:
        """The sum of the layers' ``parts`` (zeros of ``shape`` for none), in the captured tensors' dtype.

        Two operations however many layers (a chain of additions issues one per layer, and on a GPU
        a small model's step is bound by the operations issued).
        """
        if not parts:
            return self._zeros(*shape)
        reference = self._reference()
        dtype = parts[0].dtype if reference is None else reference.dtype
        if len(parts) == 1:
            return parts[0].to(dtype)
        return torch.stack([part.to(dtype) for part in parts]).sum(dim=0)

    def _reference(self) -> Tensor | None:
        """A captured tensor (its dtype and device are every product's), or None when nothing was captured."""
        for blocks in self.passes:
            for block in blocks:
                return block.reference
        for part in self.streamed:
            reference = None if part is None else part.reference()
            if reference is not None:
                return reference
        return None

    def _zeros(self, *shape: int) -> Tensor:
        reference = self._reference()
        return torch.zeros(shape) if reference is None else reference.new_zeros(shape)

    def _refuse_if_streamed(self, what: str) -> None:
        taken = sum(part.layers for part in self.streamed if part is not None)
        if taken:
            raise RuntimeError(
                f"PerSampleDots.{what}: {taken} layer block(s) let their captures go during the backward once the products "
                "asked for there were taken (a ProductStream); their per-sample gradients cannot be formed now. "
                "Fix: capture the step without a stream."
            )

    def summed_gradient(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """``G_sum = sum_i G_i`` over every captured sample, per covered parameter that a layer reached.

        With ``names``, only those parameters (each built once and cached); layers taken during
        the backward (a stream) hold no factors to sum, so all of them is refused there.
        """
        if names is None:
            self._refuse_if_streamed("summed_gradient")
        reached = {name for blocks in self.passes for block in blocks for name in block.slices}
        wanted = reached if names is None else set(names) & reached
        missing = wanted - set(self._summed)
        if missing:
            for blocks in self.passes:
                for block in blocks:
                    if missing.isdisjoint(block.slices):
                        continue
                    for name, value in block.summed_gradient().items():
                        if name in missing:
                            self._summed[name] = self._summed[name] + value if name in self._summed else value
        return {name: self._summed[name] for name in wanted}

    def built_summed_gradient(self) -> dict[str, Tensor]:
        """The parts of ``G_sum`` built so far (by :meth:`summed_gradient`, or a form that read it)."""
        return dict(self._summed)

    def streamed_parameters(self) -> set[str]:
        """The parameters of the layers taken during the backward (a stream), which hold no factors here."""
        return set().union(*(part.parameters for part in self.streamed if part is not None))

    def streamed_along(self) -> Tensor | None:
        """``<along, G_sum>`` over the layers a perturbed pass's stream took (``None`` where none was taken)."""
        parts = [part.along for part in self.streamed if part is not None and part.along is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def streamed_check(self) -> Tensor | None:
        """``[|G_sum/B - mean|^2, |G_sum/B|^2]`` over the layers a checking stream took (``ProductStream.gradient_check``)."""
        parts = [part.check for part in self.streamed if part is not None and part.check is not None]
        return sum(parts[1:], parts[0]) if parts else None

    def _has_summed(self, block: LayerFactors) -> bool:
        return all(name in self._summed for name in block.slices)

    def _dots_costs(self, index: int, block: LayerFactors, count: int) -> Callable[[Form], float]:
        def costs(form: Form) -> float:
            cost = block.cost("dots", form, count)
            if form != "materialised":
                return cost
            if not self.keep_materialised:
                # Formed for this one product and dropped: writing B x parameters fresh elements is all cost,
                # served to no later quantity (see SINGLE_USE_ELEMENT_COST).
                cost += SINGLE_USE_ELEMENT_COST * block.materialised_elements()
            return self._materialised_cost(index, block, cost, block.cost("dots", "materialised", 0))

        return costs

    def dots(
        self, directions: Sequence[Mapping[str, Tensor]], form: Literal["direct", "materialised"] | None = None, only: set[str] | None = None
    ) -> Tensor:
        """``[<V_d, G_i>]`` as ``Tensor[D, B_total]``.

        Args:
            directions: D parameter-shaped dictionaries; each must hold every covered
                parameter (extra entries, such as uncovered parameters, are ignored).
            form: force ``"direct"`` or ``"materialised"`` for every layer that has it.
            only: restrict ``G_i`` to the layers all of whose parameters are in this set
                (the directions then need only those).
        """
        if form not in (None, "direct", "materialised"):
            raise ValueError(f"`form` must be None, 'direct' or 'materialised' for dots; got {form!r}.")
        if only is not None and self.streamed_parameters() & only:
            self._refuse_if_streamed("dots(only=...) over layers taken during the backward")
        count = len(directions)
        included = [[block for block in blocks if only is None or set(block.slices) <= only] for blocks in self.passes]
        needed = {name for blocks in included for block in blocks for name in block.slices}
        for index, direction in enumerate(directions):
            missing = sorted(needed - set(direction))
            if missing:
                raise ValueError(
                    f"`directions[{index}]` must hold every covered parameter; missing {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                    "Fix: pass full parameter dictionaries (zeros where the direction has no component)."
                )
        # The directions are stacked one layer at a time, as each layer reads them (one direction: a
        # view, or a lazily formed direction's temporary): never D parameter-sized copies at once.
        stacked = _StackedDirections(directions, needed)
        out = []
        for index, (blocks, size) in enumerate(zip(included, self.batch_sizes)):
            parts = []
            for block in blocks:
                chosen = self._pick(block, ("direct", "materialised"), self._dots_costs(index, block, count), form)
                if chosen == "direct" and count > 1 and self._direction_elements(directions[0], block) >= _LARGE_DIRECTION_ELEMENTS:
                    # A wide layer takes its directions one at a time, each a view: stacking them, and laying
                    # the stack out for the product, would copy the layer's share of every direction twice
                    # (16 MB for two directions of a 1024x1024 layer in float32); the products are as large.
                    part = torch.cat([block.dots(_StackedDirections([direction], needed)) for direction in directions])
                else:
                    part = block.dots(stacked) if chosen == "direct" else self._materialised_dots(index, block, stacked)
                parts.append(part)
            streamed = self.streamed[index]
            if streamed is not None and only is None:
                parts.append(streamed.rows(directions))
            out.append(self._sum(parts, count, size))
        return _cat(out, 1) if out else self._zeros(count, 0)

    def gradient_dots(self, form: Form | None = None, gradient: Mapping[str, Tensor] | None = None, gradient_scale: float = 1.0) -> Tensor:
        """``[<G_sum, G_i>]`` as ``Tensor[B_total]``, ``G_sum = sum_j G_j`` over every captured micro-batch.

        ``<G_B, G_i>`` for the mean-loss batch gradient is this divided by B_total. The Gram
        form ``sum_j <G_j, G_i>`` never forms ``G_sum``; the direct and materialised forms
        use ``gradient_scale * gradient`` when ``gradient`` is given (for example ``.grad``,
        the mean, with ``gradient_scale`` = B: no rescaled copy is made) and the captured
        factors' sum otherwise.
        """
        summed = dict(gradient) if gradient is not None else None

        def given(block: LayerFactors) -> bool:
            """Whether the caller's ``gradient`` holds every parameter of ``block`` (else its factors' sum is used)."""
            return summed is not None and all(name in summed for name in block.slices)

        by_key = [{block.key: block for block in blocks} for blocks in self.passes]
        out = []
        for index, (blocks, size) in enumerate(zip(self.passes, self.batch_sizes)):
            parts, given_parts = [], []
            for block in blocks:
                allowed: tuple[Form, ...] = ("direct", "materialised") if block.key in self._tied else ("direct", "gram", "materialised")
                partners = [table[block.key] for table in by_key if block.key in table]
                dots_costs = self._dots_costs(index, block, 1)

                def costs(f: Form, b: LayerFactors = block, partners: list[LayerFactors] = partners, dots_costs=dots_costs) -> float:
                    if f == "gram":
                        return sum(b.cost("gram", "gram", other=p) for p in partners)
                    # G_sum itself costs one direct pass over the factors unless the caller gave it.
                    build = 0.0 if given(b) or self._has_summed(b) else b.cost("dots", "direct", 1)
                    return build + dots_costs(f)

                chosen = self._pick(block, allowed, costs, form if form in allowed else None)
                if chosen == "gram":
                    parts.append(sum(block.gram(partner).sum(dim=1) for partner in partners))
                else:
                    # This layer's parameters only: G_sum is built layer by layer, as the forms need it.
                    from_caller = given(block)
                    source = {n: summed[n] for n in block.slices} if from_caller else self.summed_gradient(block.slices)  # type: ignore[index]
                    direction = {name: value.unsqueeze(0) for name, value in source.items()}
                    part = (block.dots(direction) if chosen == "direct" else self._materialised_dots(index, block, direction))[0]
                    # The caller's gradient is the sum over gradient_scale: its layers' products are scaled once, together.
                    (given_parts if from_caller and gradient_scale != 1.0 else parts).append(part)
            if given_parts:
                parts.append(self._sum(given_parts, size) * gradient_scale)
            streamed = self.streamed[index]
            if streamed is not None:
                parts.append(streamed.require("gradient_dots", streamed.gradient_dots))
            out.append(self._sum(parts, size))
        return _cat(out, 0) if out else self._zeros(0)

    def gram_form_parameters(self) -> set[str]:
        """The parameters whose every layer block takes ``<G_sum, G_i>`` in the Gram form when ``G_sum`` is given.

        Those layers never read ``G_sum``: a pass that needs only ``<G_sum, G_i>`` can skip their
        parameter gradients.
        """
        gram: set[str] = set()
        other: set[str] = set()
        for key, chosen, _ in self.plan("gradient_dots", gradient_given=True):
            block = next(b for b in self.passes[0] if b.key == key)
            (gram if chosen == "gram" else other).update(block.slices)
        for part in self.streamed:
            if part is not None:
                gram |= part.gram_parameters
        return gram - other

    def squared_norms(self, form: Literal["gram", "materialised"] | None = None) -> Tensor:
        """``[|G_i|^2]`` as ``Tensor[B_total]`` (the Gram form's diagonal or materialised gradients)."""
        if form not in (None, "gram", "materialised"):
            raise ValueError(f"`form` must be None, 'gram' or 'materialised' for squared_norms; got {form!r}.")
        out = []
        for index, (blocks, size) in enumerate(zip(self.passes, self.batch_sizes)):
            parts = []
            tied: dict[str, Tensor] = {}
            for block in blocks:
                if block.key in self._tied:
                    for name, value in self._gradients_of(index, block).items():
                        tied[name] = tied[name] + value if name in tied else value
                    continue

                def costs(f: Form, b: LayerFactors = block, index: int = index) -> float:
                    cost = b.cost("norms", f)
                    return self._materialised_cost(index, b, cost, b.cost("dots", "materialised", 0)) if f == "materialised" else cost

                chosen = self._pick(block, ("gram", "materialised"), costs, form)
                if chosen == "gram":
                    parts.append(block.squared_norms())
                else:
                    parts += [value.flatten(1).pow(2).sum(dim=1) for value in self._gradients_of(index, block).values()]
            parts += [value.flatten(1).pow(2).sum(dim=1) for value in tied.values()]
            streamed = self.streamed[index]
            if streamed is not None:
                parts.append(streamed.require("squared_norms", streamed.norms))
            out.append(self._sum(parts, size))
        return _cat(out, 0) if out else self._zeros(0)

    def per_sample_gradients(self) -> dict[str, Tensor]:
        """``{name: Tensor[B_total, *param.shape]}`` for every covered parameter a layer reached (memory: B copies)."""
        self._refuse_if_streamed("per_sample_gradients")
        per_pass: list[dict[str, Tensor]] = []
        for index, blocks in enumerate(self.passes):
            totals: dict[str, Tensor] = {}
            for block in blocks:
                for name, value in self._gradients_of(index, block).items():
                    totals[name] = totals[name] + value if name in totals else value
            per_pass.append(totals)
        names = sorted({name for totals in per_pass for name in totals})
        out = {}
        for name in names:
            shape = next(totals[name].shape[1:] for totals in per_pass if name in totals)
            out[name] = torch.cat(
                [totals[name] if name in totals else self._zeros(size, *shape) for totals, size in zip(per_pass, self.batch_sizes)]
            )
        return out

    def gram(self) -> Tensor:
        """``[<G_i, G_j>]`` as ``Tensor[B_total, B_total]`` over the covered parameters."""
        self._refuse_if_streamed("gram")
        offsets = [sum(self.batch_sizes[:index]) for index in range(len(self.batch_sizes))]
        total = self._zeros(self.sample_count, self.sample_count)
        for p, blocks in enumerate(self.passes):
            for q, other_blocks in enumerate(self.passes):
                others = {block.key: block for block in other_blocks}
                rows = slice(offsets[p], offsets[p] + self.batch_sizes[p])
                columns = slice(offsets[q], offsets[q] + self.batch_sizes[q])
                for block in blocks:
                    if block.key not in self._tied and block.key in others:
                        total[rows, columns] += block.gram(others[block.key])
        if self._tied:
            # Rebuild the tied parameters' full per-sample gradients (blocks add up) and take their Gram matrix.
            flat = []
            for blocks, size in zip(self.passes, self.batch_sizes):
                sums: dict[str, Tensor] = {}
                for block in blocks:
                    if block.key in self._tied:
                        for name, value in block.per_sample_gradients().items():
                            sums[name] = sums[name] + value if name in sums else value
                flat.append(sums)
            names = sorted({name for sums in flat for name in sums})
            for name in names:
                shape = next(sums[name].shape[1:] for sums in flat if name in sums)
                stacked = torch.cat([sums[name] if name in sums else self._zeros(size, *shape) for sums, size in zip(flat, self.batch_sizes)]).flatten(1)
                total = total + stacked @ stacked.T
        return total

    def plan(
        self, quantity: Literal["dots", "gradient_dots", "squared_norms"], directions: int = 1, gradient_given: bool = False
    ) -> list[tuple[Hashable, Form, float]]:
        """The form the cost model picks per layer block of the first micro-batch, with its estimated multiply-adds."""
        rows = []
        blocks = self.passes[0] if self.passes else []
        for block in blocks:
            dots_costs = self._dots_costs(0, block, directions)
            if quantity == "dots":
                allowed: tuple[Form, ...] = ("direct", "materialised")
                costs: Callable[[Form], float] = dots_costs
            elif quantity == "gradient_dots":
                allowed = ("direct", "materialised") if block.key in self._tied else ("direct", "gram", "materialised")
                partners = [p for ps in self.passes for p in ps if p.key == block.key]
                build = 0.0 if gradient_given or self._has_summed(block) else block.cost("dots", "direct", 1)
                costs = lambda f, b=block, partners=partners, dots_costs=dots_costs, build=build: (
                    sum(b.cost("gram", "gram", other=p) for p in partners) if f == "gram" else build + dots_costs(f)
                )
            else:
                allowed = ("gram", "materialised")
                costs = lambda f, b=block: (
                    self._materialised_cost(0, b, b.cost("norms", f), b.cost("dots", "materialised", 0)) if f == "materialised" else b.cost("norms", f)
                )
            chosen = self._pick(block, allowed, costs, None)
            rows.append((block.key, chosen, costs(chosen)))
        return rows
