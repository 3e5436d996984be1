"""The Lightning callback that records Diff-In influence during ``Trainer.fit``."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffin_lightning.batch_mixing import batch_mixing_message, batch_mixing_modules
from diffin_lightning.data import INDEX_KEY, dataset_fingerprint, find_indexed_dataset, inexact_resume_reason
from diffin_lightning.estimator import (
    FINITE_DIFFERENCE_SCHEMES,
    SECOND_ORDER_TERMS,
    SCHEDULES,
    FiniteDifferenceBracket,
    FiniteDifferenceScheme,
    SecondOrderTerm,
    Schedule,
    first_order_term,
    propagation_factor,
    normalize_second_order,
    resolve_eps,
    second_order_term,
)
from diffin_lightning.per_sample import DOT_ENGINES, DotEngine, LossFn, PerSampleLoss, RngState, rng_state
from diffin_lightning.store import COMPONENTS, InfluenceResult, TargetInfluence, save_influence
from diffin_lightning.targets import DatasetTarget, SelfTarget, Target, TrainingLossTarget, build_targets
from diffin_lightning.version import __version__

IndexFn = Callable[[Any], Tensor]
# decayed_first and decayed_weight serve second_order="propagated": the first-order sum and the
# per-sample sum of eta/|B|, each carried through later steps by the propagation factor.
_SUMS = ("first_order", "second_order_sum", "visits", "decayed_first", "decayed_weight")


def _default_loss_fn(module: torch.nn.Module, batch: Any) -> Tensor:
    return module.per_sample_loss(batch)  # type: ignore[operator]


def _default_index_fn(batch: Any) -> Tensor:
    if not isinstance(batch, Mapping) or INDEX_KEY not in batch:
        raise ValueError(
            "DiffInCallback: the training batch carries no sample ids. The default `index_fn` reads "
            f"batch[{INDEX_KEY!r}], but the batch is a {type(batch).__name__}"
            + (f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else "")
            + ". Wrap the training dataset in diffin_lightning.IndexedDataset, or pass "
            "index_fn=lambda batch: <LongTensor of sample ids>."
        )
    return batch[INDEX_KEY]


@contextmanager
def _training_untouched(module: torch.nn.Module) -> Iterator[None]:
    """Run the callback's extra passes without a trace on training: same random numbers, same buffers.

    The RNG is forked (training draws the same dropout masks and data order with or without the
    callback), and every buffer (BatchNorm's running statistics and ``num_batches_tracked``) is put
    back bit for bit afterwards, whatever path the passes took (``loss_fn`` called on the module
    itself, or a functional call).
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    saved = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])


def _all_finite(tensors: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors.values())


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int; got {value!r}. Use 1 for every step.")


@dataclass(frozen=True)
class _Propagation:
    """One step's inputs to second_order='propagated'."""

    factor: float  # how much of every earlier contribution survives this step
    eta_over_batch: float  # each visited sample's displacement weight eta/|B|
    eta: float
    target_gradient: dict[str, Tensor]


class _StepContext:
    """One step's point, batches and the quantities several targets share, each computed at most once."""

    def __init__(self, loss: PerSampleLoss, params: dict[str, Tensor], batches: list[Any], batch_size: int) -> None:
        self.loss, self.params, self.batches, self.batch_size = loss, params, batches, batch_size

    @cached_property
    def batch_gradient(self) -> dict[str, Tensor]:
        """``G_B`` at the step's parameters (keeping the activations for the dot products that follow)."""
        return self.loss.batch_gradient(self.params, self.batches, self.batch_size, keep_captures=True)

    @cached_property
    def f_at_params(self) -> Tensor:
        """``[<G_B, G_i>]_i`` at the step's parameters."""
        return self.loss.dots(self.params, self.batches, self.batch_gradient)


