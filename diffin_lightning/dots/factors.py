"""The per-sample gradient of one layer in factored form, and the three ways to use it.

A layer rule (:mod:`diffin_lightning.dots.rules`) turns one captured call of a module into
*factors*: the smallest description of every sample's gradient for that module's parameters.
Three shapes of factors cover every registered layer:

- :class:`OuterProductFactors`: ``G_i = sum_p delta_ip a_ip^T`` per group (Linear, Conv via
  unfold, GPT-2's Conv1D, attention projections);
- :class:`EmbeddingFactors`: ``G_i = sum_p onehot(idx_ip) delta_ip^T`` (a lookup table);
- :class:`MaterialisedFactors`: the per-sample gradients themselves (LayerNorm and GroupNorm
  affine parameters: as many numbers as the layer has channels).

Each answers the same questions, each in whatever *forms* fit it, with a cost estimate per
form (multiply-adds) so that the caller picks the cheapest per layer and per shape:

- ``"direct"``: products with the factors, never forming ``G_i`` (``<V, G_i> = sum_p
  delta_ip^T V a_ip``, cost ``B P m k`` per direction);
- ``"gram"``: products between samples (``<G_i, G_j> = sum_{p,q} (delta_ip . delta_jq)
  (a_ip . a_jq)``, cost ``B B' P Q (m + k)``), for ``<G_sum, G_i>`` and ``|G_i|^2``;
- ``"materialised"``: ``G_i`` formed once (``B P m k``), then every product costs
  ``B m k`` (best when positions ``P`` are many and parameters few: convolutions).

Every tensor here is a function of the captured activations and output gradients only: no
module, no autograd. Calls of one module in one forward (weight sharing) merge into one
factors object (positions concatenate, gradients add); micro-batches stay separate objects
whose sample axes the caller concatenates.
"""

from __future__ import annotations

import math

from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Form = Literal["direct", "gram", "materialised"]
FORMS: tuple[Form, ...] = ("direct", "gram", "materialised")

# Upper bound on the elements of one temporary (products chunked over samples to stay below it).
_CHUNK_ELEMENTS = 1 << 24


def _chunk_size(per_row: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, per_row))


class LayerFactors(ABC):
    """Per-sample gradients of one module's parameters for one micro-batch, in factored form.

    Attributes:
        key: identifies the gradient block: factors with equal keys describe the same
            parameters (the same module, the same slice), so calls with equal keys merge.
        slices: global parameter name -> the rows of that parameter this block fills
            (``None``: all of it). Blocks on disjoint rows of one parameter are orthogonal.
    """

    key: Hashable
    slices: dict[str, slice | None]

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """B, the number of samples (rows of every per-sample quantity)."""

    @property
    def reference(self) -> Tensor:
        """A captured tensor whose dtype and device every product of this block takes."""
        return self.backprops  # type: ignore[attr-defined,no-any-return]

    @abstractmethod
    def merge(self, others: Sequence[LayerFactors]) -> LayerFactors:
        """Self and ``others`` (same key, same samples, other calls): their gradients add up."""

    @abstractmethod
    def scaled(self, scale: float | Tensor) -> LayerFactors:
        """The factors of ``scale * G_i`` (backprops rescaled)."""

    @abstractmethod
    def forms(self) -> tuple[Form, ...]:
        """The forms this block can compute."""

    @abstractmethod
    def dots(self, directions: dict[str, Tensor]) -> Tensor:
        """``[<V_d, G_i>]`` as ``Tensor[D, B]``, direct form; ``directions[name]`` is ``[D, *param.shape]``."""

    @abstractmethod
    def per_sample_gradients(self) -> dict[str, Tensor]:
        """``{name: Tensor[B, *param.shape]}`` (zero outside this block's rows)."""

    @abstractmethod
    def summed_gradient(self) -> dict[str, Tensor]:
        """``{name: sum_i G_i}`` in the parameters' shapes (zero outside this block's rows)."""

    @abstractmethod
    def gram(self, other: LayerFactors) -> Tensor:
        """``[<G_i, G'_j>]`` as ``Tensor[B, B']`` against another micro-batch with the same key."""

    @abstractmethod
    def squared_norms(self) -> Tensor:
        """``[|G_i|^2]`` as ``Tensor[B]`` without forming ``G_i`` (the Gram form's diagonal)."""

    @abstractmethod
    def cost(self, quantity: Literal["dots", "gram", "norms"], form: Form, directions: int = 1, other: LayerFactors | None = None) -> float:
        """Multiply-adds of ``quantity`` in ``form``; ``inf`` where the form does not apply."""

    @abstractmethod
    def materialised_elements(self) -> int:
        """Elements of the per-sample gradients if materialised (for a memory cap)."""

    def dots_materialised(self, directions: dict[str, Tensor]) -> Tensor:
        """``[<V_d, G_i>]`` through the materialised per-sample gradients."""
        total: Tensor | None = None
        for name, grads in self.per_sample_gradients().items():
            part = directions[name].flatten(1) @ grads.flatten(1).T
            total = part if total is None else total + part
        assert total is not None
        return total


