"""Reading Lightning's state: what the callback needs to know of the Trainer, its precision plugin, its optimizer and its train dataloader.

The one module besides the callback that reads Lightning's objects, so that what it relies on of
Lightning's internals (when ``.grad`` is zeroed, how a micro-batch's loss is scaled, what AMP's
scaler skips) is in one place. Nothing here changes the Trainer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import Tensor

from diffin_lightning import distributed
from diffin_lightning.engine import number_of_batches, training_set_batches
from diffin_lightning.step import CLIP_NORM_EPS


def train_dataset(trainer: pl.Trainer) -> Any:
    """The train dataloader's dataset where it has a length (the callback scores it by id), else ``None``."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    return dataset if dataset is not None and hasattr(dataset, "__len__") else None


def is_mixed_precision(precision: Precision) -> bool:
    """Whether the training step runs under autocast or scales its loss (AMP, or a plugin of the user's doing the same).

    Such a step's captures are in half precision or scaled: the recorder takes its products from a
    full-precision pass of its own (``training_step_gradients``), except where a run takes no finite
    difference under ``bf16-mixed`` (:func:`reusable_under_autocast`): there from the step's own.
    """
    return (
        isinstance(precision, MixedPrecision)
        or getattr(precision, "scaler", None) is not None
        or str(getattr(precision, "precision", "")).endswith("-mixed")
    )


