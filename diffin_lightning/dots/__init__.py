"""Per-sample dot products from the training step's own forward and backward.

Three parts:

- a registry of layer rules (:mod:`~diffin_lightning.dots.registry`, built-ins in
  :mod:`~diffin_lightning.dots.rules`): Linear (any number of position dims), Conv1d/Conv2d
  (stride, padding and padding modes, dilation, groups), Embedding (``padding_idx``),
  LayerNorm / RMSNorm / GroupNorm affine parameters, MultiheadAttention's projections
  (recomputed core; attention dropout > 0 goes to the fallback) and Hugging Face GPT-2's
  ``Conv1D`` (registered once transformers is imported);
- :class:`LayerCapture`: hooks that keep each covered layer's inputs and output gradients
  during any forward+backward while recording; :meth:`LayerCapture.per_sample` returns a
  :class:`PerSampleDots` whose layers each use the cheapest of the direct, Gram and
  materialised forms by a cost model;
- :func:`functional_dots` (and :func:`functional_squared_norms`): ``torch.func.jvp`` or a
  central finite difference of the per-sample losses, for the parameters no rule covers
  (``LayerCapture.uncovered_parameter_names``) and only those.

The per-sample totals are the sums of the two parts (the parameter sets are disjoint).

Example::

    >>> import torch
    >>> from torch import nn
    >>> from diffin_lightning.dots import LayerCapture, functional_dots
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    >>> capture = LayerCapture(model)
    >>> capture.covered_parameter_names
    ('0.weight', '0.bias', '2.weight', '2.bias')
    >>> with capture.recording():
    ...     ((model(x) - y) ** 2).sum(1).mean().backward()      # the training step's own pass
    >>> per_sample = capture.per_sample(backprop_scale=5)      # mean over 5 samples -> sum
    >>> direction = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    >>> dots = per_sample.dots([direction])                    # Tensor[1, 5]: <1, G_i>
    >>> params = {n: p.detach() for n, p in model.named_parameters()}
    >>> losses = lambda p: ((torch.func.functional_call(model, p, (x,)) - y) ** 2).sum(1)
    >>> exact = functional_dots(losses, params, [direction], method="jvp")
    >>> torch.allclose(dots, exact)
    True
    >>> per_sample.gradient_dots().shape, per_sample.squared_norms().shape   # <G_sum, G_i>, |G_i|^2
    (torch.Size([5]), torch.Size([5]))
    >>> capture.remove()
"""

from diffin_lightning.dots.capture import LayerCapture
from diffin_lightning.dots.factors import EmbeddingFactors, LayerFactors, MaterialisedFactors, OuterProductFactors
from diffin_lightning.dots.functional import FALLBACK_METHODS, finite_difference_step, functional_dots, functional_squared_norms
from diffin_lightning.dots.per_sample_dots import PerSampleDots
from diffin_lightning.dots.registry import LayerRule, register_layer_rule, rule_for, supported_layer_types, supported_layers_message

__all__ = [
    "FALLBACK_METHODS",
    "EmbeddingFactors",
    "LayerCapture",
    "LayerFactors",
    "LayerRule",
    "MaterialisedFactors",
    "OuterProductFactors",
    "PerSampleDots",
    "finite_difference_step",
    "functional_dots",
    "functional_squared_norms",
    "register_layer_rule",
    "rule_for",
    "supported_layer_types",
    "supported_layers_message",
]
