"""Every option of :class:`~diffin_lightning.DiffInCallback` in one frozen dataclass.

One place lists the options (a field each, with its help text), checks them (errors
name the argument, the rule, the value and the fix), and turns them into the metadata
saved beside the results (:meth:`DiffInSettings.to_dict`). The callback, the Hydra
config's comments and the README's option table read from here; nothing else keeps a
hand-written list of options.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

FiniteDifferenceScheme = Literal["forward", "central"]
SecondOrderTerm = Literal["propagated", "paper", "sum"]
Schedule = Literal["in_run", "checkpoints"]
DotEngine = Literal["auto", "functional"]
TargetExtrapolation = Literal["none", "linear", "damped"]
TARGET_EXTRAPOLATIONS: tuple[TargetExtrapolation, ...] = ("none", "linear", "damped")
FINITE_DIFFERENCE_SCHEMES: tuple[FiniteDifferenceScheme, ...] = ("forward", "central")
SECOND_ORDER_TERMS: tuple[SecondOrderTerm, ...] = ("propagated", "paper", "sum")
SCHEDULES: tuple[Schedule, ...] = ("in_run", "checkpoints")
DOT_ENGINES: tuple[DotEngine, ...] = ("auto", "functional")

# Chosen by measurement (benchmarks/results/target_schedule*.md): refreshing the dataset target's
# gradient every 10 steps from at most 1,024 samples, extrapolated damped in between, costs a
# tenth of refreshing every step and moves the smooth runs' fidelity cells by at most 0.010
# Spearman (the long, hot runs' moves are inside their noise; README, "Fidelity").
DEFAULT_TARGET_REFRESH_EVERY_N_STEPS = 10
DEFAULT_TARGET_MAX_SAMPLES = 1024


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class DiffInSettings:
    """The callback's options (all but ``targets``), checked once at construction.

    Example::

        >>> settings = DiffInSettings(every_n_steps=10)
        >>> settings.resolved_second_order, settings.to_dict()["every_n_steps"]
        ('propagated', 10)
    """

    loss_fn: Callable[..., Any] | None = _help(
        "loss_fn(module, batch) -> Tensor[B], one unreduced loss per sample; default module.per_sample_loss(batch).",
        default=None,
    )
    index_fn: Callable[..., Any] | None = _help(
        "index_fn(batch) -> LongTensor[B] of sample ids; default batch['index'] (IndexedDataset).", default=None
    )
    num_samples: int | None = _help("N, the number of training samples; default len of the train dataloader's dataset.", default=None)
    every_n_steps: int = _help(
        "Record every n-th optimizer step; a recorded step's contributions count n times (it stands for n steps).", default=1
    )
    target_refresh_every_n_steps: int = _help(
        "Recompute a dataset target's gradient g_V after this many optimizer steps; steps in between reuse it.",
        default=DEFAULT_TARGET_REFRESH_EVERY_N_STEPS,
    )
    target_batch_size: int | None = _help(
        "Samples per forward when computing a dataset target's gradient. None: the training step's micro-batch size, so a "
        "target pass never holds more activations than a training step (peak memory).",
        default=None,
    )
    training_set_batch_size: int | None = _help(
        "Samples per batch of the passes over the whole training set (the end-of-fit drift pass, the checkpoint "
        "schedule's passes). None: the training step's micro-batch size (peak memory as in training). Memory grows with it; "
        "a tiny model at large N reads much faster in large batches (e.g. 65536: see 'Large N' in the README).",
        default=None,
    )
    target_max_samples: int | None = _help(
        "At most this many target samples per in-run refresh (a seeded random subset per refresh); the end-of-fit drift "
        "correction and the checkpoint schedule use the whole target. None uses the whole target.",
        default=DEFAULT_TARGET_MAX_SAMPLES,
    )
    target_extrapolation: TargetExtrapolation | bool | None = _help(
        "How a dataset target's g_V stands in between refreshes s' < s. 'damped': g(s) + rho (t - s) (g(s) - g(s')) / (s - s'), "
        "rho in [0, 1] the persistence of the last two changes (<c_k, c_k-1> / |c_k-1|^2, clamped, on a strided sketch of the "
        "coordinates; 0 until two changes exist): a steady trend is followed, SGD noise is not. 'linear': rho = 1. 'none': hold "
        "g(s). True/False mean 'linear'/'none'. None (auto): 'damped' where in-run refreshes leave recorded steps between "
        "them (target_refresh_every_n_steps > every_n_steps, schedule='in_run'), else 'none'. Either extrapolation holds one "
        "more parameter-sized vector (the slope; in bfloat16 for a float32 model: half a vector; on the CPU none while "
        "'damped' measures rho = 0); named explicitly it needs "
        "those and a dataset target.",
        default=None,
    )
    cache_target_on_device: bool = _help(
        "Keep a whole dataset target's collated batches on the model's device (no re-collation per refresh).", default=True
    )
    train_target_decay: float = _help("Decay of the moving average of batch gradients behind the 'train' target, in [0, 1).", default=0.9)
    eps: float | None = _help(
        "Finite-difference step along the unit target direction; None picks sqrt(machine eps) * max(1, |theta|) each step.",
        default=None,
    )
    finite_difference: FiniteDifferenceScheme = _help(
        "'forward' (one extra forward+backward per target per step, error O(eps)) or 'central' (two, O(eps^2)).", default="forward"
    )
    compute_second_order: bool = _help("False records the first-order term only (in-run TracIn, cheaper).", default=True)
    second_order: SecondOrderTerm | None = _help(
        "Which second-order term 'diffin' adds: 'propagated' (default for in_run), 'paper' (Eq. 9 with 1/m; default for "
        "checkpoints) or 'sum' (Eq. 9 all-steps sum).",
        default=None,
    )
    schedule: Schedule = _help(
        "'in_run' (every recorded step, the step's own samples) or 'checkpoints' (the paper's estimator at num_checkpoints steps).",
        default="in_run",
    )
    num_checkpoints: int | None = _help("m for schedule='checkpoints' (required there, not allowed otherwise).", default=None)
    self_chunk_size: int | None = _help(
        "Samples per vmap chunk for the 'self' target's per-sample gradients on the torch.func path; None = whole batch.",
        default=None,
    )
    dot_products: DotEngine = _help(
        "'auto': capture each layer's inputs and output gradients from the training step itself (one extra "
        "forward+backward at the perturbed point, nothing recomputed); 'functional': recompute everything with torch.func.",
        default="auto",
    )
    reuse_training_step: bool | None = _help(
        "Read the batch gradient and the per-sample quantities at theta from the training step's own forward and "
        "backward (checked once, numerically, on the first recorded step; recomputed if the check fails). None: yes "
        "when the per-sample loss is the module's per_sample_loss (training_step is expected to return its mean), no "
        "with an explicit loss_fn, which training_step may not use; True/False force it.",
        default=None,
    )
    stream_products: bool = _help(
        "Take each layer's per-sample products during a backward, as its output gradient arrives, and let its captured "
        "input and gradient go there (peak memory: about one copy of the activations less). The perturbed passes (one "
        "micro-batch) always can; the training step's backward where the directions are known before it (dataset and "
        "'self' targets: the dataset targets' gradients are then refreshed before the step's forward), in full or "
        "bfloat16 precision on one process. Elsewhere every layer's captures are held to the end of the backward. False: "
        "always hold them (a training step that backpropagates through the same graph twice needs it).",
        default=True,
    )
    release_stale_gradients: bool = _help(
        "At the start of a recorded step, set the parameters' .grad left by the previous step to None before the passes "
        "the callback runs ahead of the forward (the target refresh, the perturbed pass): Lightning's zero_grad discards "
        "them before the backward anyway, and kept they sit beside those passes (one parameter-sized buffer of peak memory). "
        "Likewise the last step's, spent by its update, before the end-of-fit pass (after the fit .grad is then None). "
        "Done only where Lightning would discard them: automatic optimization, accumulate_grad_batches=1, one process, "
        "and neither the module's optimizer_zero_grad / on_before_zero_grad nor the optimizer's zero_grad overridden. "
        "False if your training_step or a hook reads the previous step's .grad before the backward.",
        default=True,
    )
    output_dir: str | os.PathLike[str] | None = _help(
        "Where influence.safetensors and influence.json go; default trainer.log_dir (default_root_dir without a logger).",
        default=None,
    )
    save_on_checkpoint: bool = _help(
        "Also write the influence files whenever Lightning saves a checkpoint, with that checkpoint's global_step and "
        "epoch, just after the checkpoint file lands: the files on disk are never ahead of the last checkpoint.",
        default=False,
    )
    seed: int = _help(
        "Seeds the target subsets and the RNG of the passes over target batches and of the end-of-fit pass; passes over "
        "a step's own training batches replay the training step's RNG state (its dropout masks).",
        default=0,
    )
    allow_batch_mixing: bool = _help(
        "Accept a model with layers that mix a batch's samples (BatchNorm in train mode); refused at setup otherwise. "
        "The scores are then approximate.",
        default=False,
    )

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "target_refresh_every_n_steps"):
            _check_positive_int(name, getattr(self, name))
        for name in ("target_batch_size", "target_max_samples", "self_chunk_size", "num_samples", "training_set_batch_size"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        eps = self.eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf):
            raise ValueError(f"`eps` must be a positive float or None (automatic), and finite; got {eps!r}. Example: eps=1e-4.")
        _check_choice("finite_difference", self.finite_difference, FINITE_DIFFERENCE_SCHEMES)
        if self.second_order is not None:
            _check_choice("second_order", self.second_order, SECOND_ORDER_TERMS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        if self.schedule == "checkpoints" and self.second_order == "propagated":
            raise ValueError(
                "`second_order='propagated'` follows each sample's contributions step by step and needs "
                "schedule='in_run'; with schedule='checkpoints' use second_order='paper' or 'sum'."
            )
        if self.schedule == "checkpoints":
            if self.num_checkpoints is None:
                raise ValueError("`num_checkpoints` must be set for schedule='checkpoints'; got None. Example: num_checkpoints=5.")
            _check_positive_int("num_checkpoints", self.num_checkpoints)
            if self.every_n_steps != 1:
                raise ValueError(
                    f"`every_n_steps` must be 1 with schedule='checkpoints' (the checkpoints set the steps); got "
                    f"{self.every_n_steps}. Drop every_n_steps or use schedule='in_run'."
                )
        elif self.num_checkpoints is not None:
            raise ValueError(
                f"`num_checkpoints` only applies to schedule='checkpoints'; got num_checkpoints={self.num_checkpoints} with "
                f"schedule={self.schedule!r}. Drop it or set schedule='checkpoints'."
            )
        extrapolation = self.target_extrapolation
        if extrapolation is not None and not isinstance(extrapolation, bool) and extrapolation not in TARGET_EXTRAPOLATIONS:
            raise ValueError(
                f"`target_extrapolation` must be one of {TARGET_EXTRAPOLATIONS}, True ('linear'), False ('none') or None "
                f"(auto); got {extrapolation!r}. Example: target_extrapolation='damped'."
            )
        if self.extrapolation_named and not self.refreshes_leave_recorded_steps:
            raise ValueError(
                f"`target_extrapolation={extrapolation!r}` extrapolates g_V to the recorded steps between in-run refreshes, "
                "so it needs target_refresh_every_n_steps > every_n_steps and schedule='in_run'; got "
                f"target_refresh_every_n_steps={self.target_refresh_every_n_steps}, every_n_steps={self.every_n_steps}, "
                f"schedule={self.schedule!r}. Refresh less often than you record "
                "(e.g. target_refresh_every_n_steps=10, every_n_steps=1) or drop target_extrapolation."
            )
        _check_choice("dot_products", self.dot_products, DOT_ENGINES)
        decay = self.train_target_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"`train_target_decay` must be in [0, 1); got {decay!r}. Example: 0.9.")
        for name in _BOOL_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                # (A string such as "false" is truthy: taken as given it would turn the option on.)
                raise TypeError(f"`{name}` must be True or False; got {getattr(self, name)!r}. Example: {name}={not _DEFAULTS[name]}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"`seed` must be an int; got {self.seed!r}. Example: seed=0.")
        if self.output_dir is not None and not isinstance(self.output_dir, (str, os.PathLike)):
            raise TypeError(
                f"`output_dir` must be a path (str or os.PathLike) or None (the Trainer's default_root_dir); got "
                f"{type(self.output_dir).__name__} {self.output_dir!r}. Example: output_dir='runs/influence'."
            )
        if self.reuse_training_step is not None and not isinstance(self.reuse_training_step, bool):
            raise TypeError(f"`reuse_training_step` must be True, False or None (automatic); got {self.reuse_training_step!r}.")
        for name in ("loss_fn", "index_fn"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"`{name}` must be callable or None; got {type(getattr(self, name)).__name__}.")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "DiffInSettings":
        """Build from keyword arguments, naming any unknown one and listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"DiffInCallback got unknown option(s) {unknown}; the options are targets and {sorted(known)} "
                "(see diffin_lightning.settings.DiffInSettings for each one's meaning)."
            )
        return cls(**options)

    @property
    def refreshes_leave_recorded_steps(self) -> bool:
        """Whether some recorded step falls between two refreshes of a dataset target's g_V (in-run, refreshed
        less often than recorded: a recorded step refreshes when the interval has passed since the last)."""
        return self.schedule == "in_run" and self.target_refresh_every_n_steps > self.every_n_steps

    @property
    def extrapolation_named(self) -> bool:
        """Whether an extrapolation was asked for by name (not left to ``None``, not ``'none'``/False)."""
        return self.target_extrapolation not in (None, False, "none")

    @property
    def resolved_target_extrapolation(self) -> TargetExtrapolation:
        """``target_extrapolation`` as one of TARGET_EXTRAPOLATIONS (``None``: 'damped' where refreshes leave gaps)."""
        value = self.target_extrapolation
        if value is None:
            return "damped" if self.refreshes_leave_recorded_steps else "none"
        return extrapolation_mode(value)

    @property
    def resolved_second_order(self) -> SecondOrderTerm:
        """``second_order``, or its schedule's default when ``None``."""
        if self.second_order is not None:
            return self.second_order
        return "paper" if self.schedule == "checkpoints" else "propagated"

    def state_key_fields(self) -> dict[str, Any]:
        """The options that change the recorded numbers, named in the callback's Lightning ``state_key``.

        So that several callbacks (say, two schedules side by side) can share a Trainer and each
        resume its own state. The order and the values are those of checkpoints already saved:
        changing either changes the key, and such a checkpoint would no longer resume.
        """
        return dict(
            schedule=self.schedule,
            num_checkpoints=self.num_checkpoints,
            every_n_steps=self.every_n_steps,
            finite_difference=self.finite_difference,
            compute_second_order=self.compute_second_order,
            eps=self.eps,
            target_refresh_every_n_steps=self.target_refresh_every_n_steps,
            target_max_samples=self.target_max_samples,
            seed=self.seed,
            **_extrapolation_key(self),
            # The 'train' target's decay changes its numbers; named only away from its default, so that the key a
            # run's checkpoints were saved under before it was part of the key stays the same.
            **({"train_target_decay": self.train_target_decay} if self.train_target_decay != _DEFAULTS["train_target_decay"] else {}),
        )

    def inert_options(self, target_kinds: Collection[str], dataset_targets_are_loaders: bool = False) -> list[str]:
        """The options set away from their defaults that this combination never reads, each with why and the fix.

        ``target_kinds``: the kinds of the callback's targets ('dataset', 'train', 'self');
        ``dataset_targets_are_loaders``: every dataset target is a DataLoader (it brings its own
        batches). The callback warns with these once: a value that is accepted and silently
        ignored reads as if it had acted.
        """
        inert: dict[str, str] = {}  # option -> message (the first reason found)

        def changed(name: str) -> bool:
            return getattr(self, name) != _DEFAULTS[name]

        def add(name: str, why: str, fix: str) -> None:
            inert.setdefault(name, f"`{name}={getattr(self, name)!r}` has no effect: {why}. {fix}")

        if not self.compute_second_order:
            why = "compute_second_order=False records the first-order term only"
            if self.second_order is not None and self.second_order != ("paper" if self.schedule == "checkpoints" else "propagated"):
                add("second_order", why, "Drop it, or set compute_second_order=True.")
            for name in ("finite_difference", "eps"):
                if changed(name):
                    add(name, why, "Drop it, or set compute_second_order=True.")
            if self.schedule == "in_run" and changed("training_set_batch_size"):
                # (The only pass over the whole training set in-run is the second order's end-of-fit drift pass.)
                add("training_set_batch_size", why + ", and in-run only the second order passes over the training set", "Drop it, or set compute_second_order=True.")
        if self.schedule == "checkpoints":
            why = "schedule='checkpoints' recomputes each checkpoint's gradients with torch.func and the whole target"
            for name in ("target_refresh_every_n_steps", "dot_products", "stream_products"):
                if changed(name):
                    add(name, why, "Drop it, or use schedule='in_run'.")
            if self.reuse_training_step:
                add("reuse_training_step", why, "Drop it, or use schedule='in_run'.")
        elif self.dot_products == "functional":
            why = "dot_products='functional' recomputes every step through torch.func, with no layer capture"
            if self.reuse_training_step:
                add("reuse_training_step", why, "Drop it, or use dot_products='auto'.")
            if changed("stream_products"):
                add("stream_products", why, "Drop it, or use dot_products='auto'.")
        if "dataset" not in target_kinds:
            why = f"it applies to dataset targets, and `targets` holds none (only {sorted(set(target_kinds))})"
            for name in ("target_batch_size", "target_max_samples", "target_refresh_every_n_steps", "cache_target_on_device"):
                if changed(name):
                    add(name, why, "Drop it, or add a dataset target (for example targets={'val': val_dataset}).")
        elif dataset_targets_are_loaders:
            why = "every dataset target is a DataLoader, which brings its own batches (and is not cached)"
            for name in ("target_batch_size", "cache_target_on_device"):
                if changed(name):
                    add(name, why, "Drop it, or pass the target as a Dataset.")
        if "self" not in target_kinds and changed("self_chunk_size"):
            add("self_chunk_size", "it applies to the 'self' target, and `targets` holds none", "Drop it, or add targets={..., 'self': 'self'}.")
        if "train" not in target_kinds and changed("train_target_decay"):
            add("train_target_decay", "it applies to the 'train' target, and `targets` holds none", "Drop it, or add targets={..., 'train': 'train'}.")
        return list(inert.values())

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (callables by their qualified name), saved in the results' metadata."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if callable(value):
                value = f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}"
            elif isinstance(value, os.PathLike):
                value = os.fspath(value)
            out[f.name] = value
        out["second_order"] = self.resolved_second_order
        out["target_extrapolation"] = self.resolved_target_extrapolation
        return out

    @classmethod
    def help(cls) -> dict[str, str]:
        """Option name -> help text (for documentation and config comments)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def markdown_table(cls) -> str:
        """The README's option table, generated from the fields (``python -m diffin_lightning.settings``)."""
        rows = ["| option | default | meaning |", "| --- | --- | --- |"]
        for f in fields(cls):
            default = "auto" if f.default is None and f.name in ("eps", "second_order", "reuse_training_step", "target_extrapolation") else f.default
            text = f.metadata["help"].replace("|", "\\|")
            rows.append(f"| `{f.name}` | `{default}` | {text} |")
        return "\n".join(rows)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


