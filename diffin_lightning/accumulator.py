"""Per-sample sums, each declared with how it is updated and how it combines across processes.

In the manner of torchmetrics' ``add_state``: every state says what a step does to it
(``"add"``: contributions are added at the visited ids; ``"propagate"``: the whole state is
first multiplied by the step's propagation factor, then the contributions are added) and
how copies held by several processes combine (``"sum"``: the ids of a step are disjoint
across processes and the factor is the same everywhere, so every state here sums). Under
DDP :meth:`InfluenceAccumulator.reduced` combines exactly what is declared here, when the
files are written and when a checkpoint is saved.

Example::

    >>> import torch
    >>> acc = InfluenceAccumulator(["val"], num_samples=4, device=torch.device("cpu"), dtype=torch.float64)
    >>> sorted(acc.declared)
    ['decayed_first', 'decayed_weight', 'first_order', 'second_order_sum', 'visits']
    >>> acc.declared["decayed_first"].update
    'propagate'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from diffin_lightning import distributed
from diffin_lightning.per_sample import Params
from diffin_lightning.step import Contribution

Update = Literal["add", "propagate"]
Reduce = Literal["sum"]


def nonzero_counts(counts: Mapping[str, Tensor]) -> dict[str, int]:
    """Per-target device counters as host ints, the zero ones left out (one read back each: for reports, not the step)."""
    values = {name: int(count) for name, count in counts.items()}
    return {name: value for name, value in values.items() if value}


@dataclass(frozen=True)
class StepValues:
    """What one recorded step hands every declared state, for the samples it visited (``[B]`` each).

    ``first``/``second``: the step's terms, zero where non-finite, times the step's weight;
    ``visited``: 1 where the sample's contribution counted, else 0; ``step_weight``: the steps
    the recorded one stands for times ``eta/|B|``; ``keep``: 1 where the step's propagation
    factor was usable, else 0 (a 0-d tensor; 1 for targets without one).
    """

    first: Tensor
    second: Tensor
    visited: Tensor
    step_weight: float
    keep: Tensor | float


@dataclass(frozen=True)
class StateSpec:
    """How one per-sample state is updated at a step and reduced across processes.

    ``values``: what the step adds at the visited ids (a rule of :class:`StepValues`); a
    ``"propagate"`` state is first multiplied by the step's factor (targets with a second order only).
    """

    name: str
    update: Update
    reduce: Reduce
    help: str
    values: Callable[[StepValues], Tensor]


class InfluenceAccumulator:
    """The per-target, per-sample sums a run accumulates (on the model's device).

    Args:
        target_names: the targets.
        num_samples: N.
        device: where the sums live (the model's device).
        dtype: float64 (float32 on MPS, which lacks float64).
    """

    def __init__(self, target_names: list[str], num_samples: int, device: torch.device, dtype: torch.dtype) -> None:
        self.num_samples, self.device, self.dtype = num_samples, device, dtype
        self.declared: dict[str, StateSpec] = {}
        self.add_state("first_order", "add", "sum of (eta/|B|) <g_V, G_i> over the sample's visits (times every_n_steps)", lambda v: v.first)
        self.add_state("second_order_sum", "add", "sum of the in-run Eq. 9 terms -(t eta^2/|B|) <g_V, H_B G_i + H_i G_B>", lambda v: v.second)
        self.add_state("visits", "add", "recorded steps whose finite contribution reached the sample", lambda v: v.visited)
        self.add_state("decayed_first", "propagate", "first-order sum, every earlier part carried by each later step's factor", lambda v: v.first * v.keep)
        self.add_state(
            "decayed_weight", "propagate", "sum of eta/|B| over visits, carried the same way (drift correction)", lambda v: v.visited * v.step_weight * v.keep
        )
        # Parameter-shaped, per target: sum_t (eta_t/N) g_V(theta_t), carried by the same factors.
        self.parameter_states: dict[str, Params] = {}
        self.sums: dict[str, dict[str, Tensor]] = {name: self._zeros() for name in target_names}
        # Per target: (sample, step) contributions skipped for being non-finite, counted on the device.
        self.nonfinite_samples = {name: torch.zeros((), dtype=torch.int64, device=device) for name in target_names}
        # Per target: steps skipped whole because their propagation factor (the curvature along g_V) was
        # non-finite, counted on the device so that the per-step path never reads it back. The factor is
        # the same on every rank, so this count is the run's (shared across ranks, never summed).
        self.nonfinite_factor_steps = {name: torch.zeros((), dtype=torch.int64, device=device) for name in target_names}
        # Per target: steps skipped whole because a step-level quantity (the parameters, the batch gradient,
        # the step's losses) was non-finite, found on the device (``add``'s ``step_usable``), not on the host.
        self.nonfinite_gated_steps = {name: torch.zeros((), dtype=torch.int64, device=device) for name in target_names}

    @property
    def nonfinite(self) -> Tensor:
        """All targets' skipped (sample, step) contributions."""
        return torch.stack(list(self.nonfinite_samples.values())).sum()

    def add_state(self, name: str, update: Update, help: str, values: Callable[[StepValues], Tensor], reduce: Reduce = "sum") -> None:
        """Declare a per-sample state (a zero tensor ``[N]`` per target) and what a step adds to it.

        :meth:`add` updates every declared state from its declaration alone, so a state declared
        here is updated, reduced across processes and saved with no other change.
        """
        if update not in ("add", "propagate") or reduce != "sum":
            raise ValueError(f"add_state({name!r}): update must be 'add' or 'propagate' and reduce 'sum'; got update={update!r}, reduce={reduce!r}.")
        self.declared[name] = StateSpec(name, update, reduce, help, values)
        if hasattr(self, "sums"):  # declared after construction: every target gets its zeros now
            for sums in self.sums.values():
                sums.setdefault(name, torch.zeros(self.num_samples, dtype=self.dtype, device=self.device))

    def _zeros(self) -> dict[str, Tensor]:
        return {name: torch.zeros(self.num_samples, dtype=self.dtype, device=self.device) for name in self.declared}

    def add(
        self, name: str, ids: Tensor, contribution: Contribution, weight: float, eta: float, batch_size: int, step_usable: Tensor | None = None
    ) -> None:
        """Add one step's contribution to target ``name`` at ``ids``; non-finite ones are skipped and counted.

        ``weight`` is the number of steps the recorded step stands for. Nothing here reads
        a value back to the host.
        """
        sums = self.sums[name]
        eta_over_batch = eta / batch_size
        first, second = contribution.first.detach(), contribution.second.detach()
        finite = torch.isfinite(first) & torch.isfinite(second)
        # A step whose step-level quantities were found non-finite on the device (``step_usable`` False)
        # gives nothing, as one skipped on the host does; counted once, here.
        usable = None
        if step_usable is not None:
            usable = step_usable
            self.nonfinite_gated_steps[name] += (~usable).to(torch.int64)
        if contribution.factor is not None:
            # A non-finite factor (a NaN curvature would clamp it to 0 and wipe every earlier contribution)
            # skips the whole step for this target: nothing is added, every state is carried unchanged.
            factor_usable = torch.isfinite(contribution.factor)
            self.nonfinite_factor_steps[name] += (~factor_usable if usable is None else usable & ~factor_usable).to(torch.int64)
            usable = factor_usable if usable is None else usable & factor_usable
        if usable is not None:
            self.nonfinite_samples[name] += ((~finite) & usable).sum()
            finite = finite & usable
        else:
            self.nonfinite_samples[name] += (~finite).sum()
        mask = finite.to(self.dtype)
        first = torch.where(finite, first, 0).to(self.dtype) * weight
        second = torch.where(finite, second, 0).to(self.dtype) * weight
        factor: Tensor | None = None
        keep: Tensor | float = 1.0
        if contribution.factor is not None:
            assert usable is not None
            factor = torch.where(usable, contribution.factor, 1.0).to(self.dtype)
            keep = usable.to(self.dtype)
        step = StepValues(first, second, mask, eta_over_batch * weight, keep)
        # Every declared state from its declaration: the propagated ones only where the target has a factor.
        for spec in self.declared.values():
            if spec.update == "propagate":
                if factor is None:
                    continue
                sums[spec.name].mul_(factor)
            sums[spec.name].index_add_(0, ids, spec.values(step))
        if factor is None:
            return
        assert contribution.target_gradient is not None
        gradient = [g.detach() if g.requires_grad else g for g in contribution.target_gradient.values()]  # (no operation issued where none is needed)
        scale = (eta / self.num_samples * weight) * keep.to(gradient[0].dtype)
        previous = self.parameter_states.get(name)
        if previous is None:
            self.parameter_states[name] = dict(zip(contribution.target_gradient, torch._foreach_mul(gradient, scale)))
        else:
            values = list(previous.values())
            torch._foreach_mul_(values, factor.to(values[0].dtype))
            for value, part in zip(values, gradient):
                value.addcmul_(part, scale)  # fused, in place: no parameter-sized temporary

    # ------------------------------------------------------------------ across processes

    def reduced(self) -> InfluenceAccumulator:
        """A copy whose per-sample states and skip count combine every rank's, as each state declares.

        A collective under DDP: every rank must call it at the same point. The
        parameter-shaped states are the same on every rank (built from global quantities)
        and are shared, not combined. In one process, a copy of this accumulator.
        """
        out = InfluenceAccumulator([], self.num_samples, self.device, self.dtype)
        out.declared = dict(self.declared)
        flat = {f"{name}/{key}": value for name, sums in self.sums.items() for key, value in sums.items()}
        unsupported = {spec.reduce for spec in self.declared.values()} - {"sum"}
        if unsupported:
            raise NotImplementedError(f"InfluenceAccumulator.reduced: no cross-rank reduction for {sorted(unsupported)}")
        flat.update({f"__nonfinite__/{name}": count.reshape(1) for name, count in self.nonfinite_samples.items()})
        combined = distributed.sum_over_ranks(flat)
        out.sums = {name: {key: combined[f"{name}/{key}"] for key in sums} for name, sums in self.sums.items()}
        out.nonfinite_samples = {name: combined[f"__nonfinite__/{name}"].reshape(()) for name in self.nonfinite_samples}
        out.parameter_states = self.parameter_states
        out.nonfinite_factor_steps = self.nonfinite_factor_steps
        out.nonfinite_gated_steps = self.nonfinite_gated_steps  # single-process only (under DDP the host checks)
        return out

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": {name: {k: v.detach().cpu() for k, v in sums.items()} for name, sums in self.sums.items()},
            "target_sums": {name: {k: v.detach().cpu() for k, v in s.items()} for name, s in self.parameter_states.items()},
            "nonfinite_skipped": int(self.nonfinite),
            "nonfinite_samples_skipped": nonzero_counts(self.nonfinite_samples),
            "nonfinite_factor_steps": nonzero_counts(self.nonfinite_factor_steps),
            "nonfinite_gated_steps": nonzero_counts(self.nonfinite_gated_steps),
        }

    def _device_counts(self, state: Mapping[str, Any], key: str) -> dict[str, Tensor]:
        """A checkpoint's per-target counts (``key``, zeros left out there) as device counters, one per target."""
        counts = {str(k): int(v) for k, v in state.get(key, {}).items()}
        return {name: torch.tensor(counts.get(name, 0), dtype=torch.int64, device=self.device) for name in self.sums}

    def load_state_dict(self, state: Mapping[str, Any], keep_totals: bool = True) -> None:
        """Adopt a checkpoint's sums.

        Under DDP the checkpoint holds the totals over ranks: rank zero keeps them
        (``keep_totals``) and every other rank starts its per-sample states and skip count
        from zero, so that the next :meth:`reduced` counts them once. Every declared state
        sums, and the propagated ones are multiplied by the same factor on every rank, so
        this holds for all of them.
        """
        self.sums = {
            name: {
                key: sums[key].to(device=self.device, dtype=self.dtype) if key in sums else torch.zeros(self.num_samples, dtype=self.dtype, device=self.device)
                for key in self.declared
            }
            for name, sums in state.get("sums", {}).items()
        }
        self.parameter_states = {name: {k: v.to(self.device) for k, v in s.items()} for name, s in state.get("target_sums", {}).items()}
        self.nonfinite_samples = self._device_counts(state, "nonfinite_samples_skipped")
        if not state.get("nonfinite_samples_skipped") and int(state.get("nonfinite_skipped", 0)) and self.sums:  # an older checkpoint: one total
            self.nonfinite_samples[next(iter(self.sums))] += int(state["nonfinite_skipped"])
        # The run's counts, the same on every rank: every rank keeps them.
        self.nonfinite_factor_steps = self._device_counts(state, "nonfinite_factor_steps")
        self.nonfinite_gated_steps = self._device_counts(state, "nonfinite_gated_steps")
        if not keep_totals:
            for sums in self.sums.values():
                for value in sums.values():
                    value.zero_()
            for count in self.nonfinite_samples.values():
                count.zero_()
