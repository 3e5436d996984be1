"""Checks on what the user hands the callback: its targets, the module, the per-sample loss, the optimizer.

Each check raises (or warns, where the scores are only approximate) with the fix in its message,
at the first moment the callback can tell: the targets at construction, the module at ``setup``,
the optimizer at ``on_train_start``, the per-sample loss on the first training batch. The sample
ids have their own module, :mod:`diffin_lightning.sample_ids`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from diffin_lightning.batch_mixing import batch_mixing_message, batch_mixing_modules
from diffin_lightning.engine import replayed_rng
from diffin_lightning.per_sample import PerSampleLoss
from diffin_lightning.settings import DiffInSettings
from diffin_lightning.targets import DatasetTarget, Target


def default_loss_fn(module: nn.Module, batch: Any) -> Tensor:
    """The per-sample loss when no ``loss_fn`` is given: the module's ``per_sample_loss(batch)`` (see :func:`check_module`)."""
    return module.per_sample_loss(batch)  # type: ignore[operator]


def check_targets(settings: DiffInSettings, targets: Sequence[Target]) -> None:
    """Refuse an extrapolation with nothing to extrapolate; warn once of options this combination never reads."""
    if settings.extrapolation_named and not any(isinstance(target, DatasetTarget) for target in targets):
        raise ValueError(
            f"`target_extrapolation={settings.target_extrapolation!r}` extrapolates a dataset target's g_V, but `targets` "
            f"holds none (only {sorted(t.kind for t in targets)}). Add a dataset target or drop target_extrapolation."
        )
    datasets = [target for target in targets if isinstance(target, DatasetTarget)]
    inert = settings.inert_options([target.kind for target in targets], bool(datasets) and all(t.loader is not None for t in datasets))
    if inert:
        # stacklevel 3: the warning points at the line that built the callback (through its __init__).
        warnings.warn("DiffInCallback: " + " ".join(inert), UserWarning, stacklevel=3)


def check_module(module: Any, loss_fn_given: bool, allow_batch_mixing: bool) -> None:
    """At ``setup``: one optimizer step per batch that Lightning drives, a per-sample loss, no layer that mixes samples."""
    if not module.automatic_optimization:
        raise RuntimeError(
            "DiffInCallback needs automatic optimization (one optimizer step per batch that Lightning "
            "drives); this module sets automatic_optimization=False."
        )
    if not loss_fn_given and not callable(getattr(module, "per_sample_loss", None)):
        raise AttributeError(
            f"DiffInCallback: {type(module).__name__} has no method `per_sample_loss(batch) -> Tensor[B]` "
            "and no `loss_fn` was given. Add the method (return the unreduced loss of each sample) or pass "
            "loss_fn=lambda module, batch: <Tensor[B]>."
        )
    found = batch_mixing_modules(module)
    if found and not allow_batch_mixing:
        raise RuntimeError(batch_mixing_message(found))
    if found:
        rank_zero_warn(batch_mixing_message(found).split(" Replace them")[0] + " Accepted (allow_batch_mixing=True).")


def check_per_sample_loss(loss: PerSampleLoss, batch: Any, batch_size: int, device: torch.device) -> None:
    """Raise unless the per-sample loss of ``batch`` is a tensor of shape ``[batch_size]`` (once, on the first batch)."""
    params = loss.parameters()
    # On copies of the buffers (batch norm must not see this forward) and a forked RNG.
    with torch.no_grad(), replayed_rng(None, device):
        losses = loss.values(params, batch)
    if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch_size,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(
            f"DiffInCallback: the per-sample loss must be a tensor of shape [B] = ({batch_size},), one unreduced "
            f"loss per sample; got {shape}. Compute the loss with reduction='none' (e.g. "
            "F.cross_entropy(logits, y, reduction='none'))."
        )


def check_optimizer(optimizers: Sequence[torch.optim.Optimizer], clip_algorithm: str | None = None, custom_clipping: bool = False) -> None:
    """Raise unless there is one optimizer with one learning rate; warn where the plain-SGD maths only approximates it.

    ``clip_algorithm``: Lightning's gradient clipping (``"norm"``, ``"value"`` or ``None``);
    ``custom_clipping``: the module overrides ``configure_gradient_clipping``.
    """
    if len(optimizers) != 1:
        raise RuntimeError(f"DiffInCallback needs exactly one optimizer; the module configures {len(optimizers)}.")
    optimizer = optimizers[0]
    learning_rates = {group["lr"] for group in optimizer.param_groups}
    if len(learning_rates) > 1:
        raise ValueError(
            f"DiffInCallback needs one learning rate for all parameter groups; got {sorted(learning_rates)}. "
            "Use a single learning rate (per-group rates are not supported yet)."
        )
    approximations = []
    if not isinstance(optimizer, torch.optim.SGD):
        approximations.append(
            f"the optimizer is {type(optimizer).__name__}, not SGD: each step is treated as a plain SGD step "
            "theta - eta * G_B, so preconditioning and momentum are ignored"
        )
    else:
        group = optimizer.param_groups[0]
        if group.get("momentum", 0):
            approximations.append("SGD momentum is ignored (each step is treated as theta - eta * G_B)")
        if group.get("weight_decay", 0):
            approximations.append("weight decay is ignored: it does not depend on any sample")
    if custom_clipping:
        approximations.append(
            "the module's configure_gradient_clipping is not read: each step is taken as "
            + ("unclipped" if clip_algorithm is None else f"Lightning's own {clip_algorithm} clipping would clip it")
        )
    if clip_algorithm == "norm":
        # The factor is exact for the update; what it leaves out is the factor's own dependence on each sample.
        approximations.append(
            "norm clipping: each step counts at its clipped learning rate and its first-order terms are taken along the "
            "clipped step's Jacobian; the second-order terms hold the clipping factor constant"
        )
    elif clip_algorithm == "value":
        approximations.append("value clipping is ignored (not one factor per step: the unclipped batch gradient is used)")
    if approximations:
        rank_zero_warn("DiffInCallback's maths assumes plain SGD; the scores are an approximation here: " + "; ".join(approximations) + ".")
