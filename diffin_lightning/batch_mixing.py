"""Find the layers that make one sample's loss depend on the other samples of its batch.

Per-sample influence assumes ``L_B = (1/|B|) sum_i l_i`` with each ``l_i`` a function of
sample ``i`` alone. A layer that normalises with batch statistics (BatchNorm in train mode)
breaks that: ``l_i`` then depends on every sample in the batch, per-sample gradients are not
defined, and the scores are only an approximation. The callback refuses such models at
``setup`` unless the user accepts approximate scores (``allow_batch_mixing=True``).

Rules live in a registry, one predicate per layer type; the message lists the offending
layers by name. A module of any other type can declare itself with an attribute
``mixes_samples = True``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_RULES: dict[type[nn.Module], Callable[[nn.Module], bool]] = {}


def register_batch_mixing(module_type: type[nn.Module]) -> Callable[[Callable[[nn.Module], bool]], Callable[[nn.Module], bool]]:
    """Register ``predicate(module) -> bool``: does this module mix the samples of a batch?"""

    def decorate(predicate: Callable[[nn.Module], bool]) -> Callable[[nn.Module], bool]:
        _RULES[module_type] = predicate
        return predicate

    return decorate


@register_batch_mixing(nn.modules.batchnorm._BatchNorm)
def _batch_norm_mixes(module: nn.Module) -> bool:
    # Train mode always normalises with the batch's statistics; eval mode does too when no
    # running statistics are kept (track_running_stats=False).
    return module.training or getattr(module, "running_mean", None) is None


def batch_mixing_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, type)`` of every submodule whose output for one sample depends on the others in its batch.

    Example::

        >>> from torch import nn
        >>> batch_mixing_modules(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4)))
        [('1', 'BatchNorm1d')]
    """
    found = []
    for name, module in model.named_modules():
        mixes = getattr(module, "mixes_samples", None)
        if mixes is None:
            mixes = any(isinstance(module, module_type) and rule(module) for module_type, rule in _RULES.items())
        if mixes:
            found.append((name or "<model>", type(module).__name__))
    return found


def batch_mixing_message(found: list[tuple[str, str]]) -> str:
    """The refusal: which layers, why, and the two ways out."""
    listed = ", ".join(f"{name} ({kind})" for name, kind in found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    return (
        f"DiffInCallback: the model has layers that mix the samples of a batch in training: {listed}. "
        "With them one sample's loss depends on the others in its batch, so per-sample influence is not "
        "defined and the scores would only be approximate. Replace them with per-sample layers (BatchNorm -> "
        "GroupNorm or LayerNorm), or pass allow_batch_mixing=True to accept approximate scores. "
        f"Layer types checked: {', '.join(sorted(t.__name__ for t in _RULES))} and any module with "
        "`mixes_samples = True`."
    )
