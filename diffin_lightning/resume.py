"""Resuming from a Lightning checkpoint: check that the saved influence state fits this run, adopt it, and warn where the resume cannot be exact."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from diffin_lightning import distributed
from diffin_lightning.accumulator import InfluenceAccumulator
from diffin_lightning.data import inexact_resume_reason
from diffin_lightning.results import RunRecord
from diffin_lightning.targets import Target


def adopt_loaded_state(
    state: Mapping[str, Any], record: RunRecord, accumulator: InfluenceAccumulator, targets: Sequence[Target], device: torch.device
) -> None:
    """Load a checkpoint's state into this run's, once its N and fingerprint are known; refuse one of other data or targets."""
    saved_n = state.get("num_samples")
    if saved_n is not None and saved_n != record.num_samples:
        raise ValueError(
            f"DiffInCallback: the checkpoint's influence state is for N={saved_n} samples but this run trains on "
            f"N={record.num_samples}. Resume with the same training set, or start a new run."
        )
    saved_fingerprint = state.get("fingerprint")
    if saved_fingerprint is not None and saved_fingerprint != record.fingerprint:
        raise ValueError(
            f"DiffInCallback: the checkpoint's influence state was recorded on a training set with fingerprint "
            f"{saved_fingerprint}, this run's is {record.fingerprint} (different ids or labels). Resume with the "
            "same data, or start a new run."
        )
    names = {target.name for target in targets}
    saved_sums = state.get("sums", {})
    if set(saved_sums) != names:
        raise ValueError(
            f"DiffInCallback: the checkpoint records targets {sorted(saved_sums)} but this callback has "
            f"{sorted(names)}. Resume with the same targets."
        )
    # Under DDP every rank loads the checkpoint, which holds the totals over ranks: rank zero keeps them.
    accumulator.load_state_dict(state, keep_totals=distributed.rank() == 0)
    record.load_state_dict(state)
    for target in targets:
        target.load_state_dict(state.get("targets", {}).get(target.name, {}), device)


def warn_if_inexact(global_step: int, mid_epoch: bool, train_dataloader: Any, module: torch.nn.Module) -> None:
    """Warn where the resumed run cannot replay the uninterrupted one: its data order, or its dropout masks."""
    reason = inexact_resume_reason(train_dataloader, mid_epoch)
    if reason is not None:
        rank_zero_warn(
            f"DiffInCallback: resumed at step {global_step}, but {reason}: the scores will differ from an "
            "uninterrupted run. Use diffin_lightning.ResumableDataLoader with an EpochSeededSampler (the bundled "
            "data modules do), or resume from end-of-epoch checkpoints with a replayable sampler."
        )
    random_layers = active_random_layers(module)
    if random_layers:
        # A Lightning checkpoint does not hold the global random state, so the resumed run's dropout
        # masks are not the ones the uninterrupted run would have drawn: training and scores diverge.
        rank_zero_warn(
            f"DiffInCallback: resumed at step {global_step} a model that draws random numbers in training "
            f"({', '.join(random_layers[:3])}{', ...' if len(random_layers) > 3 else ''}); a checkpoint does not "
            "restore the global random state, so the resumed run draws other dropout masks and its model and "
            "scores will differ from an uninterrupted run. For an exact resume set the dropout probabilities to 0; "
            "otherwise expect agreement only in distribution."
        )


def active_random_layers(module: torch.nn.Module) -> list[str]:
    """Names of the modules that draw dropout masks in training (probability > 0)."""
    found = []
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.modules.dropout._DropoutNd):
            probability = child.p
        elif isinstance(child, torch.nn.MultiheadAttention):
            probability = child.dropout
        else:
            continue
        if probability:
            found.append(f"{name or 'model'} ({type(child).__name__}, p={probability})")
    return found
