"""Which optimizer steps the callback records: every ``every_n_steps``-th (``schedule='in_run'``) or planned checkpoints."""

from __future__ import annotations

import math
import warnings

from diffin_lightning.settings import DiffInSettings


def records_step(settings: DiffInSettings, checkpoint_steps: list[int], step: int) -> bool:
    """Whether optimizer step ``step`` is recorded (the same on every rank: no collective on the others)."""
    if settings.schedule == "checkpoints":
        return step in checkpoint_steps
    return step % settings.every_n_steps == 0


def plan_checkpoints(estimated_total: float, num_checkpoints: int | None) -> tuple[int, list[int]]:
    """``(T, steps)``: the run's optimizer steps and the checkpoints, spaced at the middles of ``num_checkpoints`` equal spans.

    ``estimated_total``: Lightning's ``trainer.estimated_stepping_batches`` (infinite without
    max_epochs or max_steps).
    """
    if not math.isfinite(estimated_total) or estimated_total < 1:
        raise ValueError(
            "schedule='checkpoints' needs the run's total number of optimizer steps T to space the checkpoints; "
            f"Lightning estimates {estimated_total}. Set max_epochs or max_steps."
        )
    total_steps = int(estimated_total)
    m = num_checkpoints
    assert m is not None
    steps = sorted({int((k + 0.5) * total_steps / m) for k in range(m)})
    if len(steps) < m:
        # Each checkpoint then stands for T / len(steps) = one step (the weights use the distinct count).
        warnings.warn(
            f"DiffInCallback: `num_checkpoints={m}` exceeds the run's {total_steps} optimizer step(s); every step is "
            f"a checkpoint ({len(steps)} in all, recorded in the metadata's checkpoint_steps). Set num_checkpoints <= "
            f"{total_steps}, or use schedule='in_run', which records every step.",
            UserWarning,
            stacklevel=2,  # points at the caller: the callback's on_train_start
        )
    return total_steps, steps
