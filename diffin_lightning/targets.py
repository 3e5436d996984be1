"""Target losses whose change the influence scores measure.

Three kinds (DESIGN.md, "Targets"):

- ``DatasetTarget``: the mean loss over a dataset (a validation set, chosen test
  points). Its gradient ``g_V`` is recomputed every ``refresh_every_n_steps``
  optimizer steps, on at most ``max_samples`` samples per refresh.
- ``TrainingLossTarget`` (``"train"``): the training loss itself. ``g_V`` is a
  bias-corrected exponential moving average of the recorded steps' batch gradients,
  a running estimate of the full-data gradient that costs nothing extra.
- ``SelfTarget`` (``"self"``): each sample's own loss, first order only:
  ``(eta/|B|) |G_i|^2``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from diffin_lightning import distributed
from diffin_lightning.data import INDEX_KEY, IndexedDataset
from diffin_lightning.precision import widened
from diffin_lightning.engine import gradient_of_mean
from diffin_lightning.finite import finite_flag
from diffin_lightning.per_sample import Params, PerSampleLoss
from diffin_lightning.settings import TARGET_EXTRAPOLATIONS, TargetExtrapolation, extrapolation_mode

TargetKind = Literal["dataset", "train", "self"]

# The damped extrapolation's persistence is measured on a fixed strided sample of each parameter's
# coordinates (at most this many per tensor, each tensor's share weighted by its stride: an unbiased
# estimate of the full inner product), so that it costs kilobytes, not a third parameter-sized vector.
PERSISTENCE_SKETCH_ELEMENTS = 4096

# The batch of a pass (over a target or the training set) when neither its setting nor the training
# micro-batch size is known (a batch sampler without batch_size, a run resumed after its last step).
FALLBACK_BATCH_SIZE = 256


class DatasetTarget:
    """The mean loss over a dataset or a DataLoader's batches.

    Args:
        name: the target's name in the results.
        data: a map-style ``Dataset`` (wrapped in :class:`IndexedDataset` unless it
            already is one, so its batches have the training batches' structure; items that
            already carry an ``"index"`` key are kept as they are: targets need no ids) or a
            ``DataLoader`` used as it is.
        batch_size: batch size for a ``Dataset`` target; ``None`` until the recorder sets it to
            the training step's micro-batch size (:meth:`adopt_batch_size`) before the first refresh.
        max_samples: at most this many samples per refresh of ``g_V``. For a Dataset, a
            random subset drawn afresh at each refresh from ``(seed, step)``, so a resumed
            run draws the same subsets; for a DataLoader, the first batches of a new
            iteration. ``None`` uses all of it.
        refresh_every_n_steps: recompute ``g_V`` when this many optimizer steps have
            passed since the last computation; steps in between reuse it.
        seed: base seed of the subsets.
        cache_on_device: keep a whole-Dataset target's collated batches on the model's
            device after the first refresh (no re-collation per refresh); costs the target
            set's size in device memory. Subsets and DataLoader targets are never cached.
        extrapolate: how ``g_V`` stands in between refreshes s' < s: ``"none"`` holds g(s);
            ``"linear"`` returns g(s) + (t - s) (g(s) - g(s')) / (s - s'); ``"damped"`` returns
            g(s) + rho (t - s) (g(s) - g(s')) / (s - s') with rho in [0, 1] the persistence of the
            last two changes, ``<c_k, c_{k-1}> / |c_{k-1}|^2`` clamped (c_k the change per step
            between refreshes k-1 and k, read on a strided sketch of the coordinates), and 0
            until two changes exist: a steady trend (a smooth run) is followed, changes that do
            not persist (SGD noise in a hot run) are not. ``True``/``False`` mean linear/none.
    """

    kind: TargetKind = "dataset"
    has_second_order = True

    def __init__(
        self,
        name: str,
        data: Dataset | DataLoader,
        batch_size: int | None = 256,
        max_samples: int | None = None,
        refresh_every_n_steps: int = 1,
        seed: int = 0,
        cache_on_device: bool = True,
        extrapolate: TargetExtrapolation | bool = "none",
    ) -> None:
        self.name = name
        # Between refreshes, g(s) + (t - s) * slope with slope = (g(s) - g(s')) / (s - s') from the last two
        # in-run refreshes (s' < s); None until two in-run refreshes exist (then g(s) is held, as without it).
        # The extrapolated g_V is formed in place in ``gradient``, which then stands for step
        # ``extrapolated_to``: two parameter-sized vectors in all (the gradient and the slope), not three.
        self.extrapolation: TargetExtrapolation = extrapolation_mode(extrapolate)
        if self.extrapolation not in TARGET_EXTRAPOLATIONS:
            raise ValueError(f"`extrapolate` must be one of {TARGET_EXTRAPOLATIONS} (or True/False); got {extrapolate!r}.")
        self.extrapolated_to: int | None = None
        # Under "damped", ``slope`` is the damped one, persistence * the last change per step (so stepping and
        # undoing the extrapolation read it as the linear mode does); the undamped change is kept as a sketch.
        self.slope: Params | None = None
        self.persistence: Tensor | None = None
        self._change_sketch: dict[str, Tensor] | None = None
        self.cache_on_device = cache_on_device
        self._cached_batches: list[Any] | None = None
        if isinstance(data, DataLoader):
            self.loader: DataLoader | None = data
            self.dataset: Dataset | None = None
        else:
            self.loader = None
            self.dataset = data if isinstance(data, IndexedDataset) else IndexedDataset(data, existing_index="keep")
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.refresh_every_n_steps = refresh_every_n_steps
        self.seed = seed
        self.gradient: Params | None = None
        # Whether the last in-run refresh's g_V was finite (a device flag; None before one). A non-finite one
        # is zeroed in place: its steps are gated by this flag, and a gated step's g_V, scaled by 0 in the
        # accumulator's parameter-sized sums, must not be NaN there (NaN * 0 is NaN).
        self.gradient_finite: Tensor | None = None
        self.refreshed_at_step: int | None = None
        self._whole_last = False  # the last refresh was over the whole target (end of fit, checkpoints): no slope from it

    def adopt_batch_size(self, size: int) -> None:
        """Use ``size`` (the training step's micro-batch size) unless a batch size was given."""
        if self.batch_size is None:
            self.batch_size = max(1, int(size))

    def check_not_empty(self) -> None:
        """Raise before training if the target holds no sample."""
        size = len(self.dataset) if self.dataset is not None else _loader_length(self.loader)
        if size == 0:
            raise ValueError(
                f"DiffInCallback: target {self.name!r} yields no batches (its "
                f"{'dataset' if self.dataset is not None else 'DataLoader'} is empty). "
                "Pass a non-empty dataset, or drop the target."
            )

    def _batches(self, step: int, whole: bool = False) -> Iterator[Any]:
        """This rank's share of the refresh's batches (all of them in one process); ``whole``: every sample.

        Under DDP the target set is split across ranks (by sample for a Dataset, by batch
        position for a DataLoader) so that ``g_V`` is computed once, not once per rank.
        """
        if self.loader is not None:
            yield from distributed.shard_batches(self.loader if whole else self._loader_batches())
            return
        assert self.dataset is not None
        chosen: Tensor | None = None
        if not whole and self.max_samples is not None and self.max_samples < len(self.dataset):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            chosen = torch.randperm(len(self.dataset), generator=generator)[: self.max_samples]
        if distributed.world_size() > 1:
            every = torch.arange(len(self.dataset)) if chosen is None else chosen
            chosen = every[distributed.rank() :: distributed.world_size()]
        batch_size = self.batch_size or FALLBACK_BATCH_SIZE
        tensors = getattr(self.dataset.dataset, "tensors", None)
        if isinstance(tensors, tuple) and len(tensors) == 2:
            # A TensorDataset: index its tensors directly, one batch at a time (no per-sample __getitem__).
            ids = torch.arange(len(self.dataset)) if chosen is None else chosen
            for start in range(0, len(ids), batch_size):
                part = ids[start : start + batch_size]
                yield {INDEX_KEY: part, "input": tensors[0][part], "target": tensors[1][part]}
            return
        dataset: Dataset = self.dataset if chosen is None else Subset(self.dataset, chosen.tolist())
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=False)

    def _loader_batches(self) -> Iterator[Any]:
        assert self.loader is not None
        seen = 0
        for batch in self.loader:
            yield batch
            seen += _batch_size_of(batch)
            if self.max_samples is not None and seen >= self.max_samples:
                return

    def _is_whole_dataset(self) -> bool:
        return self.dataset is not None and (self.max_samples is None or self.max_samples >= len(self.dataset))

    def needs_refresh(self, step: int) -> bool:
        return self.gradient is None or self.refreshed_at_step is None or step - self.refreshed_at_step >= self.refresh_every_n_steps

    def target_gradient(self, loss: PerSampleLoss, params: Params, step: int, device: torch.device, batch_gradient: Params) -> Params:
        """``g_V`` at ``params``, recomputed when due (``batch_gradient`` is unused here)."""
        if self.needs_refresh(step):
            return self._refresh(loss, params, step, device, whole=False)
        assert self.gradient is not None and self.refreshed_at_step is not None
        if self.slope is None or step == self._gradient_step():
            return self.gradient
        # g(t) = g(c) + (t - c) * slope, in place (c: the step the gradient stands for now). The same object from
        # step to step: the product stream takes its directions before the backward and knows them by identity,
        # and nothing holds a step's g_V past its step (the accumulator copies what it keeps). In place, not in a
        # buffer of its own: a third parameter-sized vector, or a fresh allocation a step (page faults, heap growth).
        add_slope(list(self.gradient.values()), list(self.slope.values()), float(step - self._gradient_step()))
        self.extrapolated_to = step
        return self.gradient

    def _gradient_step(self) -> int | None:
        """The step ``gradient`` stands for: its refresh's, or the step it was extrapolated to since."""
        return self.refreshed_at_step if self.extrapolated_to is None else self.extrapolated_to

    def fresh_gradient(self, loss: PerSampleLoss, params: Params, step: int, device: torch.device) -> Params:
        """``g_V`` at ``params`` over the WHOLE target, computed now (end of fit, checkpoints).

        ``max_samples`` bounds the cost of the frequent in-run refreshes, whose subsets differ
        from refresh to refresh so that their noise averages out over the run; this gradient is
        used once, with full weight (the drift correction's ``g_V(theta_T)``), so its noise would
        not average out: one pass over the whole target instead.
        """
        return self._refresh(loss, params, step, device, whole=True)

    def _refresh(self, loss: PerSampleLoss, params: Params, step: int, device: torch.device, whole: bool) -> Params:
        previous, previous_step = self.gradient, self.refreshed_at_step
        previous_in_run = previous is not None and previous_step is not None and previous_step < step and not self._whole_last
        keep_previous = self.extrapolation != "none" and not whole and previous_in_run
        if keep_previous and self.slope is not None and self.extrapolated_to is not None:
            # The gradient was extrapolated to c since its refresh at s: g(s) = g(c) - (c - s) * slope, formed
            # in the slope's memory (the extrapolated gradient let go before the pass), or in the gradient's own
            # where the slope is held in a narrower dtype.
            assert previous is not None and previous_step is not None
            slope = list(self.slope.values())
            if slope[0].dtype == next(iter(previous.values())).dtype:
                torch._foreach_mul_(slope, float(previous_step - self.extrapolated_to))
                torch._foreach_add_(slope, list(previous.values()))
                previous = self.slope
            else:
                add_slope(list(previous.values()), slope, float(previous_step - self.extrapolated_to))
        # The old gradient is not held beside the new one (peak memory), unless the slope needs it
        # (target_extrapolation, two in-run refreshes).
        self.gradient, self.slope, self.extrapolated_to = None, None, None
        if not keep_previous:
            previous = None
            self.persistence, self._change_sketch = None, None  # a change measured across a whole refresh is no trend
        batches: Iterable[Any]
        if self._cached_batches is not None:
            batches = self._cached_batches
        else:
            batches = (move_data_to_device(batch, device) for batch in self._batches(step, whole))
            # Only a target used whole at every refresh is cached (a one-off whole pass is not kept).
            if self.cache_on_device and self._is_whole_dataset():
                batches = self._cached_batches = list(batches)
        self.gradient = gradient_of_mean(loss, params, batches, across_ranks=True)
        self.refreshed_at_step, self._whole_last = step, whole
        # An in-run g_V's finiteness, on the device (nothing read back). A whole pass's gradient (end of fit, a
        # checkpoint) is checked on the host where it is used, and keeps no previous gradient.
        finite = None if whole else finite_flag(self.gradient.values())
        if previous is not None:
            assert previous_step is not None and finite is not None
            # (g(s) - g(s')) / (s - s'), formed in the old gradient's memory.
            old = list(previous.values())
            torch._foreach_sub_(old, list(self.gradient.values()))
            torch._foreach_div_(old, float(previous_step - step))
            # A non-finite g_V at either end (zeroed, its steps gated) gives no trend: a zero change, not one
            # that would carry non-finite (or zeroed) values through the next interval's extrapolation.
            unusable = (finite & self.gradient_finite).logical_not() if self.gradient_finite is not None else ~finite
            for change in old:
                change.masked_fill_(unusable, 0.0)  # a device flag broadcast: no read back
            if self.extrapolation == "damped":
                self._damp(previous)
            if self.extrapolation == "damped" and persistence_known_zero(self.persistence):
                # rho = 0 (most refreshes of a hot run): the slope would be zero, so g(s) is held without one, no add
                # a step and no half a vector (the change's sketch is kept for the next refresh's persistence).
                self.slope = None
            else:
                self.slope = {name: change.to(slope_dtype(change.dtype)) for name, change in previous.items()}
        if finite is not None:
            non_finite = ~finite
            for value in self.gradient.values():
                value.masked_fill_(non_finite, 0.0)
            self.gradient_finite = finite
        return self.gradient

    def _damp(self, change: Params) -> None:
        """Scale this refresh's change per step by its persistence from the last one (in place), and keep its sketch."""
        sketch = _sketch(change)
        if self._change_sketch is None:
            persistence = torch.zeros((), dtype=next(iter(change.values())).dtype, device=next(iter(change.values())).device)
        else:
            strides = {name: _sketch_stride(tensor) for name, tensor in change.items()}
            persistence = persistence_of(sketch, self._change_sketch, strides)
        torch._foreach_mul_(list(change.values()), persistence)  # a device scalar: no host synchronisation
        self.persistence, self._change_sketch = persistence, sketch

    def state_dict(self) -> dict[str, Any]:
        return {
            "gradient": None if self.gradient is None else {k: v.detach().cpu() for k, v in self.gradient.items()},
            "refreshed_at_step": self.refreshed_at_step,
            "slope": None if self.slope is None else {k: v.detach().cpu() for k, v in self.slope.items()},
            "whole_last": self._whole_last,
            "extrapolated_to": self.extrapolated_to,  # the step `gradient` stands for, when extrapolated since its refresh
            "persistence": None if self.persistence is None else self.persistence.detach().cpu(),
            "change_sketch": None if self._change_sketch is None else {k: v.detach().cpu() for k, v in self._change_sketch.items()},
            "gradient_finite": None if self.gradient_finite is None else bool(self.gradient_finite),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        gradient = state.get("gradient")
        self.gradient = None if gradient is None else {k: v.to(device) for k, v in gradient.items()}
        self.refreshed_at_step = state.get("refreshed_at_step")
        finite = state.get("gradient_finite")  # (absent from older checkpoints: their gradient was checked on the host)
        self.gradient_finite = None if finite is None else torch.tensor(bool(finite), device=device)
        slope = state.get("slope") if self.extrapolation != "none" else None
        self.slope = None if slope is None else {k: v.to(device) for k, v in slope.items()}
        self._whole_last = bool(state.get("whole_last", False))
        # (absent from checkpoints written before the gradient was extrapolated in place: it was g(s) itself)
        self.extrapolated_to = state.get("extrapolated_to")
        # (A damped slope of rho = 0 is not kept, persistence_known_zero: the sketch then travels without one.)
        damped = self.extrapolation == "damped"
        persistence, sketch = state.get("persistence"), state.get("change_sketch")
        self.persistence = persistence.to(device) if damped and persistence is not None else None
        self._change_sketch = {k: v.to(device) for k, v in sketch.items()} if damped and sketch is not None else None
        if damped and self.slope is not None and self._change_sketch is None:
            # A slope from a checkpoint without a sketch (written by the linear mode, or before the damped one):
            # its persistence is unknown, so it is not followed until the next refresh measures one.
            torch._foreach_mul_(list(self.slope.values()), 0.0)


class TrainingLossTarget:
    """The training loss, with ``g_V`` a running estimate of the full-data gradient.

    Args:
        name: the target's name in the results.
        decay: the moving average's decay per recorded step; about ``1/(1-decay)``
            recent batch gradients make up the estimate.
    """

    kind: TargetKind = "train"
    has_second_order = True

    def __init__(self, name: str = "train", decay: float = 0.9) -> None:
        self.name = name
        self.decay = decay
        self.average: Params | None = None
        self.updates = 0

    def check_not_empty(self) -> None:
        return None

    def target_gradient(
        self, loss: PerSampleLoss, params: Params, step: int, device: torch.device, batch_gradient: Params, usable: Tensor | None = None
    ) -> Params:
        """Fold this step's batch gradient into the average and return the bias-corrected average.

        ``usable``: a boolean on the device, False where the batch gradient is not finite. The fold
        is then kept out of the average and the count (without reading the flag back), so that
        one non-finite step does not poison every later one.
        """
        if self.average is None:
            self.average = {k: torch.zeros_like(v) for k, v in batch_gradient.items()}
        average = list(self.average.values())
        incoming = [batch_gradient[k] for k in self.average]
        if usable is None:
            torch._foreach_mul_(average, self.decay)
            torch._foreach_add_(average, incoming, alpha=1 - self.decay)
            self.updates += 1
        else:
            folded = torch._foreach_mul(average, self.decay)
            torch._foreach_add_(folded, incoming, alpha=1 - self.decay)
            for kept, new in zip(average, folded):
                torch.where(usable, new, kept, out=kept)
            self.updates = self.updates + usable.to(torch.int64)  # a device count from here on
        return self.current_estimate()

    def current_estimate(self) -> Params:
        """The bias-corrected average as it stands (the training loss's gradient estimate at the end)."""
        assert self.average is not None, "no step recorded yet"
        if isinstance(self.updates, Tensor):
            # In float64 (float32 on MPS), as the host's float is (a float32 power would move the estimate by 1e-7); the decay
            # is the kernel's scalar argument, not a tensor built from it (a host-to-device copy, which waits).
            power = torch.pow(self.decay, widened(self.updates))
            # No fold yet (every step so far gated): the average is zero; 1 - decay is the least a fold gives.
            correction = (1 - power).clamp_min(1 - self.decay).to(next(iter(self.average.values())).dtype)
        else:
            correction = 1 - self.decay**self.updates
        return dict(zip(self.average, torch._foreach_div(list(self.average.values()), correction)))

    def state_dict(self) -> dict[str, Any]:
        return {
            "average": None if self.average is None else {k: v.detach().cpu() for k, v in self.average.items()},
            "updates": int(self.updates),
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        average = state.get("average")
        self.average = None if average is None else {k: v.to(device) for k, v in average.items()}
        self.updates = int(state.get("updates", 0))


class SelfTarget:
    """Each sample's own loss: first-order self-influence ``(eta/|B|) |G_i|^2``, no second-order term."""

    kind: TargetKind = "self"
    has_second_order = False

    def __init__(self, name: str = "self") -> None:
        self.name = name

    def check_not_empty(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        return None


Target = DatasetTarget | TrainingLossTarget | SelfTarget


def slope_dtype(gradient_dtype: torch.dtype) -> torch.dtype:
    """The dtype the extrapolation's slope is held in: bfloat16 for a float32 g_V, else g_V's own.

    Half the memory of the one parameter-sized vector that extrapolation adds. The rounding (2^-9
    relative) touches only the extrapolated increment, (t - s) rho c, a fraction of g_V's change over
    a refresh interval; g(s) is recovered at the next refresh from the same rounded slope. float64
    keeps float64 (the reference tests' precision); bfloat16 and float16 models hold their own dtype.
    """
    return torch.bfloat16 if gradient_dtype == torch.float32 else gradient_dtype


# Elements per piece when a narrower slope is added on the CPU: a mixed-dtype add there first casts its whole
# operand to the gradient's dtype, a parameter-sized temporary a step; in pieces it is at most 1 MiB (as
# ScaledShift.dot's pieces), and a handful of Python calls a step on the benchmark MLP.
SLOPE_ADD_PIECE_ELEMENTS = 1 << 18


def add_slope(gradients: list[Tensor], slopes: list[Tensor], alpha: float) -> None:
    """``gradients += alpha * slopes`` in place, without a parameter-sized temporary when the dtypes differ."""
    if slopes[0].dtype == gradients[0].dtype:
        torch._foreach_add_(gradients, slopes, alpha=alpha)
        return
    for gradient, slope in zip(gradients, slopes):
        if gradient.device.type != "cpu":
            gradient.add_(slope, alpha=alpha)  # the cast happens inside the kernel
            continue
        flat_gradient, flat_slope = gradient.view(-1), slope.reshape(-1)
        for start in range(0, flat_gradient.numel(), SLOPE_ADD_PIECE_ELEMENTS):
            end = start + SLOPE_ADD_PIECE_ELEMENTS
            flat_gradient[start:end].add_(flat_slope[start:end], alpha=alpha)


def persistence_known_zero(persistence: Tensor | None) -> bool:
    """Whether a damped slope's persistence is 0, where that is known for free: on the CPU, where a read back
    waits for nothing. On an accelerator it stays a device scalar (a read would wait for the queue), and its
    zero slope is kept and added."""
    return persistence is not None and persistence.device.type == "cpu" and float(persistence) == 0.0


def _sketch_stride(tensor: Tensor) -> int:
    return max(1, -(-tensor.numel() // PERSISTENCE_SKETCH_ELEMENTS))


def _sketch(params: Params) -> dict[str, Tensor]:
    """A fixed strided sample of each tensor's coordinates (all of a tensor up to PERSISTENCE_SKETCH_ELEMENTS)."""
    return {name: tensor.detach().reshape(-1)[:: _sketch_stride(tensor)].clone() for name, tensor in params.items()}


def _sketched_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor], strides: Mapping[str, int]) -> Tensor:
    return torch.stack([strides[name] * torch.vdot(a[name].reshape(-1), b[name].reshape(-1)) for name in a]).sum()


def persistence_of(change: Mapping[str, Tensor], previous_change: Mapping[str, Tensor], strides: Mapping[str, int] | None = None) -> Tensor:
    """``<c, c'> / |c'|^2`` clamped to [0, 1] (0 where c' = 0 or either is non-finite), on sketches or whole tensors.

    The least-squares factor by which the previous change per step predicts this one: 1 for a
    steady trend, 0 for changes that do not persist (or reverse). ``strides`` weight each tensor's
    sketch by its stride (1 each when None: whole tensors, or sketches of tensors below the sketch size).
    """
    strides = strides or {name: 1 for name in change}
    numerator = _sketched_dot(change, previous_change, strides)
    denominator = _sketched_dot(previous_change, previous_change, strides)
    ratio = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    ratio = torch.where((denominator > 0) & torch.isfinite(ratio), ratio, torch.zeros_like(ratio))
    return ratio.clamp(0.0, 1.0)


def build_targets(
    spec: Mapping[str, Any],
    *,
    batch_size: int | None,
    max_samples: int | None,
    refresh_every_n_steps: int,
    train_decay: float,
    seed: int,
    cache_on_device: bool = True,
    extrapolate: TargetExtrapolation | bool = "none",
) -> list[Target]:
    """Turn the callback's ``targets`` argument into target objects, with clear errors for bad values."""
    if not isinstance(spec, Mapping) or not spec:
        raise TypeError(
            "`targets` must be a non-empty dict mapping a name to a Dataset, a DataLoader, 'train' or 'self'; "
            f"got {spec!r}. Example: targets={{'val': val_dataset, 'self': 'self'}}."
        )
    targets: list[Target] = []
    for name, value in spec.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"`targets` keys must be non-empty strings without '/'; got {name!r}.")
        if isinstance(value, str):
            if value == "self":
                targets.append(SelfTarget(name))
            elif value == "train":
                targets.append(TrainingLossTarget(name, decay=train_decay))
            else:
                raise ValueError(
                    f"`targets[{name!r}]` must be a Dataset, a DataLoader, 'train' or 'self'; got the string {value!r}."
                )
        elif isinstance(value, (Dataset, DataLoader)) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
            targets.append(
                DatasetTarget(
                    name,
                    value,
                    batch_size=batch_size,
                    max_samples=max_samples,
                    refresh_every_n_steps=refresh_every_n_steps,
                    seed=seed,
                    cache_on_device=cache_on_device,
                    extrapolate=extrapolate,
                )
            )
        else:
            raise TypeError(
                f"`targets[{name!r}]` must be a Dataset, a DataLoader, 'train' or 'self'; got {type(value).__name__}."
            )
    return targets


def _loader_length(loader: DataLoader | None) -> int:
    assert loader is not None
    try:
        return len(loader)
    except TypeError:  # an iterable-style loader: look at its first batch
        return int(any(True for _ in _first(loader)))


def _first(iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        yield item
        return


def _batch_size_of(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(batch.shape[0]) if isinstance(batch, Tensor) else 1
