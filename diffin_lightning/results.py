"""Scores and metadata read from the accumulated sums: what ``callback.influence`` returns and the files hold.

Pure functions of the accumulator, the settings and the run's counters (no Trainer). The
files themselves are written by :mod:`diffin_lightning.store`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffin_lightning import distributed
from diffin_lightning.accumulator import InfluenceAccumulator, nonzero_counts
from diffin_lightning.estimator import normalize_second_order
from diffin_lightning.settings import SECOND_ORDER_TERMS, DiffInSettings, SecondOrderTerm
from diffin_lightning.store import COMPONENTS, InfluenceResult, TargetInfluence
from diffin_lightning.version import __version__


@dataclass
class RunRecord:
    """The run's counters and facts that go into the metadata."""

    num_samples: int | None = None
    fingerprint: str | None = None
    steps_recorded: int = 0
    steps_represented: float = 0.0
    skipped_amp_steps: int = 0
    clipped_steps: int = 0  # recorded steps whose gradient Lightning's norm clipping scaled
    checkpoint_steps: list[int] = field(default_factory=list)
    last_eps: Tensor | float | None = None
    engine: str = "not started"
    nonfinite_steps_skipped: dict[str, int] = field(default_factory=dict)
    # The first step at which the parameters were non-finite, as the host knows it. The per-step
    # path finds it on the device (model_nonfinite_pending: int64, -1 for none) and reads nothing
    # back; model_nonfinite_step settles the two when read (reports, files, checkpoints).
    model_nonfinite_known: int | None = None
    model_nonfinite_pending: Tensor | None = None

    @property
    def model_nonfinite_step(self) -> int | None:
        if self.model_nonfinite_pending is not None:
            pending, self.model_nonfinite_pending = int(self.model_nonfinite_pending), None
            if pending >= 0 and self.model_nonfinite_known is None:
                self.model_nonfinite_known = pending
        return self.model_nonfinite_known

    @model_nonfinite_step.setter
    def model_nonfinite_step(self, step: int | None) -> None:
        self.model_nonfinite_known, self.model_nonfinite_pending = step, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
            "steps_recorded": self.steps_recorded,
            "steps_represented": self.steps_represented,
            "skipped_amp_steps": self.skipped_amp_steps,
            "clipped_steps": self.clipped_steps,
            "nonfinite_steps_skipped": dict(self.nonfinite_steps_skipped),
            "model_nonfinite_step": self.model_nonfinite_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_recorded = int(state.get("steps_recorded", 0))
        self.steps_represented = float(state.get("steps_represented", 0))
        self.skipped_amp_steps = int(state.get("skipped_amp_steps", 0))
        self.clipped_steps = int(state.get("clipped_steps", 0))
        self.nonfinite_steps_skipped = {str(k): int(v) for k, v in state.get("nonfinite_steps_skipped", {}).items()}
        step = state.get("model_nonfinite_step")
        self.model_nonfinite_step = None if step is None else int(step)


def steps_skipped(record: RunRecord, accumulator: InfluenceAccumulator) -> dict[str, int]:
    """Per target, the recorded steps skipped whole: step-level checks on the host, gated steps and non-finite factors on the device."""
    out = dict(record.nonfinite_steps_skipped)
    for counts in (accumulator.nonfinite_gated_steps, accumulator.nonfinite_factor_steps):
        for name, count in nonzero_counts(counts).items():
            out[name] = out.get(name, 0) + count
    return out


def check_second_order(second_order: Any, settings: DiffInSettings) -> None:
    if second_order not in SECOND_ORDER_TERMS:
        raise ValueError(f"`second_order` must be one of {SECOND_ORDER_TERMS}; got {second_order!r}.")
    if second_order == "propagated" and settings.schedule == "checkpoints":
        raise ValueError("second_order='propagated' is recorded by schedule='in_run' only; use 'paper' or 'sum'.")


def build_result(
    accumulator: InfluenceAccumulator,
    drift: Mapping[str, Tensor],
    kinds: Mapping[str, str],
    has_second_order: Mapping[str, bool],
    settings: DiffInSettings,
    record: RunRecord,
    second_order: SecondOrderTerm,
) -> InfluenceResult:
    """Every target's components under the named second-order term (CPU float64)."""
    targets = {}
    for name, sums in accumulator.sums.items():
        first = sums["first_order"].detach().to("cpu", torch.float64)
        if second_order == "propagated":
            if has_second_order[name] and settings.compute_second_order:
                decayed = sums["decayed_first"].detach().to("cpu", torch.float64)
                correction = drift.get(name)
                correction = torch.zeros_like(first) if correction is None else correction.detach().to("cpu", torch.float64)
                second = decayed + correction - first
            else:
                second = torch.zeros_like(first)
        else:
            second = normalize_second_order(sums["second_order_sum"].detach().to("cpu", torch.float64), second_order, record.steps_represented)
        targets[name] = TargetInfluence(
            name=name,
            kind=kinds[name],
            first_order=first,
            second_order=second,
            diffin=first + second,
            visits=sums["visits"].detach().to("cpu", torch.float64),
        )
    return InfluenceResult(targets=targets, metadata=metadata(accumulator, drift, settings, record, second_order, list(kinds)))


