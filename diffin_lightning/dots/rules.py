"""The built-in layer rules: one small pure rule per layer type.

Every rule maps (module, what its forward hook kept, the output gradients of the summed
per-sample losses) to :mod:`~diffin_lightning.dots.factors`; nothing here touches autograd
state except :class:`MultiheadAttentionRule`, which reads its projections from the call's graph
or, where it cannot, recomputes the attention core once (see there).

Conventions: the sample axis is dim 0 of every input and output (batch-first models);
everything between the sample axis and the feature axis is "positions" (sequence, pixels).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffin_lightning.dots.factors import ConvolutionFactors, EmbeddingFactors, LayerFactors, MaterialisedFactors, OuterProductFactors
from diffin_lightning.dots.registry import LayerRule, register_layer_rule


def _shape(module: nn.Module, local: str) -> tuple[int, ...]:
    value = module.get_parameter(local)
    return tuple(value.shape)


def _sum_positions(tensor: Tensor, keep_trailing: int) -> Tensor:
    """Sum every dim between the sample axis and the last ``keep_trailing`` dims."""
    dims = tuple(range(1, tensor.dim() - keep_trailing))
    return tensor.sum(dim=dims) if dims else tensor  # sum(dim=()) would reduce everything


@register_layer_rule(nn.Linear)
class LinearRule(LayerRule):
    """``y = x W^T + b`` on inputs ``[B, d]`` or ``[B, ..., d]`` (every middle dim is a position)."""

    # Hugging Face's Conv1D (HuggingFaceConv1DRule) is the same map with the weight stored [in, out].
    kind = "linear"
    transposed = False

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        delta = backprops[0]
        if delta is None:
            return []
        batch = delta.shape[0]
        return [
            OuterProductFactors(
                (module_name, self.kind),
                activations.reshape(batch, 1, -1, activations.shape[-1]),
                delta.reshape(batch, 1, -1, delta.shape[-1]),
                names.get("weight"),
                _shape(module, "weight"),
                names.get("bias"),
                _shape(module, "bias") if getattr(module, "bias", None) is not None else (),
                transposed=self.transposed,
            )
        ]


@register_layer_rule(nn.Conv1d, nn.Conv2d)
class ConvolutionRule(LayerRule):
    """Convolutions by unfolding: each output pixel is a position, each group a block (any stride,
    padding, padding mode, dilation, groups; Conv1d as a Conv2d of height 1)."""

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        delta = backprops[0]
        if delta is None:
            return []
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        inputs = activations
        padding: Any = module.padding
        if module.padding_mode != "zeros":
            inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        elif isinstance(padding, str):
            if padding == "same":
                # As aten does for 'same': total dilation*(kernel-1), the odd one on the right.
                pads: list[int] = []
                for kernel, dilation in zip(reversed(module.kernel_size), reversed(module.dilation)):
                    total = dilation * (kernel - 1)
                    pads += [total // 2, total - total // 2]
                inputs = F.pad(inputs, pads)
            padding = 0
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if isinstance(module, nn.Conv1d):
            inputs = inputs.unsqueeze(2)
            kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
            padding = (0, padding if isinstance(padding, int) else padding[0])
        if isinstance(module, nn.Conv1d):
            delta = delta.unsqueeze(2)
        pair = (lambda value: (value, value) if isinstance(value, int) else tuple(value))
        return [
            ConvolutionFactors(
                (module_name, "conv"),
                inputs,
                delta,
                pair(kernel),
                pair(stride),
                pair(dilation),
                pair(padding),
                module.groups,
                names.get("weight"),
                _shape(module, "weight"),
                names.get("bias"),
                _shape(module, "bias") if module.bias is not None else (),
            )
        ]


@register_layer_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    """A lookup table on indices ``[B, ...]``; the ``padding_idx`` row gets no gradient (as in PyTorch)."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Embedding)
        if module.max_norm is not None:
            return "max_norm renormalises looked-up rows in place (their gradient is not the table's)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq divides gradients by batch-wide counts (not a per-sample quantity)"
        return None

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        delta = backprops[0]
        if delta is None or "weight" not in names:
            return []
        assert isinstance(module, nn.Embedding)
        batch = delta.shape[0]
        indices = activations.reshape(batch, -1)
        delta = delta.reshape(batch, -1, delta.shape[-1])
        if module.padding_idx is not None:
            delta = delta * (indices != module.padding_idx).unsqueeze(-1).to(delta.dtype)
        return [EmbeddingFactors((module_name, "embedding"), indices, delta, names["weight"], module.num_embeddings)]