_BOOL_OPTIONS = ("compute_second_order", "cache_target_on_device", "stream_products", "release_stale_gradients", "save_on_checkpoint", "allow_batch_mixing")
_DEFAULTS = DiffInSettings.defaults()

# What a positive-int option's error suggests: a valid value and what it does.
_POSITIVE_INT_EXAMPLES = {
    "every_n_steps": "every_n_steps=1 records every step",
    "target_refresh_every_n_steps": "target_refresh_every_n_steps=10 refreshes g_V every 10 steps (1: every step)",
    "target_batch_size": "target_batch_size=256, or None for the training micro-batch size",
    "target_max_samples": "target_max_samples=1024, or None for the whole target",
    "self_chunk_size": "self_chunk_size=64, or None for one chunk",
    "num_samples": "num_samples=50000, or None to read it from the training set",
    "training_set_batch_size": "training_set_batch_size=512, or None for the training micro-batch size",
    "num_checkpoints": "num_checkpoints=5",
}


def _extrapolation_key(settings: DiffInSettings) -> dict[str, Any]:
    """The state key's part for target_extrapolation: the keys that runs' checkpoints already hold stay as they were.

    'linear' keeps the ``True`` it was saved under; 'damped', the automatic choice where refreshes
    leave gaps, adds nothing (a run from before it resumes under its key and continues damped);
    holding g_V where 'damped' would be chosen is named, so two such callbacks can share a Trainer.
    """
    mode = settings.resolved_target_extrapolation
    if mode == "linear":
        return {"target_extrapolation": True}
    if mode == "none" and settings.refreshes_leave_recorded_steps:
        return {"target_extrapolation": "none"}
    return {}


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}. Example: {_POSITIVE_INT_EXAMPLES[name]}.")


def extrapolation_mode(value: TargetExtrapolation | bool) -> TargetExtrapolation:
    """A target_extrapolation value as its mode: True/False stand for 'linear'/'none'; a mode is itself."""
    if isinstance(value, bool):
        return "linear" if value else "none"
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


if __name__ == "__main__":
    print(DiffInSettings.markdown_table())