def metadata(
    accumulator: InfluenceAccumulator,
    drift: Mapping[str, Tensor],
    settings: DiffInSettings,
    record: RunRecord,
    second_order: SecondOrderTerm,
    target_names: list[str],
) -> dict[str, Any]:
    last_eps = record.last_eps
    return {
        "library": "diffin_lightning",
        "library_version": __version__,
        "num_samples": record.num_samples,
        "targets": target_names,
        "fingerprint": record.fingerprint,
        "second_order": second_order,
        # exactly what the tensor file holds: one second-order term (influence_with(name) gives the others in memory)
        "second_order_terms_available": [second_order],
        "propagated_drift_included": bool(drift),
        "finite_difference": settings.finite_difference,
        "compute_second_order": settings.compute_second_order,
        "eps": "auto" if settings.eps is None else settings.eps,
        "eps_last_step": None if last_eps is None or not math.isfinite(float(last_eps)) else float(last_eps),
        "every_n_steps": settings.every_n_steps,
        "schedule": settings.schedule,
        "num_checkpoints": settings.num_checkpoints,
        "checkpoint_steps": record.checkpoint_steps,
        "target_refresh_every_n_steps": settings.target_refresh_every_n_steps,
        "steps_recorded": record.steps_recorded,
        "steps_represented": record.steps_represented,
        "skipped_amp_steps": record.skipped_amp_steps,
        "clipped_steps": record.clipped_steps,
        "nonfinite_skipped": int(accumulator.nonfinite),
        "nonfinite_samples_skipped": nonzero_counts(accumulator.nonfinite_samples),
        "nonfinite_steps_skipped": steps_skipped(record, accumulator),
        "model_nonfinite_step": record.model_nonfinite_step,
        "world_size": distributed.world_size(),
        "per_sample_engine": record.engine,
        "settings": settings.to_dict(),
        "self_target_second_order": "not defined: the 'self' target is first order only, second_order is 0",
    }


def mark_completion(result: InfluenceResult, record: RunRecord, complete: bool, global_step: int, epoch: int) -> InfluenceResult:
    """``result`` with its metadata saying whether the run finished, and if not why (written into the files)."""
    reason = None
    if record.model_nonfinite_step is not None:
        complete = False
        reason = f"the model's parameters became non-finite at step {record.model_nonfinite_step}; later steps were not scored"
    elif not complete:
        reason = "training did not finish"
    result.metadata.update(complete=complete, incomplete_reason=reason, global_step=global_step, epoch=epoch)
    return result


def checkpoint_copy(result: InfluenceResult, global_step: int, epoch: int) -> InfluenceResult:
    """A copy of ``result`` as of a checkpoint (incomplete), held until the checkpoint is on disk: training goes on adding to the sums."""
    result = InfluenceResult(
        targets={
            name: TargetInfluence(target.name, target.kind, *(target.component(c).clone() for c in COMPONENTS))
            for name, target in result.targets.items()
        },
        metadata=result.metadata,
    )
    result.metadata.update(complete=False, global_step=global_step, epoch=epoch)
    return result


def nonfinite_skip_messages(accumulator: InfluenceAccumulator | None) -> list[str]:
    """The end of fit's reports of what was skipped as non-finite, per target: steps for their curvature, gated steps, samples."""
    if accumulator is None:
        return []
    messages = [
        f"DiffInCallback: the curvature along g_V (the propagation factor) was non-finite at {count} recorded step(s) "
        f"for target {name!r}: those steps were skipped for it (nothing of them reaches its scores; counted in the "
        "metadata's 'nonfinite_steps_skipped'). A diverging loss or an eps too small for the dtype can cause this."
        for name, count in nonzero_counts(accumulator.nonfinite_factor_steps).items()
    ]
    messages += [
        f"DiffInCallback: {count} recorded step(s) were skipped for target {name!r} because the model's parameters, "
        "the batch gradient G_B, the step's per-sample losses or the target gradient g_V (from its last refresh "
        "to the next) were non-finite (found on the device, without "
        "stopping the step; nothing of them reaches its scores; counted in the metadata's 'nonfinite_steps_skipped'). "
        "A diverging loss or a NaN per-sample loss can cause this."
        for name, count in nonzero_counts(accumulator.nonfinite_gated_steps).items()
    ]
    messages += [
        f"DiffInCallback: {count} (sample, step) non-finite contribution(s) to target {name!r} were skipped: "
        "those samples got nothing from those steps, the others were kept (counted in the metadata's "
        "'nonfinite_samples_skipped'). A NaN per-sample loss or gradient, or an eps too small for the dtype, can cause this."
        for name, count in nonzero_counts(accumulator.nonfinite_samples).items()
    ]
    return messages