def cat_parts(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that issues nothing for one part (one micro-batch, one direction chunk: the usual case)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _group_major(tensor: Tensor) -> Tensor:
    """``[B, G, ...]`` -> ``[G, B, ...]``; one group (the usual case) issues no operation: the layout is the same."""
    # (with one group the reshape that follows reads [B, 1, ...] in the order of [1, B, ...])
    return tensor if tensor.shape[1] == 1 else tensor.transpose(0, 1)


def _pad_rows(block: Tensor, rows: slice | None, full_rows: int, lead: int) -> Tensor:
    """Place ``block`` (``[lead, rows, ...]``) into zeros of ``[lead, full_rows, ...]``."""
    if rows is None:
        return block
    out = block.new_zeros((block.shape[0], full_rows, *block.shape[2:]))
    out[:, rows] = block
    return out


class OuterProductFactors(LayerFactors):
    """``G_i = sum_p delta_ip a_ip^T`` per group: a weight ``[G*m, ...]`` (k inputs per group) and a bias.

    Args:
        key: the gradient block's identity (see :class:`LayerFactors`).
        activations: ``[B, G, P, k]`` inputs per sample, group and position.
        backprops: ``[B, G, P, m]`` output gradients.
        weight: global name of the weight, ``None`` when it is not a variable (frozen).
        weight_shape: the weight's full shape.
        bias: global name of the bias, or ``None``.
        bias_shape: the bias's full shape.
        rows: rows of the weight this block fills (attention's packed in-projection), ``None``: all.
        bias_rows: rows of the bias this block fills, ``None``: all.
        transposed: the weight is stored ``[k, m]`` (GPT-2's Conv1D: ``y = x W + b``).
    """

    _bias_sums: Tensor | None = None  # see _bias_gradients (a class default: subclasses build their own __init__)

    def __init__(
        self,
        key: Hashable,
        activations: Tensor,
        backprops: Tensor,
        weight: str | None,
        weight_shape: tuple[int, ...],
        bias: str | None = None,
        bias_shape: tuple[int, ...] = (),
        rows: slice | None = None,
        transposed: bool = False,
        bias_rows: slice | None = None,
    ) -> None:
        self.key = key
        self.activations = activations
        self.backprops = backprops
        self.weight = weight
        self.weight_shape = tuple(weight_shape)
        self.bias = bias
        self.bias_shape = tuple(bias_shape)
        self.rows = rows
        self.transposed = transposed
        self.bias_rows = bias_rows
        self.slices: dict[str, slice | None] = {}
        if weight is not None:
            self.slices[weight] = rows
        if bias is not None:
            self.slices[bias] = bias_rows

    def _like(self, activations: Tensor, backprops: Tensor) -> OuterProductFactors:
        return OuterProductFactors(
            self.key, activations, backprops, self.weight, self.weight_shape, self.bias, self.bias_shape, self.rows, self.transposed, self.bias_rows
        )

    @property
    def batch_size(self) -> int:
        return int(self.backprops.shape[0])

    @property
    def _gpmk(self) -> tuple[int, int, int, int]:
        _, groups, positions, inputs = self.activations.shape
        return groups, positions, int(self.backprops.shape[-1]), inputs

    def merge(self, others: Sequence[LayerFactors]) -> LayerFactors:
        items = [self, *others]
        assert all(isinstance(item, OuterProductFactors) for item in items)
        return self._like(
            torch.cat([item.activations for item in items], dim=2),  # type: ignore[attr-defined]
            torch.cat([item.backprops for item in items], dim=2),  # type: ignore[attr-defined]
        )

    def scaled(self, scale: float | Tensor) -> LayerFactors:
        return self._like(self.activations, self.backprops * scale)

    def forms(self) -> tuple[Form, ...]:
        return FORMS

    def _weight_as_gmk(self, tensor: Tensor) -> Tensor:
        """``[L, *weight_shape]`` -> ``[L, G, m, k]`` (this block's rows)."""
        groups, _, m, k = self._gpmk
        if self.rows is not None:
            tensor = tensor[:, self.rows]
        if self.transposed:
            tensor = tensor.transpose(-1, -2)
        return tensor.reshape(tensor.shape[0], groups, m, k)

    def _weight_from_gmk(self, tensor: Tensor) -> Tensor:
        """``[L, G, m, k]`` -> ``[L, *weight_shape]``."""
        groups, _, m, k = self._gpmk
        lead = tensor.shape[0]
        if self.transposed:
            return tensor.reshape(lead, groups * m, k).transpose(-1, -2).reshape(lead, *self.weight_shape)
        full_rows = self.weight_shape[0]
        block_shape = ((self.rows.stop - self.rows.start) if self.rows is not None else full_rows, *self.weight_shape[1:])
        return _pad_rows(tensor.reshape(lead, *block_shape), self.rows, full_rows, lead)

    def _bias_from_gm(self, tensor: Tensor) -> Tensor:
        lead = tensor.shape[0]
        return _pad_rows(tensor.reshape(lead, -1), self.bias_rows, self.bias_shape[0], lead)

    def dots(self, directions: dict[str, Tensor]) -> Tensor:
        # (On a GPU a small model's step is bound by the operations issued, not their arithmetic: this
        # runs for every covered layer and direction set, so it issues as few as it can.)
        total: Tensor | None = None
        if self.weight is not None:
            directions_gmk = self._weight_as_gmk(directions[self.weight])  # [D, G, m, k]
            count = directions_gmk.shape[0]
            groups, positions, m, k = self._gpmk
            rows = self.batch_size * positions
            # <V, G_i> = sum_p delta_ip^T V a_ip. All directions go through one matrix product per
            # group, [B P, k] @ [k, D m] (or the transposed one when k < m, so that the elementwise
            # part runs over the narrower side): a broadcast batched product per sample (B tiny
            # matrix-vector products) was 3x slower for one direction and 100x for two.
            if m <= k:
                left, right, width = self.activations, self.backprops, m
                stacked = directions_gmk.permute(1, 3, 0, 2)  # [G, k, D, m]
            else:
                left, right, width = self.backprops, self.activations, k
                stacked = directions_gmk.permute(1, 2, 0, 3)  # [G, m, D, k]
            left = _group_major(left).reshape(groups, rows, -1)
            right = _group_major(right).reshape(groups, rows, 1, width)
            step = _chunk_size(groups * rows * width)
            parts = []
            for start in range(0, count, step):
                chunk = stacked[:, :, start : start + step] if count > step else stacked  # [G, inner, d, width]
                d = chunk.shape[2]
                # (One direction: this reshape is a view, the product reads its strides; several: a copy, which
                # PerSampleDots avoids on wide layers by passing their directions one at a time.)
                projected = torch.bmm(left, chunk.reshape(groups, chunk.shape[1], d * width)).view(groups, rows, d, width)
                per_row = (projected * right).sum(-1)  # [G, B P, d]
                if groups * positions > 1:  # groups and positions summed
                    per_row = per_row.view(groups, self.batch_size, positions, d).sum(dim=(0, 2))
                parts.append(per_row.view(self.batch_size, d).T)  # [d, B]
            total = cat_parts(parts, 0)
        if self.bias is not None:
            bias = directions[self.bias]
            if self.bias_rows is not None:
                bias = bias[:, self.bias_rows]
            # [D, G m] @ [G m, B]: one matrix product (an einsum here issued about 15 operations a call).
            bias = bias.reshape(bias.shape[0], -1)
            gradients = self._bias_gradients().T
            total = bias @ gradients if total is None else torch.addmm(total, bias, gradients)
        if total is None:
            return torch.zeros((), dtype=self.backprops.dtype, device=self.backprops.device)
        return total

    def _bias_gradients(self) -> Tensor:
        """``[B, G m]``: each sample's bias gradient (its output gradients summed over positions), formed once."""
        if self._bias_sums is None:
            self._bias_sums = self.backprops.sum(dim=2).reshape(self.batch_size, -1)
        return self._bias_sums

    def per_sample_gradients(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.weight is not None:
            out[self.weight] = self._weight_from_gmk(self.backprops.transpose(-1, -2) @ self.activations)
        if self.bias is not None:
            out[self.bias] = self._bias_from_gm(self._bias_gradients())
        return out

    def summed_gradient(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        groups, positions, m, k = self._gpmk
        if self.weight is not None:
            # [G, B*P, m]^T @ [G, B*P, k]: one matrix product per group, no per-sample tensor.
            delta = _group_major(self.backprops).reshape(groups, -1, m)
            inputs = _group_major(self.activations).reshape(groups, -1, k)
            out[self.weight] = self._weight_from_gmk((delta.transpose(-1, -2) @ inputs).unsqueeze(0))[0]
        if self.bias is not None:
            out[self.bias] = self._bias_from_gm(self._bias_gradients().sum(dim=0, keepdim=True))[0]
        return out

    def gram(self, other: LayerFactors) -> Tensor:
        assert isinstance(other, OuterProductFactors) and other.key == self.key
        rows = []
        groups, positions, _, _ = self._gpmk
        step = _chunk_size(other.batch_size * groups * positions * other.activations.shape[2])
        for start in range(0, self.batch_size, step):
            if self.weight is not None:
                delta = torch.einsum("igpm,jgqm->ijgpq", self.backprops[start : start + step], other.backprops)
                inputs = torch.einsum("igpk,jgqk->ijgpq", self.activations[start : start + step], other.activations)
                # The bias's Gram, sum over g, p, q of delta_ip . delta_jq, is the sum of the same pairwise
                # products: one term more per product, not a second [B, B] matrix product of the output gradients.
                rows.append((delta * (inputs + 1.0 if self.bias is not None else inputs)).sum(dim=(2, 3, 4)))
            else:  # a bias alone: its per-sample gradients are the output gradients summed over positions
                rows.append(torch.einsum("igm,jgm->ij", self.backprops[start : start + step].sum(dim=2), other.backprops.sum(dim=2)))
        return torch.cat(rows, dim=0)

    def squared_norms(self) -> Tensor:
        out = []
        groups, positions, _, _ = self._gpmk
        step = _chunk_size(groups * positions * positions)
        for start in range(0, self.batch_size, step):
            delta = self.backprops[start : start + step]
            inputs = self.activations[start : start + step]
            part = torch.zeros(delta.shape[0], dtype=delta.dtype, device=delta.device)
            if self.weight is not None:
                part = part + ((delta @ delta.transpose(-1, -2)) * (inputs @ inputs.transpose(-1, -2))).sum(dim=(1, 2, 3))
            if self.bias is not None:
                part = part + delta.sum(dim=2).pow(2).sum(dim=(1, 2))
            out.append(part)
        return torch.cat(out)

    def cost(self, quantity: Literal["dots", "gram", "norms"], form: Form, directions: int = 1, other: LayerFactors | None = None) -> float:
        groups, positions, m, k = self._gpmk
        batch = self.batch_size
        weight = 1.0 if self.weight is not None else 0.0
        bias = float(batch * groups * positions * m) if self.bias is not None else 0.0
        build = weight * batch * groups * positions * m * k + bias
        size = weight * groups * m * k + (groups * m if self.bias is not None else 0)
        if quantity == "dots":
            if form == "direct":
                return directions * (weight * batch * groups * positions * m * k + bias)
            if form == "materialised":
                return build + directions * batch * size
            return float("inf")
        if quantity == "gram":
            assert isinstance(other, OuterProductFactors)
            other_positions = other._gpmk[1]  # not other.activations: a convolution would unfold for its shape
            if form == "gram":
                # With a weight, the bias's share is one more term of the same pairwise products (see gram).
                return batch * other.batch_size * groups * (positions * other_positions * (m + k) if weight else m)
            if form == "materialised":
                return build + other.cost("dots", "materialised", 0) + batch * other.batch_size * size
            return float("inf")
        if form == "gram":
            return batch * groups * (weight * positions * positions * (m + k) + m)
        if form == "materialised":
            return build + batch * size
        return float("inf")

    def materialised_elements(self) -> int:
        groups, _, m, k = self._gpmk
        return self.batch_size * groups * m * (k + 1)


class ConvolutionFactors(OuterProductFactors):
    """A convolution's factors kept as the layer's input and output gradient; unfolded only when a form needs it.

    The same per-sample gradient as :class:`OuterProductFactors` with each output pixel a
    position (``a_ip`` the input patch, ``k = C_in/G * kh * kw``), but the direct products
    ``<V, G_i> = sum_p delta_ip . (V a_ip)`` come from one convolution of the input with the
    directions as filters, without the unfolded patches (``B L k`` numbers) ever formed: the
    first-order step of a convolutional model then needs no unfold at all. The Gram and
    materialised forms unfold on first use (cached).

    Args:
        key: the gradient block's identity.
        inputs: ``[B, C_in, H, W]`` (already padded for non-zero padding modes and 'same';
            Conv1d as height 1).
        delta: ``[B, C_out, H', W']`` output gradients.
        kernel, stride, dilation, padding: the 2-d convolution's geometry.
        groups: the convolution's groups.
        weight, weight_shape, bias, bias_shape: as in :class:`OuterProductFactors`.
    """

    def __init__(
        self,
        key: Hashable,
        inputs: Tensor,
        delta: Tensor,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
        padding: tuple[int, int],
        groups: int,
        weight: str | None,
        weight_shape: tuple[int, ...],
        bias: str | None = None,
        bias_shape: tuple[int, ...] = (),
    ) -> None:
        self.key = key
        self.inputs, self.delta = inputs, delta
        self.geometry = (kernel, stride, dilation, padding, groups)
        self.weight, self.weight_shape = weight, tuple(weight_shape)
        self.bias, self.bias_shape = bias, tuple(bias_shape)
        self.rows, self.bias_rows, self.transposed = None, None, False
        self.slices = {}
        if weight is not None:
            self.slices[weight] = None
        if bias is not None:
            self.slices[bias] = None
        self._columns: Tensor | None = None
        self._shape_gpmk: tuple[int, int, int, int] | None = None

    @property  # type: ignore[override]
    def activations(self) -> Tensor:
        """``[B, G, L, k]`` unfolded input patches (formed on first use)."""
        if self._columns is None:
            kernel, stride, dilation, padding, groups = self.geometry
            columns = F.unfold(self.inputs, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, C k, L]
            self._columns = columns.reshape(columns.shape[0], groups, -1, columns.shape[-1]).transpose(2, 3)
        return self._columns

    @property  # type: ignore[override]
    def backprops(self) -> Tensor:
        """``[B, G, L, m]`` (a view of the output gradient)."""
        batch, channels = self.delta.shape[:2]
        groups = self.geometry[4]
        return self.delta.reshape(batch, groups, channels // groups, -1).transpose(2, 3)

    @property
    def reference(self) -> Tensor:
        return self.delta

    @property
    def batch_size(self) -> int:
        return int(self.delta.shape[0])

    @property
    def _gpmk(self) -> tuple[int, int, int, int]:
        # Read by every cost estimate (several per layer per product): shapes only, formed once.
        if self._shape_gpmk is None:
            (kh, kw), groups = self.geometry[0], self.geometry[4]
            positions = math.prod(self.delta.shape[2:])
            self._shape_gpmk = (groups, positions, int(self.delta.shape[1]) // groups, int(self.inputs.shape[1]) // groups * kh * kw)
        return self._shape_gpmk

    def scaled(self, scale: float | Tensor) -> LayerFactors:
        kernel, stride, dilation, padding, groups = self.geometry
        return ConvolutionFactors(
            self.key, self.inputs, self.delta * scale, kernel, stride, dilation, padding, groups, self.weight, self.weight_shape, self.bias, self.bias_shape
        )

    def summed_gradient(self) -> dict[str, Tensor]:
        # The convolution's own weight gradient (aten's convolution backward), not delta^T @ patches:
        # no unfolded patches for G_sum either.
        kernel, stride, dilation, padding, groups = self.geometry
        out: dict[str, Tensor] = {}
        if self.weight is not None:
            shape = (self.delta.shape[1], self.inputs.shape[1] // groups, *kernel)
            gradient = torch.nn.grad.conv2d_weight(self.inputs, shape, self.delta, stride, padding, dilation, groups)
            out[self.weight] = gradient.reshape(self.weight_shape)
        if self.bias is not None:
            out[self.bias] = self.delta.sum(dim=(0, 2, 3)).reshape(self.bias_shape)
        return out

    def dots(self, directions: dict[str, Tensor]) -> Tensor:
        kernel, stride, dilation, padding, groups = self.geometry
        batch = self.batch_size
        groups_, positions, m, k = self._gpmk
        total = torch.zeros((), dtype=self.delta.dtype, device=self.delta.device)
        if self.weight is not None:
            filters = directions[self.weight]
            count = filters.shape[0]
            # Directions inside each group ([G, D, m] output channels) so that a grouped convolution
            # applies each group's filters to that group's input channels.
            filters = filters.reshape(count, groups, m, k // (kernel[0] * kernel[1]), *kernel).transpose(0, 1)
            delta = self.delta.reshape(batch, groups, 1, m, positions)
            step = _chunk_size(batch * groups * m * positions)
            parts = []
            for start in range(0, count, step):
                chunk = filters[:, start : start + step]
                d = chunk.shape[1]
                out = F.conv2d(self.inputs, chunk.reshape(groups * d * m, *chunk.shape[3:]), None, stride, padding, dilation, groups)
                parts.append((out.reshape(batch, groups, d, m, positions) * delta).sum(dim=(1, 3, 4)).T)
            total = torch.cat(parts, dim=0)
        if self.bias is not None:
            bias = directions[self.bias]
            total = total + bias.reshape(bias.shape[0], -1).to(self.delta.dtype) @ self.delta.flatten(2).sum(dim=2).T  # [D, C] @ [C, B]
        return total


class EmbeddingFactors(LayerFactors):
    """``G_i = sum_p onehot(idx_ip) delta_ip^T`` for a lookup table ``[V, d]``.

    Args:
        key: the gradient block's identity.
        indices: ``[B, P]`` looked-up rows (padding positions already carry zero backprops).
        backprops: ``[B, P, d]`` output gradients.
        weight: global name of the table.
        num_embeddings: V, the table's rows.
    """

    def __init__(self, key: Hashable, indices: Tensor, backprops: Tensor, weight: str, num_embeddings: int) -> None:
        self.key = key
        self.indices = indices
        self.backprops = backprops
        self.weight = weight
        self.num_embeddings = num_embeddings
        self.slices = {weight: None}

    def _like(self, indices: Tensor, backprops: Tensor) -> EmbeddingFactors:
        return EmbeddingFactors(self.key, indices, backprops, self.weight, self.num_embeddings)

    @property
    def batch_size(self) -> int:
        return int(self.backprops.shape[0])

    def merge(self, others: Sequence[LayerFactors]) -> LayerFactors:
        items = [self, *others]
        return self._like(
            torch.cat([item.indices for item in items], dim=1),  # type: ignore[attr-defined]
            torch.cat([item.backprops for item in items], dim=1),  # type: ignore[attr-defined]
        )

    def scaled(self, scale: float | Tensor) -> LayerFactors:
        return self._like(self.indices, self.backprops * scale)

    def forms(self) -> tuple[Form, ...]:
        return FORMS

    def dots(self, directions: dict[str, Tensor]) -> Tensor:
        table = directions[self.weight]  # [D, V, d]
        positions, width = self.backprops.shape[1:]
        step = _chunk_size(self.batch_size * positions * width)
        parts = []
        for start in range(0, table.shape[0], step):
            rows = table[start : start + step][:, self.indices]  # [d, B, P, width]
            parts.append((rows * self.backprops.unsqueeze(0)).sum(dim=(2, 3)))
        return torch.cat(parts, dim=0)

    def per_sample_gradients(self) -> dict[str, Tensor]:
        batch, positions, width = self.backprops.shape
        out = self.backprops.new_zeros((batch, self.num_embeddings, width))
        out.scatter_add_(1, self.indices.unsqueeze(-1).expand(batch, positions, width), self.backprops)
        return {self.weight: out}

    def summed_gradient(self) -> dict[str, Tensor]:
        width = self.backprops.shape[-1]
        out = self.backprops.new_zeros((self.num_embeddings, width))
        out.index_add_(0, self.indices.reshape(-1), self.backprops.reshape(-1, width))
        return {self.weight: out}

    def gram(self, other: LayerFactors) -> Tensor:
        assert isinstance(other, EmbeddingFactors)
        positions = self.indices.shape[1]
        step = _chunk_size(other.batch_size * positions * other.indices.shape[1])
        rows = []
        for start in range(0, self.batch_size, step):
            same = self.indices[start : start + step, None, :, None] == other.indices[None, :, None, :]  # [i, j, P, Q]
            products = torch.einsum("ipd,jqd->ijpq", self.backprops[start : start + step], other.backprops)
            rows.append((products * same).sum(dim=(2, 3)))
        return torch.cat(rows, dim=0)

    def squared_norms(self) -> Tensor:
        same = self.indices.unsqueeze(2) == self.indices.unsqueeze(1)  # [B, P, P]
        return ((self.backprops @ self.backprops.transpose(1, 2)) * same).sum(dim=(1, 2))

    def cost(self, quantity: Literal["dots", "gram", "norms"], form: Form, directions: int = 1, other: LayerFactors | None = None) -> float:
        batch, positions, width = self.backprops.shape
        build = batch * positions * width
        size = self.num_embeddings * width
        if quantity == "dots":
            return {"direct": directions * build, "materialised": build + batch * size + directions * batch * size}.get(form, float("inf"))
        if quantity == "gram":
            assert isinstance(other, EmbeddingFactors)
            other_positions = other.indices.shape[1]
            if form == "gram":
                return batch * other.batch_size * positions * other_positions * (width + 1)
            return build + batch * size + other.cost("dots", "materialised", 0) + batch * other.batch_size * size if form == "materialised" else float("inf")
        if form == "gram":
            return batch * positions * positions * (width + 1)
        return build + 2 * batch * size if form == "materialised" else float("inf")

    def materialised_elements(self) -> int:
        return self.batch_size * self.num_embeddings * int(self.backprops.shape[-1])


class MaterialisedFactors(LayerFactors):
    """Per-sample gradients held as they are (normalisation layers: one number per channel).

    Args:
        key: the gradient block's identity.
        gradients: ``{global name: Tensor[B, *param.shape]}``.
    """

    def __init__(self, key: Hashable, gradients: dict[str, Tensor]) -> None:
        self.key = key
        self.gradients = gradients
        self.slices = {name: None for name in gradients}

    @property
    def reference(self) -> Tensor:
        return next(iter(self.gradients.values()))

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.gradients.values())).shape[0])

    def merge(self, others: Sequence[LayerFactors]) -> LayerFactors:
        total = dict(self.gradients)
        for other in others:
            assert isinstance(other, MaterialisedFactors)
            total = {name: total[name] + other.gradients[name] for name in total}
        return MaterialisedFactors(self.key, total)

    def scaled(self, scale: float | Tensor) -> LayerFactors:
        return MaterialisedFactors(self.key, {name: value * scale for name, value in self.gradients.items()})

    def forms(self) -> tuple[Form, ...]:
        return ("materialised",)

    def dots(self, directions: dict[str, Tensor]) -> Tensor:
        return self.dots_materialised(directions)

    def per_sample_gradients(self) -> dict[str, Tensor]:
        return self.gradients

    def summed_gradient(self) -> dict[str, Tensor]:
        return {name: value.sum(dim=0) for name, value in self.gradients.items()}

    def gram(self, other: LayerFactors) -> Tensor:
        assert isinstance(other, MaterialisedFactors)
        return sum(value.flatten(1) @ other.gradients[name].flatten(1).T for name, value in self.gradients.items())  # type: ignore[return-value]

    def squared_norms(self) -> Tensor:
        return sum(value.flatten(1).pow(2).sum(dim=1) for value in self.gradients.values())  # type: ignore[return-value]

    def cost(self, quantity: Literal["dots", "gram", "norms"], form: Form, directions: int = 1, other: LayerFactors | None = None) -> float:
        if form != "materialised":
            return float("inf")
        size = sum(math.prod(value.shape[1:]) for value in self.gradients.values())  # shapes only: no indexing op
        if quantity == "dots":
            return directions * self.batch_size * size
        if quantity == "gram":
            assert other is not None
            return self.batch_size * other.batch_size * size
        return self.batch_size * size

    def materialised_elements(self) -> int:
        return sum(value.numel() for value in self.gradients.values())