def _affine_gradients(normalised: Tensor, delta: Tensor, trailing: int, names: dict[str, str]) -> dict[str, Tensor]:
    gradients = {}
    if "weight" in names:
        gradients[names["weight"]] = _sum_positions(delta * normalised, trailing)
    if "bias" in names:
        gradients[names["bias"]] = _sum_positions(delta, trailing)
    return gradients


@register_layer_rule(nn.LayerNorm)
class LayerNormRule(LayerRule):
    """Affine parameters of LayerNorm: ``dW_i = sum_positions delta * x_hat``, ``db_i = sum_positions delta``."""

    eager = True

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        delta = backprops[0]
        if delta is None or not names:
            return []
        assert isinstance(module, nn.LayerNorm)
        normalised = F.layer_norm(activations, module.normalized_shape, None, None, module.eps)
        return [MaterialisedFactors((module_name, "norm"), _affine_gradients(normalised, delta, len(module.normalized_shape), names))]


@register_layer_rule(nn.RMSNorm)
class RMSNormRule(LayerRule):
    """The scale of RMSNorm: ``dW_i = sum_positions delta * x / rms(x)``."""

    eager = True

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        delta = backprops[0]
        if delta is None or not names:
            return []
        assert isinstance(module, nn.RMSNorm)
        normalised = F.rms_norm(activations, module.normalized_shape, None, module.eps)
        return [MaterialisedFactors((module_name, "norm"), _affine_gradients(normalised, delta, len(module.normalized_shape), names))]


@register_layer_rule(nn.GroupNorm)
class GroupNormRule(LayerRule):
    """Affine parameters of GroupNorm on ``[B, C, ...]``: per channel, summed over the spatial dims."""

    eager = True

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        delta = backprops[0]
        if delta is None or not names:
            return []
        assert isinstance(module, nn.GroupNorm)
        normalised = F.group_norm(activations, module.num_groups, None, None, module.eps)
        spatial = tuple(range(2, delta.dim()))
        gradients = {}
        if "weight" in names:
            product = delta * normalised
            gradients[names["weight"]] = product.sum(dim=spatial) if spatial else product
        if "bias" in names:
            gradients[names["bias"]] = delta.sum(dim=spatial) if spatial else delta
        return [MaterialisedFactors((module_name, "norm"), gradients)]


