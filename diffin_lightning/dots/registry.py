"""The registry of layer rules: which module types have per-sample gradients in closed form.

One small rule per layer type, registered by decorator (in the manner of Opacus'
``register_grad_sampler``)::

    @register_layer_rule(nn.Linear)
    class LinearRule(LayerRule):
        def factors(self, module, activations, backprops, names): ...

Third-party rules (Hugging Face GPT-2's ``Conv1D``) are registered as soon as their library
is imported (by the user's model); this package never imports transformers itself.

Lookup is by exact type: a subclass may change ``forward`` (LoRA wrappers, quantised layers),
so it is covered only when registered itself. Every message that lists supported layers
reads the registry's keys (:func:`supported_layer_types`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from diffin_lightning.dots.factors import LayerFactors

_RULES: dict[type, LayerRule] = {}
_LAZY_LOADED = False

RuleType = TypeVar("RuleType", bound=type)


class LayerRule:
    """How one layer type's per-sample gradients follow from its inputs and output gradients.

    Subclasses override :meth:`factors`; the other methods have defaults that fit layers
    whose first positional input is the activation and whose output is one tensor.
    """

    #: Form the factors as soon as the call's output gradient arrives (during the backward) and let
    #: the call's inputs and gradient go there, instead of holding both until the step's products:
    #: for rules whose factors are small per-sample gradients (normalisation layers, one number per
    #: channel) computed from the call's own tensors and linear in the gradient (rescaled later).
    #: Such a call accepts one gradient per pass.
    eager: bool = False

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        """Names (relative to ``module``) of the parameters this rule gives gradients for."""
        return tuple(name for name, _ in module.named_parameters(recurse=False))

    def coverage(self, module: nn.Module) -> str:
        """What the rule covers of ``module``, in words (messages about the parameters it leaves to the fallback)."""
        return ", ".join(self.parameter_names(module))

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this instance cannot be handled (its parameters then go to the fallback), or ``None``."""
        return None

    def activations(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What to keep from the forward call (detached): by default the first input."""
        return args[0].detach()

    def outputs(self, output: Any) -> tuple[Tensor | None, ...]:
        """The output tensors whose gradients the rule needs, in the order :meth:`factors` takes them."""
        return (output,)

    def inner_gradients(self, module: nn.Module, activations: Any, output: Any) -> tuple[torch.autograd.graph.Node, ...]:
        """Autograd nodes inside the call whose incoming gradient the rule needs too (default: none).

        Their gradients follow the outputs' in ``backprops`` (``None`` where a backward did not run
        the node), rescaled like them. A rule may also add to ``activations`` (its own kept
        dictionary) what the call's graph saved. For layers that compute with their raw parameters
        inside ``forward`` (``MultiheadAttention``), where no module hook sees the products.
        """
        return ()

    def factors(self, module: nn.Module, module_name: str, activations: Any, backprops: Sequence[Tensor | None], names: dict[str, str]) -> list[LayerFactors]:
        """Factors of one call on one micro-batch.

        Args:
            module: the module (its current parameter values and hyper-parameters).
            module_name: its qualified name, part of every factors' key.
            activations: what :meth:`activations` kept.
            backprops: gradients of the summed per-sample losses with respect to :meth:`outputs`
                (``None`` where the output did not reach the loss), already rescaled.
            names: local parameter name -> global name, for the parameters to cover
                (trainable, in the requested set); the others are constants.
        """
        raise NotImplementedError


def register_layer_rule(*layer_types: type) -> Callable[[RuleType], RuleType]:
    """Class decorator: register one instance of the rule for each of ``layer_types`` (exact types)."""

    def register(rule_class: RuleType) -> RuleType:
        for layer_type in layer_types:
            _RULES[layer_type] = rule_class()
        return rule_class

    return register


def _load_rules() -> None:
    global _LAZY_LOADED
    from diffin_lightning.dots import rules  # registers the built-in rules on first import

    if not _LAZY_LOADED:
        _LAZY_LOADED = True
    # Third-party layers (Hugging Face's Conv1D) join once their library has been imported by
    # the user's model: a dictionary look-up per call, never an import of transformers here.
    rules.register_optional_rules()


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)``, or ``None``."""
    _load_rules()
    return _RULES.get(type(module))


def supported_layer_types() -> tuple[str, ...]:
    """Qualified names of every registered layer type, sorted (for messages and docs)."""
    _load_rules()
    return tuple(sorted(f"{t.__module__}.{t.__qualname__}" for t in _RULES))


def supported_layers_message() -> str:
    """One line listing the registered layer types by their short names."""
    _load_rules()
    return ", ".join(sorted(t.__qualname__ if t.__module__.startswith("torch.nn") else f"{t.__module__}.{t.__qualname__}" for t in _RULES))