class DiffInCallback(Callback):
    """Records, for every training sample, its Diff-In influence on one or more target losses.

    At every recorded optimizer step ``t`` (parameters ``theta_t`` before the update,
    learning rate ``eta_t`` after schedulers) and for every sample ``i`` of the step's
    batch ``B`` (all micro-batches under gradient accumulation) it adds, per target:

    - ``first_order``: ``(eta/|B|) <g_V, G_i>`` (in-run TracIn);
    - ``second_order``: ``-(t eta^2/|B|) <g_V, H_B G_i + H_i G_B>`` (Diff-In, Eq. 9 in-run),
      the Hessian-gradient products by a finite difference of ordinary gradients.

    Sign: positive = the sample helped (removing it would raise the target loss).

    The module gives unreduced per-sample losses through a method
    ``per_sample_loss(batch) -> Tensor[B]`` (or ``loss_fn(module, batch)``) and the batch
    gives sample ids (``batch["index"]``, as :class:`IndexedDataset` yields, or ``index_fn``).

    Args:
        targets: name -> a ``Dataset`` or ``DataLoader`` (its mean loss), ``"train"`` (the
            training loss, via a running estimate of the full-data gradient) or ``"self"``
            (each sample's own loss, first order only).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``; default ``module.per_sample_loss(batch)``.
        index_fn: ``index_fn(batch) -> LongTensor[B]`` of sample ids; default ``batch["index"]``.
        num_samples: N, the number of training samples; default ``len`` of the train dataloader's dataset.
        every_n_steps: record every n-th optimizer step. A skipped step contributes nothing;
            a recorded step's contributions are multiplied by n, since it stands for n steps.
        target_refresh_every_n_steps: recompute a dataset target's gradient ``g_V`` after
            this many steps; steps in between use the last one (cheaper, slightly stale).
        target_batch_size: batch size for dataset targets.
        target_max_samples: at most this many target samples per refresh (a random subset
            per refresh); ``None`` uses the whole target set.
        cache_target_on_device: keep a whole dataset target's batches on the model's device
            (saves re-collating it every refresh; costs its size in device memory).
        train_target_decay: decay of the moving average behind the ``"train"`` target's gradient.
        eps: finite-difference step along the unit target direction; ``None`` picks
            ``sqrt(machine eps) * max(1, |theta|)`` every step.
        finite_difference: ``"forward"`` (one extra forward+backward per target per step,
            error O(eps)) or ``"central"`` (two, error O(eps^2)).
        compute_second_order: ``False`` records the first-order term only (in-run TracIn at
            about a third of the cost); ``second_order`` is then 0 and ``diffin`` equals ``first_order``.
        second_order: which second-order term ``diffin`` adds to the first order:
            ``"propagated"`` (default for the in-run schedule, chosen by the fidelity benchmark,
            see the README): every earlier contribution is carried through each later step by
            ``1 - eta <u, H_B u>`` (the batch curvature along the target direction, from the
            same finite difference), and the target gradient's drift is corrected at the end of
            fit with one pass over the training set; ``"paper"`` (Eq. 9, the second-order sum divided by the number of steps it
            stands for, Eq. 9's 1/m) or ``"sum"`` (the all-steps sum). Applied when scores
            are read; both can be had from one run via :meth:`influence_with`.
        schedule: ``"in_run"`` (every recorded step, the step's own samples, each term taken
            when the sample is visited) or ``"checkpoints"`` (the paper's checkpoint-accelerated
            estimator: at ``num_checkpoints`` evenly spaced steps, every training sample is
            scored with the step's batch as the proxy batch ``B``; each checkpoint stands for
            ``T/m`` steps; the ``"train"`` target uses the exact full-data gradient there).
        num_checkpoints: ``m`` for ``schedule="checkpoints"``; checkpoint ``k`` is step
            ``floor((k + 1/2) T/m)``, the middle of the ``k``-th of ``m`` equal spans of the run.
        dot_products: ``"auto"`` computes per-sample dot products from the activations and
            output gradients of the batch-gradient pass ("ghost" dot products, no extra pass)
            when every trainable parameter sits in a Linear layer, else with ``torch.func.jvp``;
            ``"functional"`` always uses ``jvp``. Both give the same numbers (tested).
        self_chunk_size: samples per ``vmap`` chunk for the ``"self"`` target's per-sample
            gradients (bounds memory); ``None`` does the whole batch at once.
        output_dir: where ``influence.safetensors`` and ``influence.json`` go; default
            ``trainer.log_dir`` (``default_root_dir`` without a logger).
        save_on_checkpoint: also write the files whenever Lightning saves a checkpoint, with
            that checkpoint's ``global_step`` and ``epoch`` (``complete: false``). They are written
            just after the checkpoint file, so files on disk are never ahead of the last checkpoint;
            for the same reason a crashed run then keeps the last checkpoint's files rather than
            writing its partial scores.
        seed: seeds the target subsets and the RNG of the passes over target batches and of the
            end-of-fit drift pass. Passes over the step's own training batches (at ``theta`` and at
            ``theta + eps u``) restore the RNG state the training step's forward started from, so
            dropout draws the training step's own masks there (exactly, when the training step's
            first random draws are its forward's, as in ``loss = self.per_sample_loss(batch).mean()``).
        allow_batch_mixing: accept a model with layers that mix the samples of a batch
            (BatchNorm in train mode, see :mod:`diffin_lightning.batch_mixing`); the scores are
            then approximate. By default such a model is refused at ``setup``.

    Example::

        >>> from diffin_lightning import DiffInCallback
        >>> callback = DiffInCallback(targets={"self": "self"}, second_order="paper")
        >>> callback.second_order
        'paper'
    """

    def __init__(
        self,
        targets: Mapping[str, Dataset | DataLoader | str],
        *,
        loss_fn: LossFn | None = None,
        index_fn: IndexFn | None = None,
        num_samples: int | None = None,
        every_n_steps: int = 1,
        target_refresh_every_n_steps: int = 1,
        target_batch_size: int = 256,
        target_max_samples: int | None = None,
        cache_target_on_device: bool = True,
        train_target_decay: float = 0.9,
        eps: float | None = None,
        finite_difference: FiniteDifferenceScheme = "forward",
        compute_second_order: bool = True,
        second_order: SecondOrderTerm | None = None,
        schedule: Schedule = "in_run",
        num_checkpoints: int | None = None,
        self_chunk_size: int | None = None,
        dot_products: DotEngine = "auto",
        output_dir: str | os.PathLike[str] | None = None,
        save_on_checkpoint: bool = False,
        seed: int = 0,
        allow_batch_mixing: bool = False,
    ) -> None:
        _check_positive_int("every_n_steps", every_n_steps)
        _check_positive_int("target_refresh_every_n_steps", target_refresh_every_n_steps)
        _check_positive_int("target_batch_size", target_batch_size)
        if target_max_samples is not None:
            _check_positive_int("target_max_samples", target_max_samples)
        if self_chunk_size is not None:
            _check_positive_int("self_chunk_size", self_chunk_size)
        if num_samples is not None:
            _check_positive_int("num_samples", num_samples)
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0):
            raise ValueError(f"`eps` must be a positive float or None (automatic); got {eps!r}.")
        if finite_difference not in FINITE_DIFFERENCE_SCHEMES:
            raise ValueError(f"`finite_difference` must be one of {FINITE_DIFFERENCE_SCHEMES}; got {finite_difference!r}.")
        if second_order is None:
            second_order = "paper" if schedule == "checkpoints" else "propagated"
        if second_order not in SECOND_ORDER_TERMS:
            raise ValueError(f"`second_order` must be one of {SECOND_ORDER_TERMS}; got {second_order!r}.")
        if schedule == "checkpoints" and second_order == "propagated":
            raise ValueError(
                "`second_order='propagated'` follows each sample's contributions step by step and needs "
                "schedule='in_run'; with schedule='checkpoints' use second_order='paper' or 'sum'."
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}; got {schedule!r}.")
        if schedule == "checkpoints":
            if num_checkpoints is None:
                raise ValueError("`num_checkpoints` must be set for schedule='checkpoints'; got None. Example: num_checkpoints=5.")
            _check_positive_int("num_checkpoints", num_checkpoints)
            if every_n_steps != 1:
                raise ValueError(
                    f"`every_n_steps` must be 1 with schedule='checkpoints' (the checkpoints set the steps); got {every_n_steps}."
                )
        elif num_checkpoints is not None:
            raise ValueError(
                f"`num_checkpoints` only applies to schedule='checkpoints'; got num_checkpoints={num_checkpoints} with "
                f"schedule={schedule!r}. Drop it or set schedule='checkpoints'."
            )
        if dot_products not in DOT_ENGINES:
            raise ValueError(f"`dot_products` must be one of {DOT_ENGINES}; got {dot_products!r}.")
        if not 0.0 <= train_target_decay < 1.0:
            raise ValueError(f"`train_target_decay` must be in [0, 1); got {train_target_decay!r}.")
        self.targets: list[Target] = build_targets(
            targets,
            batch_size=target_batch_size,
            max_samples=target_max_samples,
            refresh_every_n_steps=target_refresh_every_n_steps,
            train_decay=train_target_decay,
            seed=seed,
            cache_on_device=cache_target_on_device,
        )
        self.loss_fn = loss_fn
        self.index_fn = index_fn or _default_index_fn
        self.num_samples = num_samples
        self.target_batch_size = target_batch_size
        self.total_steps = 0
        self.every_n_steps = every_n_steps
        self.target_refresh_every_n_steps = target_refresh_every_n_steps
        self.eps = eps
        self.finite_difference = finite_difference
        self.compute_second_order = compute_second_order
        self.second_order = second_order
        self.schedule = schedule
        self.num_checkpoints = num_checkpoints
        self.checkpoint_steps: list[int] = []
        self.self_chunk_size = self_chunk_size
        self.dot_products = dot_products
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.save_on_checkpoint = save_on_checkpoint
        self.seed = seed
        self.allow_batch_mixing = allow_batch_mixing

        self.output_path: Path | None = None
        self.fingerprint: str | None = None
        self._sums: dict[str, dict[str, Tensor]] = {}
        # second_order="propagated": per target, sum_t (eta_t/N) g_V(theta_t) carried by the same factors,
        # and the drift correction computed from it at the end of fit.
        self._target_sums: dict[str, dict[str, Tensor]] = {}
        self._drift: dict[str, Tensor] = {}
        # (micro-batch, its ids, the RNG state its training forward started from)
        self._pending: list[tuple[Any, Tensor, RngState]] = []
        self._loaded_state: dict[str, Any] | None = None
        self._loss_checked = False
        self._per_sample_loss: PerSampleLoss | None = None
        self._checkpoint_result: InfluenceResult | None = None  # see on_save_checkpoint
        self.steps_recorded = 0
        self.steps_represented = 0.0
        self.skipped_amp_steps = 0
        self.nonfinite_skipped = 0
        self.nonfinite_samples_skipped: dict[str, int] = {}  # per target: (sample, step) pairs skipped
        self.nonfinite_steps_skipped: dict[str, int] = {}  # per target: steps skipped for a non-finite step quantity
        self.model_nonfinite_step: int | None = None  # first step whose parameters were non-finite
        self._warned: set[tuple[str, str]] = set()
        self.last_eps: float | None = None

    # ------------------------------------------------------------------ setup

    @property
    def state_key(self) -> str:
        # Everything that changes the recorded numbers, so that several callbacks (say, two
        # schedules side by side) can share a Trainer and each resume its own state.
        return self._generate_state_key(
            targets=sorted(t.name for t in self.targets),
            schedule=self.schedule,
            num_checkpoints=self.num_checkpoints,
            every_n_steps=self.every_n_steps,
            finite_difference=self.finite_difference,
            compute_second_order=self.compute_second_order,
            eps=self.eps,
        )

    @staticmethod
    def check_strategy(trainer: pl.Trainer) -> None:
        """Raise unless ``trainer`` trains on one device (callable before ``fit``, which launches processes)."""
        strategy = trainer.strategy
        if not isinstance(strategy, SingleDeviceStrategy) or trainer.world_size != 1:
            raise RuntimeError(
                "DiffInCallback supports single-device training for now; got strategy "
                f"{type(strategy).__name__} with world_size={trainer.world_size}. Train with "
                "Trainer(devices=1) (any accelerator) until distributed support lands."
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_strategy(trainer)
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "DiffInCallback needs automatic optimization (one optimizer step per batch that Lightning "
                "drives); this module sets automatic_optimization=False."
            )
        if self.loss_fn is None and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise AttributeError(
                f"DiffInCallback: {type(pl_module).__name__} has no method `per_sample_loss(batch) -> Tensor[B]` "
                "and no `loss_fn` was given. Add the method (return the unreduced loss of each sample) or pass "
                "loss_fn=lambda module, batch: <Tensor[B]>."
            )
        self._check_batch_mixing(pl_module)
        for target in self.targets:
            target.check_not_empty()
        self._per_sample_loss = PerSampleLoss(pl_module, self.loss_fn or _default_loss_fn, engine=self.dot_products)

    def _check_batch_mixing(self, pl_module: pl.LightningModule) -> None:
        found = batch_mixing_modules(pl_module)
        if found and not self.allow_batch_mixing:
            raise RuntimeError(batch_mixing_message(found))
        if found:
            rank_zero_warn(batch_mixing_message(found).split(" Replace them")[0] + " Accepted (allow_batch_mixing=True).")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = self._train_dataset(trainer)
        # One rule for N: ids lie in [0, N). With an IndexedDataset (also under Subset wrappers) the ids
        # are its positions, so N is its length; otherwise N is the dataset's length or num_samples.
        # With an index_fn of one's own the ids are one's own too: then N is num_samples or the length.
        indexed = find_indexed_dataset(dataset) if self.index_fn is _default_index_fn else None
        id_space = len(indexed) if indexed is not None else (len(dataset) if dataset is not None else None)
        num_samples = self.num_samples if self.num_samples is not None else id_space
        if num_samples is None:
            raise ValueError(
                "DiffInCallback could not tell the number of training samples N: the train dataloader's "
                "dataset has no length. Pass num_samples=N (ids lie in [0, N))."
            )
        if indexed is not None and self.num_samples is not None and self.num_samples != len(indexed):
            raise ValueError(
                f"`num_samples` is {self.num_samples} but the training ids come from an IndexedDataset of "
                f"{len(indexed)} samples (ids are its positions, also under a Subset). Leave num_samples=None "
                f"or pass num_samples={len(indexed)}."
            )
        if indexed is None and dataset is not None and num_samples < len(dataset):
            raise ValueError(
                f"`num_samples` (N: ids lie in [0, N)) is {num_samples} but the train dataloader's dataset holds "
                f"{len(dataset)} samples, each needing its own id. Pass num_samples >= {len(dataset)} (the largest "
                "id + 1), or leave it None."
            )
        self.num_samples = num_samples
        # The fingerprint covers the id space: the IndexedDataset the ids index (also under a Subset).
        self.fingerprint = dataset_fingerprint(indexed if indexed is not None else (dataset if dataset is not None else num_samples))
        self._check_optimizer(trainer)
        if self.schedule == "checkpoints":
            self.checkpoint_steps = self._plan_checkpoints(trainer)
        device = pl_module.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        if self._loaded_state is not None:
            self._adopt_loaded_state(device, dtype)
            self._warn_if_resume_is_inexact(trainer)
        elif not self._sums:
            self._sums = {
                target.name: {key: torch.zeros(num_samples, dtype=dtype, device=device) for key in _SUMS}
                for target in self.targets
            }

    def _warn_if_resume_is_inexact(self, trainer: pl.Trainer) -> None:
        batches = trainer.num_training_batches
        mid_epoch = math.isfinite(batches) and trainer.global_step % max(1, math.ceil(batches / trainer.accumulate_grad_batches)) != 0
        reason = inexact_resume_reason(trainer.train_dataloader, mid_epoch)
        if reason is not None:
            rank_zero_warn(
                f"DiffInCallback: resumed at step {trainer.global_step}, but {reason}: the scores will differ from an "
                "uninterrupted run. Use diffin_lightning.ResumableDataLoader with an EpochSeededSampler (the bundled "
                "data modules do), or resume from end-of-epoch checkpoints with a replayable sampler."
            )

    def _plan_checkpoints(self, trainer: pl.Trainer) -> list[int]:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                "schedule='checkpoints' needs the run's total number of optimizer steps T to space the checkpoints; "
                f"Lightning estimates {total}. Set max_epochs or max_steps."
            )
        self.total_steps = int(total)
        assert self.num_checkpoints is not None
        return sorted({int((k + 0.5) * self.total_steps / self.num_checkpoints) for k in range(self.num_checkpoints)})

    @staticmethod
    def _train_dataset(trainer: pl.Trainer) -> Any:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        return dataset if dataset is not None and hasattr(dataset, "__len__") else None

    def _check_optimizer(self, trainer: pl.Trainer) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"DiffInCallback needs exactly one optimizer; the module configures {len(trainer.optimizers)}."
            )
        optimizer = trainer.optimizers[0]
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
        if trainer.gradient_clip_val:
            approximations.append("gradient clipping is ignored (the unclipped batch gradient is used)")
        if approximations:
            rank_zero_warn(
                "DiffInCallback's maths assumes plain SGD; the scores are an approximation here: "
                + "; ".join(approximations)
                + "."
            )

    # ------------------------------------------------------------------ per batch / per step

    def _records(self, step: int) -> bool:
        if self.schedule == "checkpoints":
            return step in self.checkpoint_steps
        return step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._write_held_checkpoint_result(trainer)
        ids = self._sample_ids(batch, pl_module.device)
        if not self._loss_checked:
            self._check_per_sample_loss(pl_module, batch, len(ids))
        if self._records(trainer.global_step):
            # The training step's forward draws its dropout masks from this state; the extra passes over
            # this micro-batch restore it, so they differentiate the network that training differentiated.
            self._pending.append((batch, ids, rng_state(pl_module.device)))

    def _sample_ids(self, batch: Any, device: torch.device) -> Tensor:
        ids = self.index_fn(batch)
        ids = torch.as_tensor(ids, device=device)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"DiffInCallback: sample ids must be a 1-d integer tensor [B]; `index_fn` gave dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}."
            )
        ids = ids.long()
        assert self.num_samples is not None
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise ValueError(
                f"DiffInCallback: sample ids must lie in [0, N) with N={self.num_samples}; the batch holds ids from "
                f"{int(ids.min())} to {int(ids.max())}. Wrap the training dataset in IndexedDataset (a Subset "
                "goes around it: ids stay the wrapped dataset's), or, with ids of your own, pass num_samples = the "
                f"largest id in the whole training set + 1 (at least {int(ids.max()) + 1})."
            )
        return ids

    def _check_per_sample_loss(self, pl_module: pl.LightningModule, batch: Any, batch_size: int) -> None:
        loss_fn = self.loss_fn or _default_loss_fn
        with torch.no_grad(), _training_untouched(pl_module):
            losses = loss_fn(pl_module, batch)
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (batch_size,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"DiffInCallback: the per-sample loss must be a tensor of shape [B] = ({batch_size},), one unreduced "
                f"loss per sample; got {shape}. Compute the loss with reduction='none' (e.g. "
                "F.cross_entropy(logits, y, reduction='none'))."
            )
        self._loss_checked = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        pending, self._pending = self._pending, []
        step = trainer.global_step
        if not self._records(step) or not pending:
            return
        if self._scaler_will_skip(trainer, optimizer):
            # AMP's scaler skips optimizer.step on non-finite gradients: no update, no influence.
            self.skipped_amp_steps += 1
            return
        ids = torch.cat([sample_ids for _, sample_ids, _ in pending])
        if ids.unique().numel() != ids.numel():
            raise ValueError(
                f"DiffInCallback: sample ids must not repeat within an optimizer step; step {step} holds "
                f"{ids.numel() - ids.unique().numel()} repeated ids. Sample without replacement (a plain "
                "shuffling DataLoader does) so each sample appears at most once per step."
            )
        # Training must draw the same random numbers with or without the callback (data order,
        # dropout): the extra passes and target loaders run on a forked RNG.
        assert self._per_sample_loss is not None
        batches = [batch for batch, _, _ in pending]
        self._per_sample_loss.replay_rng_states([(batch, state) for batch, _, state in pending])
        try:
            with _training_untouched(pl_module):
                if self.schedule == "checkpoints":
                    self._record_checkpoint(trainer, step, optimizer, batches, int(ids.numel()))
                else:
                    self._record_step(step, optimizer, batches, ids)
        finally:
            self._per_sample_loss.clear_captures()  # the step's activations and RNG states are not needed any more

    @staticmethod
    def _scaler_will_skip(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            return False
        # The gradients are unscaled by now; the scaler skips the step exactly when one is non-finite.
        return any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all())
            for group in optimizer.param_groups
            for p in group["params"]
        )

    def _record_step(self, step: int, optimizer: torch.optim.Optimizer, batches: list[Any], ids: Tensor) -> None:
        loss = self._per_sample_loss
        assert loss is not None
        loss.seed = self.seed * 1_000_003 + step
        context = _StepContext(loss, loss.parameters(), batches, int(ids.numel()))
        eta = float(optimizer.param_groups[0]["lr"])
        self.steps_recorded += 1
        self.steps_represented += self.every_n_steps
        # Step-level quantities: a non-finite one leaves nothing of this step that can be trusted.
        if not _all_finite(context.params):
            self._note_nonfinite_model(step)
        if self.model_nonfinite_step is not None or not math.isfinite(eta):
            what = "the model's parameters" if self.model_nonfinite_step is not None else f"the learning rate ({eta})"
            for target in self.targets:
                self._skip_step(target.name, step, what)
            return
        eps = resolve_eps(self.eps, context.params)
        self.last_eps = eps
        batch_gradient_finite: bool | None = None
        for target in self.targets:
            propagation = None
            if isinstance(target, SelfTarget):
                first = first_order_term(eta, context.batch_size, self._squared_gradient_norms(target, context))
                second = torch.zeros_like(first)
            else:
                if batch_gradient_finite is None:
                    batch_gradient_finite = _all_finite(context.batch_gradient)
                if not batch_gradient_finite:
                    # Checked before the target sees it: the 'train' target folds G_B into its running average.
                    self._skip_step(target.name, step, "the batch gradient G_B")
                    continue
                target_gradient = target.target_gradient(loss, context.params, step, ids.device, context.batch_gradient)
                if not _all_finite(target_gradient):
                    self._skip_step(target.name, step, "the target gradient g_V")
                    continue
                first = first_order_term(eta, context.batch_size, loss.dots(context.params, batches, target_gradient))
                propagation = None
                if self.compute_second_order:
                    finite_difference = FiniteDifferenceBracket(
                        loss, context.params, batches, context.batch_size, target_gradient, eps, self.finite_difference
                    )
                    bracket = finite_difference.evaluate(batches, context.f_at_params)
                    second = second_order_term(eta, step, context.batch_size, bracket)
                    curvature = finite_difference.curvature(context.batch_gradient)
                    if not math.isfinite(curvature):
                        # propagation_factor would clamp NaN to 0 and wipe every earlier contribution.
                        self._skip_step(target.name, step, "the curvature along g_V")
                        continue
                    propagation = _Propagation(
                        propagation_factor(eta, curvature, self.every_n_steps), eta / context.batch_size, eta, target_gradient
                    )
                else:
                    second = torch.zeros_like(first)
            self._accumulate(target.name, step, ids, first, second, float(self.every_n_steps), propagation)

    def _skip_step(self, name: str, step: int, what: str) -> None:
        """A non-finite step- or target-level quantity: this step gives target ``name`` nothing; counted."""
        self.nonfinite_steps_skipped[name] = self.nonfinite_steps_skipped.get(name, 0) + 1
        if (name, what) not in self._warned:
            self._warned.add((name, what))
            rank_zero_warn(
                f"DiffInCallback: {what} is non-finite at step {step}: the step is skipped for target {name!r} "
                "(nothing of it reaches the scores; later such steps are skipped without a warning and counted in the "
                "metadata's 'nonfinite_steps_skipped'). A diverging loss, an inf learning rate or an eps too small "
                "for the dtype can cause this."
            )

    def _note_nonfinite_model(self, step: int) -> None:
        if self.model_nonfinite_step is None:
            self.model_nonfinite_step = step
            rank_zero_warn(
                f"DiffInCallback: the model's parameters are non-finite at step {step}; no later step can be scored. "
                "The files will say complete: false with the reason. Lower the learning rate or guard the loss."
            )

    def _propagate(self, name: str, ids: Tensor, first: Tensor, weight: float, propagation: _Propagation) -> None:
        """Carry every earlier contribution through this step, then add this step's (second_order='propagated').

        ``ids`` and ``first`` are the step's finite contributions only.
        """
        if not math.isfinite(propagation.factor):
            return  # the contributions' own check has counted and warned
        sums = self._sums[name]
        dtype = sums["decayed_first"].dtype
        sums["decayed_first"].mul_(propagation.factor).index_add_(0, ids, first.detach().to(dtype) * weight)
        visit_weight = torch.full_like(first, propagation.eta_over_batch, dtype=dtype) * weight
        sums["decayed_weight"].mul_(propagation.factor).index_add_(0, ids, visit_weight)
        assert self.num_samples is not None
        previous = self._target_sums.get(name)
        scale = weight * propagation.eta / self.num_samples
        self._target_sums[name] = {
            k: (0.0 if previous is None else propagation.factor * previous[k]) + scale * v.detach()
            for k, v in propagation.target_gradient.items()
        }

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_held_checkpoint_result(trainer)
        if self._sums and not _all_finite(dict(pl_module.named_parameters())):
            self._note_nonfinite_model(trainer.global_step)
        if self.model_nonfinite_step is not None:
            return  # no drift correction from a non-finite model: the files say complete: false
        if self.schedule == "in_run" and self.compute_second_order and self._target_sums:
            with _training_untouched(pl_module):
                self._compute_drift(trainer, trainer.global_step)

    def _compute_drift(self, trainer: pl.Trainer, step: int) -> None:
        """The target-drift correction: sum over visits of (eta/|B|) <g_V(theta_T) - g_V(theta_s), G_i>, decayed.

        With ``G_i(theta_s)`` approximated by ``G_i(theta_T)`` it becomes
        ``decayed_weight_i <g_V(theta_T), G_i> - <sum_t (eta_t/N) g_V(theta_t) (decayed), G_i>``: two
        per-sample dot products at the final parameters, one pass over the training set.
        """
        loss = self._per_sample_loss
        assert loss is not None
        loss.seed = self.seed * 1_000_003 + step
        params = loss.parameters()
        device = params[next(iter(params))].device
        final_gradients = {}
        for target in self.targets:
            if target.name not in self._target_sums or isinstance(target, SelfTarget):
                continue
            if isinstance(target, DatasetTarget):
                final_gradients[target.name] = target.fresh_gradient(loss, params, step, device)
            else:
                final_gradients[target.name] = target.current_estimate()
        for name in [name for name, gradient in final_gradients.items() if not _all_finite(gradient)]:
            del final_gradients[name]  # no drift correction without a finite final target gradient
            self._skip_step(name, step, "the final target gradient of the drift correction")
        drifts = {name: torch.zeros_like(self._sums[name]["decayed_weight"]) for name in final_gradients}
        for batch, ids in self._training_set_batches(trainer, device):
            for name, final_gradient in final_gradients.items():
                drift = drifts[name]
                toward_final = loss.dots(params, [batch], final_gradient).to(drift.dtype)
                toward_past = loss.dots(params, [batch], self._target_sums[name]).to(drift.dtype)
                correction = self._sums[name]["decayed_weight"][ids] * toward_final - toward_past
                finite = torch.isfinite(correction)
                if not bool(finite.all()):
                    skipped = int((~finite).sum())
                    self.nonfinite_skipped += skipped
                    self.nonfinite_samples_skipped[name] = self.nonfinite_samples_skipped.get(name, 0) + skipped
                    ids, correction = ids[finite], correction[finite]
                drift.index_add_(0, ids, correction)
        self._drift.update(drifts)

    def _record_checkpoint(self, trainer: pl.Trainer, step: int, optimizer: torch.optim.Optimizer, proxy_batches: list[Any], proxy_size: int) -> None:
        """Score every training sample at this checkpoint, with the step's batch as the proxy batch."""
        loss = self._per_sample_loss
        assert loss is not None and self.num_samples is not None
        loss.seed = self.seed * 1_000_003 + step
        context = _StepContext(loss, loss.parameters(), proxy_batches, proxy_size)
        eta = float(optimizer.param_groups[0]["lr"])
        eps = resolve_eps(self.eps, context.params)
        self.last_eps = eps
        n = self.num_samples
        weight = self.total_steps / len(self.checkpoint_steps)  # the steps this checkpoint stands for
        device = context.params[next(iter(context.params))].device
        gradients: dict[str, dict[str, Tensor]] = {}
        brackets: dict[str, FiniteDifferenceBracket] = {}
        for target in self.targets:
            if isinstance(target, SelfTarget):
                continue
            if isinstance(target, TrainingLossTarget):
                gradients[target.name] = loss.batch_gradient(context.params, (b for b, _ in self._training_set_batches(trainer, device)))
            else:
                gradients[target.name] = target.target_gradient(loss, context.params, step, device, context.batch_gradient)
            if self.compute_second_order:
                brackets[target.name] = FiniteDifferenceBracket(
                    loss, context.params, proxy_batches, proxy_size, gradients[target.name], eps, self.finite_difference
                )
        for batch, ids in self._training_set_batches(trainer, device):
            f_at_params = loss.dots(context.params, [batch], context.batch_gradient) if brackets else None
            for target in self.targets:
                if isinstance(target, SelfTarget):
                    sample = _StepContext(loss, context.params, [batch], int(ids.numel()))
                    first = first_order_term(eta, n, self._squared_gradient_norms(target, sample))
                    second = torch.zeros_like(first)
                else:
                    first = first_order_term(eta, n, loss.dots(context.params, [batch], gradients[target.name]))
                    if target.name in brackets:
                        assert f_at_params is not None
                        second = second_order_term(eta, step, n, brackets[target.name].evaluate([batch], f_at_params))
                    else:
                        second = torch.zeros_like(first)
                self._accumulate(target.name, step, ids, first, second, weight)
        self.steps_recorded += 1
        self.steps_represented += weight

    def _training_set_batches(self, trainer: pl.Trainer, device: torch.device) -> Iterator[tuple[Any, Tensor]]:
        """The whole training set in id order, one batch on the device at a time (never all of it)."""
        dataset = self._train_dataset(trainer)
        if dataset is None:
            raise ValueError(
                "DiffInCallback scores every training sample (schedule='checkpoints', or the end-of-fit pass of "
                "second_order='propagated') and needs a train dataloader whose dataset has a length."
            )
        loader = DataLoader(dataset, batch_size=self.target_batch_size, shuffle=False)
        # A bar of its own (where the trainer shows one): this pass over the whole training set would
        # otherwise look like a hang after the last epoch's bar.
        shown = trainer.progress_bar_callback is not None and trainer.is_global_zero
        description = "DiffIn: end-of-fit drift pass" if self.schedule == "in_run" else f"DiffIn: checkpoint at step {trainer.global_step}"
        for batch in tqdm(loader, desc=description, unit="batch", disable=not shown, leave=True):
            batch = move_data_to_device(batch, device)
            yield batch, self._sample_ids(batch, device)

    def _squared_gradient_norms(self, target: SelfTarget, context: _StepContext) -> Tensor:
        try:
            return context.loss.squared_gradient_norms(context.params, context.batches, self.self_chunk_size)
        except Exception as error:  # vmap refuses some models; say what to do
            raise RuntimeError(
                f"DiffInCallback: target {target.name!r} ('self') needs per-sample gradients through "
                f"torch.func.vmap, which failed on this model: {error}. Models with batch-statistics "
                "layers (BatchNorm in train mode) or in-place ops on inputs cannot be vmapped; drop the "
                "'self' target or use GroupNorm/LayerNorm."
            ) from error

    def _accumulate(
        self, name: str, step: int, ids: Tensor, first: Tensor, second: Tensor, weight: float, propagation: _Propagation | None = None
    ) -> None:
        sums = self._sums[name]
        finite = torch.isfinite(first) & torch.isfinite(second)
        if not bool(finite.all()):
            skipped = int((~finite).sum())
            self.nonfinite_skipped += skipped
            self.nonfinite_samples_skipped[name] = self.nonfinite_samples_skipped.get(name, 0) + skipped
            if (name, "samples") not in self._warned:
                self._warned.add((name, "samples"))
                rank_zero_warn(
                    f"DiffInCallback: {skipped} sample(s) of step {step} have a non-finite contribution to target "
                    f"{name!r}: those samples get nothing from this step, the others are kept (later ones are skipped "
                    "without a warning and counted in the metadata's 'nonfinite_samples_skipped'). A NaN per-sample "
                    "loss or gradient, or an eps too small for the dtype, can cause this."
                )
            ids, first, second = ids[finite], first[finite], second[finite]
        dtype = sums["first_order"].dtype
        sums["first_order"].index_add_(0, ids, first.detach().to(dtype) * weight)
        sums["second_order_sum"].index_add_(0, ids, second.detach().to(dtype) * weight)
        sums["visits"].index_add_(0, ids, torch.ones_like(ids, dtype=dtype))
        if propagation is not None:
            self._propagate(name, ids, first, weight, propagation)

    # ------------------------------------------------------------------ results

    @property
    def influence(self) -> InfluenceResult:
        """The scores so far with the callback's ``second_order`` term (CPU float64)."""
        return self.influence_with(self.second_order)

    def influence_with(self, second_order: SecondOrderTerm) -> InfluenceResult:
        """The scores so far with a named second-order term (``"propagated"``, ``"paper"`` or ``"sum"``)."""
        if second_order not in SECOND_ORDER_TERMS:
            raise ValueError(f"`second_order` must be one of {SECOND_ORDER_TERMS}; got {second_order!r}.")
        if second_order == "propagated" and self.schedule == "checkpoints":
            raise ValueError("second_order='propagated' is recorded by schedule='in_run' only; use 'paper' or 'sum'.")
        if not self._sums:
            raise RuntimeError("DiffInCallback has recorded nothing yet: run Trainer.fit with it first.")
        targets = {}
        for name, sums in self._sums.items():
            first = sums["first_order"].detach().to("cpu", torch.float64)
            if second_order == "propagated":
                second = self._propagated_second_order(name, first)
            else:
                second = normalize_second_order(
                    sums["second_order_sum"].detach().to("cpu", torch.float64), second_order, self.steps_represented
                )
            targets[name] = TargetInfluence(
                name=name,
                kind=self._target(name).kind,
                first_order=first,
                second_order=second,
                diffin=first + second,
                visits=sums["visits"].detach().to("cpu", torch.float64),
            )
        return InfluenceResult(targets=targets, metadata=self._metadata(second_order))

    def _target(self, name: str) -> Target:
        return next(target for target in self.targets if target.name == name)

    def _propagated_second_order(self, name: str, first: Tensor) -> Tensor:
        """decayed first order + target-drift correction - first order (0 for first-order-only targets)."""
        sums = self._sums[name]
        if not self._target(name).has_second_order or not self.compute_second_order:
            return torch.zeros_like(first)
        decayed = sums["decayed_first"].detach().to("cpu", torch.float64)
        drift = self._drift.get(name)
        drift = torch.zeros_like(first) if drift is None else drift.detach().to("cpu", torch.float64)
        return decayed + drift - first

    def _metadata(self, second_order: SecondOrderTerm) -> dict[str, Any]:
        return {
            "library": "diffin_lightning",
            "library_version": __version__,
            "num_samples": self.num_samples,
            "targets": [target.name for target in self.targets],
            "fingerprint": self.fingerprint,
            "second_order": second_order,
            # exactly what the tensor file holds: one second-order term (influence_with(name) gives the others in memory)
            "second_order_terms_available": [second_order],
            "propagated_drift_included": bool(self._drift),
            "finite_difference": self.finite_difference,
            "compute_second_order": self.compute_second_order,
            "eps": "auto" if self.eps is None else self.eps,
            "eps_last_step": self.last_eps,
            "every_n_steps": self.every_n_steps,
            "schedule": self.schedule,
            "num_checkpoints": self.num_checkpoints,
            "checkpoint_steps": self.checkpoint_steps,
            "target_refresh_every_n_steps": self.target_refresh_every_n_steps,
            "steps_recorded": self.steps_recorded,
            "steps_represented": self.steps_represented,
            "skipped_amp_steps": self.skipped_amp_steps,
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_samples_skipped": dict(self.nonfinite_samples_skipped),
            "nonfinite_steps_skipped": dict(self.nonfinite_steps_skipped),
            "model_nonfinite_step": self.model_nonfinite_step,
            "self_target_second_order": "not defined: the 'self' target is first order only, second_order is 0",
        }

    def _write(self, trainer: pl.Trainer, complete: bool, result: InfluenceResult | None = None) -> None:
        if not self._sums or not trainer.is_global_zero:
            return
        self._checkpoint_result = None  # whatever is written now supersedes a held checkpoint's scores
        directory = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir)
        if result is None:
            result = self.influence
            reason = None
            if self.model_nonfinite_step is not None:
                complete, reason = False, f"the model's parameters became non-finite at step {self.model_nonfinite_step}; later steps were not scored"
            elif not complete:
                reason = "training did not finish"
            result.metadata.update(complete=complete, incomplete_reason=reason, global_step=trainer.global_step, epoch=trainer.current_epoch)
        self.output_path = save_influence(result, directory)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded_state is not None:
            # Resumed from a checkpoint taken after the last step: Lightning skips the training loop
            # (no on_train_start, no on_train_end), so the restored scores are adopted and finished here.
            self.on_train_start(trainer, pl_module)
            self.on_train_end(trainer, pl_module)
        self._write(trainer, complete=True)
        if self.output_path is not None:
            rank_zero_info(f"DiffInCallback: influence written to {self.output_path}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A held checkpoint result may belong to a checkpoint that never reached the disk: drop it.
        self._checkpoint_result = None
        if self.save_on_checkpoint:
            # The files on disk pair with the last checkpoint written; scores ahead of it would not.
            return
        # Keep what was recorded: a crashed run still leaves its partial scores (complete=false).
        try:
            self._write(trainer, complete=False)
        except Exception as error:  # never mask the original exception
            rank_zero_warn(f"DiffInCallback: could not write partial influence after a crash: {error}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.save_on_checkpoint or not self._sums or not trainer.is_global_zero:
            return
        # Lightning writes the checkpoint file after this hook returns. Files written now would be
        # ahead of the checkpoint if the process died in between, so the scores of this step are held
        # and written at the next hook, once the checkpoint is on disk (_write_held_checkpoint_result).
        result = self.influence
        result = InfluenceResult(
            targets={
                name: TargetInfluence(target.name, target.kind, *(target.component(c).clone() for c in COMPONENTS))
                for name, target in result.targets.items()
            },
            metadata=result.metadata,
        )
        result.metadata.update(complete=False, global_step=int(checkpoint["global_step"]), epoch=int(checkpoint["epoch"]))
        self._checkpoint_result = result

    def _write_held_checkpoint_result(self, trainer: pl.Trainer) -> None:
        if self._checkpoint_result is not None:
            self._write(trainer, complete=False, result=self._checkpoint_result)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_held_checkpoint_result(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_held_checkpoint_result(trainer)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "fingerprint": self.fingerprint,
            "steps_recorded": self.steps_recorded,
            "steps_represented": self.steps_represented,
            "skipped_amp_steps": self.skipped_amp_steps,
            "nonfinite_skipped": self.nonfinite_skipped,
            "nonfinite_samples_skipped": dict(self.nonfinite_samples_skipped),
            "nonfinite_steps_skipped": dict(self.nonfinite_steps_skipped),
            "model_nonfinite_step": self.model_nonfinite_step,
            "sums": {name: {k: v.detach().cpu() for k, v in sums.items()} for name, sums in self._sums.items()},
            "targets": {target.name: target.state_dict() for target in self.targets},
            "target_sums": {name: {k: v.detach().cpu() for k, v in sums.items()} for name, sums in self._target_sums.items()},
            "every_n_steps": self.every_n_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Adopted in on_train_start, once the device and N are known.
        self._loaded_state = dict(state_dict)

    def _adopt_loaded_state(self, device: torch.device, dtype: torch.dtype) -> None:
        state, self._loaded_state = self._loaded_state or {}, None
        saved_n = state.get("num_samples")
        if saved_n is not None and saved_n != self.num_samples:
            raise ValueError(
                f"DiffInCallback: the checkpoint's influence state is for N={saved_n} samples but this run trains on "
                f"N={self.num_samples}. Resume with the same training set, or start a new run."
            )
        saved_fingerprint = state.get("fingerprint")
        if saved_fingerprint is not None and saved_fingerprint != self.fingerprint:
            raise ValueError(
                f"DiffInCallback: the checkpoint's influence state was recorded on a training set with fingerprint "
                f"{saved_fingerprint}, this run's is {self.fingerprint} (different ids or labels). Resume with the "
                "same data, or start a new run."
            )
        names = {target.name for target in self.targets}
        saved_sums = state.get("sums", {})
        if set(saved_sums) != names:
            raise ValueError(
                f"DiffInCallback: the checkpoint records targets {sorted(saved_sums)} but this callback has "
                f"{sorted(names)}. Resume with the same targets."
            )
        self._sums = {
            name: {key: sums[key].to(device=device, dtype=dtype) if key in sums else torch.zeros(self.num_samples, dtype=dtype, device=device) for key in _SUMS}
            for name, sums in saved_sums.items()
        }
        self.steps_recorded = int(state.get("steps_recorded", 0))
        self.steps_represented = float(state.get("steps_represented", 0))
        self.skipped_amp_steps = int(state.get("skipped_amp_steps", 0))
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.nonfinite_samples_skipped = {str(k): int(v) for k, v in state.get("nonfinite_samples_skipped", {}).items()}
        self.nonfinite_steps_skipped = {str(k): int(v) for k, v in state.get("nonfinite_steps_skipped", {}).items()}
        step = state.get("model_nonfinite_step")
        self.model_nonfinite_step = None if step is None else int(step)
        self._target_sums = {
            name: {k: v.to(device) for k, v in sums.items()} for name, sums in state.get("target_sums", {}).items()
        }
        for target in self.targets:
            target.load_state_dict(state.get("targets", {}).get(target.name, {}), device)


__all__ = ["DiffInCallback", "DatasetTarget", "TrainingLossTarget", "SelfTarget"]