def discards_stale_gradients(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether the previous step's ``.grad`` is dead at a step's start: Lightning sets it to None before the backward.

    Lightning's automatic optimization calls ``optimizer_zero_grad`` (``optimizer.zero_grad()``,
    ``set_to_none=True``) after the training step's forward and before its backward, so until
    then the old gradients are held for nothing but the hooks in between; releasing them at the
    start of a recorded step lets the callback's passes ahead of the forward use their memory.
    Only where nothing can have asked for them: no accumulation (the micro-batches add up in
    ``.grad``), no user zero_grad, no ``on_before_zero_grad`` of the module or of any
    callback, and one process (under DDP the callback runs no pass ahead of the forward).
    """
    from lightning.pytorch.utilities.model_helpers import is_overridden

    optimizer = trainer.optimizers[0]
    return (
        pl_module.automatic_optimization
        and trainer.accumulate_grad_batches == 1
        and distributed.world_size() == 1
        and type(optimizer).zero_grad is torch.optim.Optimizer.zero_grad
        and not is_overridden("optimizer_zero_grad", pl_module)
        and not is_overridden("on_before_zero_grad", pl_module)
        and not any(is_overridden("on_before_zero_grad", callback, parent=Callback) for callback in trainer.callbacks)
    )


def reusable_under_autocast(precision: Precision) -> bool:
    """Whether a mixed-precision step's own captures and ``.grad`` can serve first-order products: ``bf16-mixed``, no loss scale.

    bfloat16 autocast keeps float32's exponent range, so its output gradients need no scale and
    ``.grad`` (float32 parameters) is the step's mean gradient as the optimizer sees it. float16
    AMP scales the captured output gradients by a factor the step may still change (and skip),
    and unscaled float16 gradients underflow: its steps, and any other plugin's, are recomputed
    in full precision.
    """
    return str(getattr(precision, "precision", "")) == "bf16-mixed" and getattr(precision, "scaler", None) is None


def training_step_gradients(
    precision: Precision, accumulate_grad_batches: int, module: torch.nn.Module, micro_batch_sizes: Sequence[int], reuse_autocast: bool = False
) -> tuple[Any, ...]:
    """``(gradients, gradient_to_mean, backprop_scale, forward_context, mixed)`` for the recorder.

    Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` (k), so a
    captured output gradient is sample i's own times ``1/(k |b|)``, and ``.grad`` is
    ``(1/(k |b|)) sum_i G_i``. Under mixed precision (autocast, a loss scale) the step is read
    only where ``reuse_autocast`` (the recorder's steps need no finite difference: first-order
    products, 'self', 'train') and :func:`reusable_under_autocast`; elsewhere ``gradients`` is
    ``None`` and the recorder recomputes in full precision (a finite difference of half-precision
    products would be rounding). Micro-batches of unequal sizes make ``.grad`` a weighted mean;
    such a step is recomputed (``gradients`` is ``None``).
    """
    sizes = set(micro_batch_sizes)
    mixed = is_mixed_precision(precision)
    if mixed and not (reuse_autocast and reusable_under_autocast(precision)):
        # The finite difference needs full-precision products at both points: one full-precision pass here.
        return None, 1.0, 1.0, contextlib.nullcontext, mixed
    if len(sizes) != 1:
        return None, 1.0, 1.0, precision.forward_context, mixed
    size = sizes.pop()
    k = accumulate_grad_batches
    total = size * len(micro_batch_sizes)
    gradients = {
        # (.grad needs a detach only where the backward built a graph of it: create_graph=True)
        name: (torch.zeros_like(p) if p.grad is None else p.grad.detach() if p.grad.requires_grad else p.grad)
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    # (No loss scale to divide out: a plugin with a gradient scaler is mixed precision, recomputed above.)
    return gradients, k * size / total, float(k * size), precision.forward_context, mixed


def scaler_will_skip(precision: Precision, optimizer: torch.optim.Optimizer) -> bool:
    """Whether AMP's gradient scaler will skip this optimizer step (called from ``on_before_optimizer_step``)."""
    if getattr(precision, "scaler", None) is None:
        return False
    # The gradients are unscaled by now; the scaler skips the step exactly when one is non-finite.
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def clip_algorithm(trainer: pl.Trainer) -> str | None:
    """How Lightning clips this run's gradients: ``"norm"``, ``"value"``, or ``None`` without clipping."""
    value = trainer.gradient_clip_val
    if value is None or not float(value) > 0:  # Lightning clips nothing at a value <= 0 (Precision.clip_gradients)
        return None
    algorithm = trainer.gradient_clip_algorithm
    # Lightning clips by norm when no algorithm is named.
    return "norm" if algorithm is None else str(getattr(algorithm, "value", algorithm))


def clips_by_value(trainer: pl.Trainer) -> bool:
    """Whether Lightning clips each gradient entry (not one factor per step)."""
    return clip_algorithm(trainer) == "value"


def clips_its_own_way(pl_module: pl.LightningModule) -> bool:
    """Whether the module overrides ``configure_gradient_clipping`` (its clipping may not be Lightning's)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("configure_gradient_clipping", pl_module)


def norm_clip_factor(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> float:
    """The factor Lightning's norm clipping will multiply this step's gradients by (1.0 without norm clipping).

    Called from ``on_before_optimizer_step``, which Lightning runs after the backward (and AMP's
    unscale) and before it clips; under DDP the gradients are already the global batch's. One
    host read a step, only where norm clipping is on.
    """
    if clip_algorithm(trainer) != "norm":
        return 1.0
    grads = [p.grad.detach() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return 1.0
    total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2) for g in grads]), 2))
    if not math.isfinite(total):
        # Non-finite gradients: clipping cannot make the step finite; 1.0 leaves the step to the callback's
        # non-finite checks (which skip it and say why), not to a non-finite learning rate.
        return 1.0
    return min(1.0, float(trainer.gradient_clip_val) / (total + CLIP_NORM_EPS))


def resumed_mid_epoch(trainer: pl.Trainer) -> bool:
    """Whether the run resumed from a checkpoint taken inside an epoch (its loader must then skip the epoch's done batches)."""
    batches = trainer.num_training_batches
    return math.isfinite(batches) and trainer.global_step % max(1, math.ceil(batches / trainer.accumulate_grad_batches)) != 0


def training_set(
    trainer: pl.Trainer, device: torch.device, batch_size: int, sample_ids: Callable[[Any], Tensor], progress: str | None = None
) -> Iterator[tuple[Any, Tensor]]:
    """The whole training set in id order as ``(batch, ids)``, one batch on the device at a time (never all of it).

    Batched with the training loader's collate_fn, so that the batches go to the same
    per_sample_loss as the training step's; with a progress bar named ``progress`` where the
    Trainer shows one (on global rank zero).
    """
    dataset = train_dataset(trainer)
    if dataset is None:
        raise ValueError(
            "DiffInCallback scores every training sample (schedule='checkpoints', or the end-of-fit pass of "
            "second_order='propagated') and needs a train dataloader whose dataset has a length."
        )
    batches = training_set_batches(dataset, batch_size, device, getattr(trainer.train_dataloader, "collate_fn", None))
    if progress is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=number_of_batches(dataset, batch_size), desc=progress, unit="batch", leave=True, dynamic_ncols=True)
    for batch in batches:
        yield batch, sample_ids(batch)