_ATTENTION_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@register_layer_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    """The in-projection (packed or separate) and out-projection of ``nn.MultiheadAttention``.

    ``MultiheadAttention`` passes its raw parameters to ``F.multi_head_attention_forward``,
    so no hook sees the projections' inputs and outputs. For self-attention with the packed
    weight (``TransformerEncoderLayer``), the rule finds the two projections' product nodes in
    the call's autograd graph (:meth:`inner_gradients`): the in-projection's incoming gradient
    and the out-projection's saved input are then captured as the backward runs, and nothing is
    recomputed. Otherwise (cross-attention, separate weights, or a backward that did not run the
    in-projection's node) the rule keeps the call's inputs (and a copy of the projection
    parameters), then, when asked for factors, recomputes the attention core once for the whole
    micro-batch with the projections taken out: it
    projects ``q, k, v`` itself, runs ``F.multi_head_attention_forward`` on them with identity
    projection matrices (multiplying by an identity is exact in floating point), and
    back-propagates the captured output gradient to ``q, k, v`` (reverse mode: every SDPA
    kernel has a backward). The projections are then ordinary outer products.

    Not handled (these parameters go to the fallback): attention dropout ``dropout > 0``
    (the recomputation cannot replay the kernel's dropout mask) and ``bias_k`` / ``bias_v``
    (``add_bias_kv=True``: appended inside the core).
    """

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        assert isinstance(module, nn.MultiheadAttention)
        names = ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        if module.in_proj_bias is not None:
            names.append("in_proj_bias")
        names.append("out_proj.weight")
        if module.out_proj.bias is not None:
            names.append("out_proj.bias")
        return tuple(names)

    def coverage(self, module: nn.Module) -> str:
        return f"its projections ({', '.join(self.parameter_names(module))})"

    def unsupported_reason(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.MultiheadAttention)
        if module.dropout > 0:
            return f"attention dropout ({module.dropout}) draws a mask that the projections' recomputation cannot replay; set dropout=0.0 to cover it"
        return None

    def activations(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bound = _ATTENTION_SIGNATURE.bind(module, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        query, key, value = call["query"], call["key"], call["value"]
        if query.dim() != 3:
            raise ValueError(
                f"MultiheadAttention rule: `query` must be batched (3 dims, the sample axis first with batch_first=True); got shape {tuple(query.shape)}. "
                "Fix: batch the inputs, or exclude this module's parameters from the capture."
            )
        kept = {name: (value_.detach() if isinstance(value_, Tensor) else value_) for name, value_ in call.items()}
        kept["self_attention"] = query is key and key is value
        # References here; inner_gradients copies them where the call's graph does not give the projections
        # (the recomputation reads their values later). The graph path reads only their shapes; should its
        # node go unreached (a products-only pass with nothing below), the recomputation reads the parameters
        # as they are when LayerCapture.per_sample runs, which its contract puts before they change.
        kept["parameters"] = {name: module.get_parameter(name).detach() for name in self.parameter_names(module)}
        return kept

    @staticmethod
    def _copy_parameters(activations: Any) -> tuple[()]:
        activations["parameters"] = {name: value.clone() for name, value in activations["parameters"].items()}
        return ()

    def outputs(self, output: Any) -> tuple[Tensor | None, ...]:
        return (output[0], output[1])

    def inner_gradients(self, module: nn.Module, activations: Any, output: Any) -> tuple[torch.autograd.graph.Node, ...]:
        """Self-attention with the packed weight: the in-projection's product node, whose incoming
        gradient is the packed ``q|k|v`` gradient, and (kept) the out-projection's saved input, the
        attention core. Read from the call's own graph, nothing is recomputed (no second SDPA
        forward and backward: a third of a plain fit on a 2x64 encoder), and whatever ran inside
        the call (masks, ``bias_k``, the attention weights' own gradient) is in them exactly."""
        assert isinstance(module, nn.MultiheadAttention)
        attention = output[0] if isinstance(output, tuple) else output
        if not (module._qkv_same_embed_dim and activations["self_attention"]) or getattr(attention, "grad_fn", None) is None:
            return self._copy_parameters(activations)
        found = _projection_nodes(attention.grad_fn, module.in_proj_weight, module.out_proj.weight)
        if found is None:
            return self._copy_parameters(activations)
        in_projection, core = found
        activations["core"] = core.detach()  # [T B, E], sequence-major rows (the module computes seq-first)
        return (in_projection,)

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        assert isinstance(module, nn.MultiheadAttention)
        out_delta, weights_delta = backprops[0], backprops[1]
        packed_rows = backprops[2] if len(backprops) > 2 else None
        if out_delta is None and weights_delta is None:
            return []
        kept = activations
        params = kept["parameters"]
        embed = module.embed_dim
        batch_first = module.batch_first

        def seq_first(tensor: Tensor) -> Tensor:
            return tensor.transpose(0, 1) if batch_first else tensor

        def batch_major(tensor: Tensor) -> Tensor:
            return tensor if batch_first else tensor.transpose(0, 1)

        if packed_rows is not None and out_delta is not None and "core" in kept:
            # From the call's own graph (inner_gradients): rows (t, b) of the seq-first products.
            query = batch_major(kept["query"])
            length, batch = query.shape[1], query.shape[0]
            core = kept["core"]
            if packed_rows.shape == (length * batch, 3 * embed) and core.shape == (length * batch, embed):
                packed_delta = packed_rows.view(length, batch, 3 * embed).transpose(0, 1)
                core_rows = core.view(length, batch, embed).transpose(0, 1)
                return self._projection_factors(module_name, names, params, query, packed_delta, core_rows, batch_major(out_delta))
        fast = self._self_attention_core(module, kept, params, out_delta, weights_delta)
        if fast is not None:
            # The common case (TransformerEncoderLayer): one packed projection, SDPA, no masks to merge.
            query_rows, packed_delta, core_rows = fast
            assert out_delta is not None
            return self._projection_factors(module_name, names, params, query_rows, packed_delta, core_rows, batch_major(out_delta))
        inputs = [kept["query"], kept["key"], kept["value"]]
        if module._qkv_same_embed_dim:
            weights = list(params["in_proj_weight"].chunk(3))
        else:
            weights = [params["q_proj_weight"], params["k_proj_weight"], params["v_proj_weight"]]
        biases = list(params["in_proj_bias"].chunk(3)) if "in_proj_bias" in params else [None, None, None]
        with torch.enable_grad():
            projected = [F.linear(x, w, b).detach().requires_grad_(True) for x, w, b in zip(inputs, weights, biases)]
            identity = torch.eye(embed, dtype=projected[0].dtype, device=projected[0].device)
            core, attention_weights = F.multi_head_attention_forward(
                *(seq_first(p) for p in projected),
                embed,
                module.num_heads,
                None,
                None,
                module.bias_k.detach() if module.bias_k is not None else None,
                module.bias_v.detach() if module.bias_v is not None else None,
                module.add_zero_attn,
                0.0,
                identity,
                None,
                training=module.training,
                key_padding_mask=kept["key_padding_mask"],
                need_weights=kept["need_weights"],
                attn_mask=kept["attn_mask"],
                use_separate_proj_weight=True,
                q_proj_weight=identity,
                k_proj_weight=identity,
                v_proj_weight=identity,
                average_attn_weights=kept["average_attn_weights"],
                is_causal=kept["is_causal"],
            )
            roots, grads = [], []
            if out_delta is not None:
                roots.append(core)
                grads.append(seq_first(out_delta) @ params["out_proj.weight"])
            if weights_delta is not None and attention_weights is not None:
                roots.append(attention_weights)
                grads.append(weights_delta)
            deltas = torch.autograd.grad(roots, projected, grads, allow_unused=True)
        # Back to batch-major (samples on dim 0) for the factors: module layout for inputs and
        # their gradients, sequence-first for the core's output.
        deltas = [batch_major(torch.zeros_like(p) if d is None else d) for p, d in zip(projected, deltas)]
        inputs = [batch_major(x) for x in inputs]
        core_rows = core.detach().transpose(0, 1)
        batch = deltas[0].shape[0]

        def rows4(tensor: Tensor) -> Tensor:  # [B, T, d] -> [B, 1, T, d]
            return tensor.reshape(batch, 1, -1, tensor.shape[-1])

        factors: list[LayerFactors] = []
        bias_name = names.get("in_proj_bias")
        bias_shape = tuple(params["in_proj_bias"].shape) if "in_proj_bias" in params else ()
        if module._qkv_same_embed_dim and kept["self_attention"]:
            factors.append(
                OuterProductFactors(
                    (module_name, "in_proj"),
                    rows4(inputs[0]),
                    rows4(torch.cat(deltas, dim=-1)),
                    names.get("in_proj_weight"),
                    tuple(params["in_proj_weight"].shape),
                    bias_name,
                    bias_shape,
                )
            )
        else:
            for index, tag in enumerate("qkv"):
                rows = slice(index * embed, (index + 1) * embed)
                if module._qkv_same_embed_dim:
                    weight_name, weight_shape, weight_rows = names.get("in_proj_weight"), tuple(params["in_proj_weight"].shape), rows
                else:
                    local = f"{tag}_proj_weight"
                    weight_name, weight_shape, weight_rows = names.get(local), tuple(params[local].shape), None
                if weight_name is None and bias_name is None:
                    continue
                factors.append(
                    OuterProductFactors(
                        (module_name, f"{tag}_proj"),
                        rows4(inputs[index]),
                        rows4(deltas[index]),
                        weight_name,
                        weight_shape,
                        bias_name,
                        bias_shape,
                        rows=weight_rows,
                        bias_rows=rows,
                    )
                )
        if out_delta is not None and ("out_proj.weight" in names or "out_proj.bias" in names):
            factors.append(
                OuterProductFactors(
                    (module_name, "out_proj"),
                    rows4(core_rows),
                    rows4(batch_major(out_delta)),
                    names.get("out_proj.weight"),
                    tuple(params["out_proj.weight"].shape),
                    names.get("out_proj.bias"),
                    tuple(params["out_proj.bias"].shape) if "out_proj.bias" in params else (),
                )
            )
        return factors

    @staticmethod
    def _self_attention_core(
        module: nn.MultiheadAttention, kept: dict[str, Any], params: dict[str, Tensor], out_delta: Tensor | None, weights_delta: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(query, packed q|k|v gradient, core output)``, all ``[B, T, .]``, by one SDPA call; ``None`` off the common case.

        ``F.multi_head_attention_forward`` with identity projections (the general path) adds
        four identity matrix products and their backward: on a 2x64 encoder at batch 128 that
        path took several times as long as this one. Here the packed projection is taken once,
        split into heads as the module does, and ``scaled_dot_product_attention`` (the kernel
        the module itself calls without weights) is differentiated to the projection's output.
        Covered: self-attention with the packed weight, no attention weights needed downstream,
        no ``bias_k``/``bias_v``/``add_zero_attn``, no key padding mask, and either no
        attention mask or a causal one flagged with ``is_causal``.
        """
        if not (module._qkv_same_embed_dim and kept["self_attention"]) or weights_delta is not None or out_delta is None:
            return None
        if module.bias_k is not None or module.add_zero_attn or kept["key_padding_mask"] is not None:
            return None
        causal = bool(kept["is_causal"])
        if kept["attn_mask"] is not None and not causal:
            return None
        query = kept["query"] if module.batch_first else kept["query"].transpose(0, 1)
        batch, length, embed = query.shape
        heads = module.num_heads
        with torch.enable_grad():
            packed = F.linear(query, params["in_proj_weight"], params.get("in_proj_bias")).detach().requires_grad_(True)
            q, k, v = packed.view(batch, length, 3, heads, embed // heads).permute(2, 0, 3, 1, 4)
            core = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(batch, length, embed)
            delta = out_delta if module.batch_first else out_delta.transpose(0, 1)
            (packed_delta,) = torch.autograd.grad(core, packed, delta @ params["out_proj.weight"])
        return query, packed_delta, core.detach()

    @staticmethod
    def _projection_factors(
        module_name: str, names: dict[str, str], params: dict[str, Tensor], query: Tensor, packed_delta: Tensor, core: Tensor, out_delta: Tensor
    ) -> list[LayerFactors]:
        """The packed in-projection's and the out-projection's outer-product factors (every tensor ``[B, T, .]``)."""
        batch = query.shape[0]

        def rows4(tensor: Tensor) -> Tensor:  # [B, T, d] -> [B, 1, T, d]
            return tensor.reshape(batch, 1, -1, tensor.shape[-1])

        factors: list[LayerFactors] = []
        if "in_proj_weight" in names or "in_proj_bias" in names:
            factors.append(
                OuterProductFactors(
                    (module_name, "in_proj"),
                    rows4(query),
                    rows4(packed_delta),
                    names.get("in_proj_weight"),
                    tuple(params["in_proj_weight"].shape),
                    names.get("in_proj_bias"),
                    tuple(params["in_proj_bias"].shape) if "in_proj_bias" in params else (),
                )
            )
        if "out_proj.weight" in names or "out_proj.bias" in names:
            factors.append(
                OuterProductFactors(
                    (module_name, "out_proj"),
                    rows4(core),
                    rows4(out_delta),
                    names.get("out_proj.weight"),
                    tuple(params["out_proj.weight"].shape),
                    names.get("out_proj.bias"),
                    tuple(params["out_proj.bias"].shape) if "out_proj.bias" in params else (),
                )
            )
        return factors


def _projection_nodes(start: torch.autograd.graph.Node, in_weight: Tensor, out_weight: Tensor, limit: int = 256) -> tuple[torch.autograd.graph.Node, Tensor] | None:
    """``(in-projection product node, out-projection's saved input)`` in an attention call's graph, or ``None``.

    A product node (``MmBackward0``/``AddmmBackward0``) whose weight operand is ``in_weight`` or
    ``out_weight`` (a leaf, possibly through its transpose). The walk stops at the in-projection
    (below it lies the model before the attention) and after ``limit`` nodes; anything unexpected
    gives ``None`` and the rule recomputes instead.
    """

    def weight_of(node: torch.autograd.graph.Node) -> Tensor | None:
        for following, _ in node.next_functions:
            if following is not None and type(following).__name__ == "TBackward0":
                following = following.next_functions[0][0] if following.next_functions else None
            variable = getattr(following, "variable", None)
            if variable is in_weight or variable is out_weight:
                return variable
        return None

    in_projection, core = None, None
    queue, seen = [start], {start}
    while queue and len(seen) <= limit:
        node = queue.pop(0)
        kind = type(node).__name__
        if kind in ("MmBackward0", "AddmmBackward0"):
            weight = weight_of(node)
            if weight is in_weight and in_projection is None:
                in_projection = node
                continue
            if weight is out_weight and core is None:
                saved = getattr(node, "_saved_mat1" if kind == "AddmmBackward0" else "_saved_self", None)
                if not isinstance(saved, Tensor):
                    return None
                core = saved
        for following, _ in node.next_functions:
            if following is not None and following not in seen:
                seen.add(following)
                queue.append(following)
    if in_projection is None or core is None:
        return None
    return in_projection, core


class HuggingFaceConv1DRule(LinearRule):
    """Hugging Face GPT-2's ``Conv1D``: ``y = x W + b`` with ``W`` stored ``[in, out]``."""

    kind = "conv1d"
    transposed = True


def register_optional_rules() -> None:
    """Register rules for third-party layers whose library is already imported (never imports it)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    if conv1d is not None:
        register_layer_rule(conv1d)(HuggingFaceConv1DRule)
