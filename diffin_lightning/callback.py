"""The Lightning callback that records Diff-In influence during ``Trainer.fit``: Lightning's hooks, handing off.

- options: :class:`~diffin_lightning.settings.DiffInSettings` (help, checks, metadata);
- per step: :class:`~diffin_lightning.recorder.InfluenceRecorder`, which picks where the
  per-sample quantities come from (:mod:`diffin_lightning.engine`), runs the maths
  (:mod:`diffin_lightning.step`) and adds into declared sums (:mod:`diffin_lightning.accumulator`);
- scores and metadata: :mod:`diffin_lightning.results`; files: :mod:`diffin_lightning.store`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffin_lightning import distributed
from diffin_lightning.accumulator import InfluenceAccumulator, nonzero_counts
from diffin_lightning.batch_mixing import batch_mixing_message, batch_mixing_modules
from diffin_lightning.precision import widest_float
from diffin_lightning.data import INDEX_KEY, dataset_fingerprint, find_indexed_dataset, inexact_resume_reason
from diffin_lightning.engine import number_of_batches, replayed_rng, save_rng_state, training_set_batches
from diffin_lightning.recorder import InfluenceRecorder
from diffin_lightning.results import RunRecord, build_result, check_second_order, steps_skipped
from diffin_lightning.settings import DiffInSettings, SecondOrderTerm
from diffin_lightning.store import COMPONENTS, TENSOR_FILE, InfluenceResult, TargetInfluence, save_influence
from diffin_lightning.targets import FALLBACK_BATCH_SIZE, DatasetTarget, SelfTarget, Target, TrainingLossTarget, build_targets


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


def _active_random_layers(module: torch.nn.Module) -> list[str]:
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
    With ``dot_products="auto"`` and a model whose trainable layers are all covered, the
    per-sample quantities at ``theta`` come from the training step itself (hooks on its
    forward and backward, the batch gradient from ``.grad``); the only extra pass is one
    forward+backward at the perturbed point per target.

    Args:
        targets: name -> a ``Dataset`` or ``DataLoader`` (its mean loss), ``"train"`` (the
            training loss, via a running estimate of the full-data gradient) or ``"self"``
            (each sample's own loss, first order only).
        **options: every field of :class:`~diffin_lightning.settings.DiffInSettings`
            (``every_n_steps``, ``target_refresh_every_n_steps``, ``eps``, ``second_order``,
            ``schedule``, ``dot_products``, ``output_dir``, ...), each documented there.

    Example::

        >>> from diffin_lightning import DiffInCallback
        >>> callback = DiffInCallback(targets={"self": "self"}, second_order="paper")
        >>> callback.second_order
        'paper'
    """

    def __init__(self, targets: Mapping[str, Dataset | DataLoader | str], **options: Any) -> None:
        self.settings = DiffInSettings.from_options(options)
        settings = self.settings
        self.targets: list[Target] = build_targets(
            targets,
            batch_size=settings.target_batch_size,
            max_samples=settings.target_max_samples,
            refresh_every_n_steps=settings.target_refresh_every_n_steps,
            train_decay=settings.train_target_decay,
            seed=settings.seed,
            cache_on_device=settings.cache_target_on_device,
            extrapolate=settings.resolved_target_extrapolation,
        )
        if settings.extrapolation_named and not any(isinstance(target, DatasetTarget) for target in self.targets):
            raise ValueError(
                f"`target_extrapolation={settings.target_extrapolation!r}` extrapolates a dataset target's g_V, but `targets` "
                f"holds none (only {sorted(t.kind for t in self.targets)}). Add a dataset target or drop target_extrapolation."
            )
        datasets = [target for target in self.targets if isinstance(target, DatasetTarget)]
        inert = settings.inert_options([target.kind for target in self.targets], bool(datasets) and all(t.loader is not None for t in datasets))
        if inert:
            warnings.warn("DiffInCallback: " + " ".join(inert), UserWarning, stacklevel=2)
        self.index_fn = settings.index_fn or _default_index_fn
        self.output_dir: os.PathLike[str] | None = None if settings.output_dir is None else Path(settings.output_dir)
        self.output_path: Path | None = None
        self.record = RunRecord(num_samples=settings.num_samples)
        self._recorder: InfluenceRecorder | None = None
        self._accumulator: InfluenceAccumulator | None = None
        self._pending: list[tuple[Any, Tensor]] = []
        self._loaded_state: dict[str, Any] | None = None
        # DDP: an error one rank's checks raised, held until every rank can hear of it (at the
        # next optimizer step); and the totals over ranks as of the last write or checkpoint.
        self._rank_error: BaseException | None = None
        self._reduced: tuple[InfluenceAccumulator, dict[str, Tensor]] | None = None
        self._loss_checked = False
        self._ids_checked = False
        self._total_steps = 0
        self._checkpoint_result: InfluenceResult | None = None  # see on_save_checkpoint
        self._stale_gradients_releasable = False  # see _lightning_discards_stale_gradients

    # ------------------------------------------------------------------ read-only views

    @property
    def second_order(self) -> SecondOrderTerm:
        return self.settings.resolved_second_order

    @property
    def num_samples(self) -> int | None:
        return self.record.num_samples

    @property
    def steps_recorded(self) -> int:
        return self.record.steps_recorded

    @property
    def steps_represented(self) -> float:
        return self.record.steps_represented

    @property
    def skipped_amp_steps(self) -> int:
        return self.record.skipped_amp_steps

    @property
    def checkpoint_steps(self) -> list[int]:
        return self.record.checkpoint_steps

    @property
    def nonfinite_skipped(self) -> int:
        return 0 if self._accumulator is None else int(self._accumulator.nonfinite)

    @property
    def nonfinite_samples_skipped(self) -> dict[str, int]:
        if self._accumulator is None:
            return {}
        return nonzero_counts(self._accumulator.nonfinite_samples)

    @property
    def nonfinite_steps_skipped(self) -> dict[str, int]:
        if self._accumulator is None:
            return dict(self.record.nonfinite_steps_skipped)
        return steps_skipped(self.record, self._accumulator)

    @property
    def model_nonfinite_step(self) -> int | None:
        return self.record.model_nonfinite_step

    @property
    def _sums(self) -> dict[str, dict[str, Tensor]]:
        return {} if self._accumulator is None else self._accumulator.sums

    @property
    def state_key(self) -> str:
        # Everything that changes the recorded numbers, so that several callbacks (say, two
        # schedules side by side) can share a Trainer and each resume its own state.
        s = self.settings
        return self._generate_state_key(
            targets=sorted(t.name for t in self.targets),
            schedule=s.schedule,
            num_checkpoints=s.num_checkpoints,
            every_n_steps=s.every_n_steps,
            finite_difference=s.finite_difference,
            compute_second_order=s.compute_second_order,
            eps=s.eps,
            target_refresh_every_n_steps=s.target_refresh_every_n_steps,
            target_max_samples=s.target_max_samples,
            seed=s.seed,
            **_extrapolation_key(s),
            # The 'train' target's decay changes its numbers; named only away from its default, so that the key a
            # run's checkpoints were saved under before it was part of the key stays the same.
            **({"train_target_decay": s.train_target_decay} if s.train_target_decay != DiffInSettings.defaults()["train_target_decay"] else {}),
        )

    # ------------------------------------------------------------------ setup

    @staticmethod
    def check_strategy(trainer: pl.Trainer) -> None:
        """Raise unless ``trainer`` trains on one device or with DDP (callable before ``fit``, which launches processes)."""
        problem = distributed.unsupported_strategy_message(trainer.strategy, trainer.world_size)
        if problem is not None:
            raise RuntimeError(problem)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_strategy(trainer)
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "DiffInCallback needs automatic optimization (one optimizer step per batch that Lightning "
                "drives); this module sets automatic_optimization=False."
            )
        if self.settings.loss_fn is None and not callable(getattr(pl_module, "per_sample_loss", None)):
            raise AttributeError(
                f"DiffInCallback: {type(pl_module).__name__} has no method `per_sample_loss(batch) -> Tensor[B]` "
                "and no `loss_fn` was given. Add the method (return the unreduced loss of each sample) or pass "
                "loss_fn=lambda module, batch: <Tensor[B]>."
            )
        found = batch_mixing_modules(pl_module)
        if found and not self.settings.allow_batch_mixing:
            raise RuntimeError(batch_mixing_message(found))
        if found:
            rank_zero_warn(batch_mixing_message(found).split(" Replace them")[0] + " Accepted (allow_batch_mixing=True).")
        for target in self.targets:
            target.check_not_empty()
        self._recorder = InfluenceRecorder(self.settings, self.targets, pl_module, self.settings.loss_fn or _default_loss_fn, self.record)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset = self._train_dataset(trainer)
        configured = self.settings.num_samples
        # One rule for N: ids lie in [0, N). With an IndexedDataset (also under Subset wrappers) the ids
        # are its positions, so N is its length; otherwise N is the dataset's length or num_samples.
        # With an index_fn of one's own the ids are one's own too: then N is num_samples or the length.
        indexed = find_indexed_dataset(dataset) if self.index_fn is _default_index_fn else None
        id_space = len(indexed) if indexed is not None else (len(dataset) if dataset is not None else None)
        num_samples = configured if configured is not None else id_space
        if num_samples is None:
            raise ValueError(
                "DiffInCallback could not tell the number of training samples N: the train dataloader's "
                "dataset has no length. Pass num_samples=N (ids lie in [0, N))."
            )
        if indexed is not None and configured is not None and configured != len(indexed):
            raise ValueError(
                f"`num_samples` is {configured} but the training ids come from an IndexedDataset of "
                f"{len(indexed)} samples (ids are its positions, also under a Subset). Leave num_samples=None "
                f"or pass num_samples={len(indexed)}."
            )
        if indexed is None and dataset is not None and num_samples < len(dataset):
            raise ValueError(
                f"`num_samples` (N: ids lie in [0, N)) is {num_samples} but the train dataloader's dataset holds "
                f"{len(dataset)} samples, each needing its own id. Pass num_samples >= {len(dataset)} (the largest "
                "id + 1), or leave it None."
            )
        self.record.num_samples = num_samples
        # The fingerprint covers the id space: the IndexedDataset the ids index (also under a Subset).
        self.record.fingerprint = dataset_fingerprint(indexed if indexed is not None else (dataset if dataset is not None else num_samples))
        self._check_optimizer(trainer)
        self._stale_gradients_releasable = self.settings.release_stale_gradients and self._lightning_discards_stale_gradients(trainer, pl_module)
        if self.settings.schedule == "checkpoints":
            self.record.checkpoint_steps = self._plan_checkpoints(trainer)
        device = pl_module.device
        dtype = widest_float(device)
        if self._accumulator is None or self._loaded_state is not None:
            self._accumulator = InfluenceAccumulator([t.name for t in self.targets], num_samples, device, dtype)
        if self._loaded_state is not None:
            self._adopt_loaded_state(device)
            self._warn_if_resume_is_inexact(trainer)
        assert self._recorder is not None
        self._recorder.accumulator = self._accumulator
        # The micro-batch size sets the default batch of every extra pass (peak memory as in training).
        self._recorder.adopt_micro_batch_size(getattr(trainer.train_dataloader, "batch_size", None))

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
        random_layers = _active_random_layers(trainer.lightning_module)
        if random_layers:
            # A Lightning checkpoint does not hold the global random state, so the resumed run's dropout
            # masks are not the ones the uninterrupted run would have drawn: training and scores diverge.
            rank_zero_warn(
                f"DiffInCallback: resumed at step {trainer.global_step} a model that draws random numbers in training "
                f"({', '.join(random_layers[:3])}{', ...' if len(random_layers) > 3 else ''}); a checkpoint does not "
                "restore the global random state, so the resumed run draws other dropout masks and its model and "
                "scores will differ from an uninterrupted run. For an exact resume set the dropout probabilities to 0; "
                "otherwise expect agreement only in distribution."
            )

    def _plan_checkpoints(self, trainer: pl.Trainer) -> list[int]:
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                "schedule='checkpoints' needs the run's total number of optimizer steps T to space the checkpoints; "
                f"Lightning estimates {total}. Set max_epochs or max_steps."
            )
        self._total_steps = int(total)
        m = self.settings.num_checkpoints
        assert m is not None
        steps = sorted({int((k + 0.5) * self._total_steps / m) for k in range(m)})
        if len(steps) < m:
            # Each checkpoint then stands for T / len(steps) = one step (the weights use the distinct count).
            warnings.warn(
                f"DiffInCallback: `num_checkpoints={m}` exceeds the run's {self._total_steps} optimizer step(s); every step is "
                f"a checkpoint ({len(steps)} in all, recorded in the metadata's checkpoint_steps). Set num_checkpoints <= "
                f"{self._total_steps}, or use schedule='in_run', which records every step.",
                UserWarning,
                stacklevel=2,
            )
        return steps

    @staticmethod
    def _train_dataset(trainer: pl.Trainer) -> Any:
        dataset = getattr(trainer.train_dataloader, "dataset", None)
        return dataset if dataset is not None and hasattr(dataset, "__len__") else None

    def _check_optimizer(self, trainer: pl.Trainer) -> None:
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"DiffInCallback needs exactly one optimizer; the module configures {len(trainer.optimizers)}.")
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
            rank_zero_warn("DiffInCallback's maths assumes plain SGD; the scores are an approximation here: " + "; ".join(approximations) + ".")

    @staticmethod
    def _lightning_discards_stale_gradients(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
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

    # ------------------------------------------------------------------ per batch / per step

    def _records(self, step: int) -> bool:
        if self.settings.schedule == "checkpoints":
            return step in self.record.checkpoint_steps
        return step % self.settings.every_n_steps == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._write_held_checkpoint_result(trainer)
        try:
            ids = self._sample_ids(batch, pl_module.device)
            if not self._loss_checked:
                self._check_per_sample_loss(pl_module, batch, len(ids))
        except Exception as error:
            if distributed.world_size() == 1:
                raise
            # Under DDP the other ranks would wait for this one in the next collective: keep the
            # error until the step's agreement point, where every rank raises it together.
            self._rank_error = self._rank_error or error
            return
        if self._records(trainer.global_step):
            self._pending.append((batch, ids))
            assert self._recorder is not None
            mixed = isinstance(trainer.precision_plugin, MixedPrecision)
            self._recorder.begin_micro_batch(
                batch,
                int(ids.numel()),
                save_rng_state(pl_module.device),
                trainer.global_step,
                trainer.accumulate_grad_batches,
                mixed,
                forward_context=trainer.precision_plugin.forward_context,
                release_stale_gradients=self._stale_gradients_releasable,
            )

    def _sample_ids(self, batch: Any, device: torch.device) -> Tensor:
        ids = torch.as_tensor(self.index_fn(batch), device=device)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"DiffInCallback: sample ids must be a 1-d integer tensor [B]; `index_fn` gave dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}."
            )
        ids = ids.long()
        n = self.record.num_samples
        assert n is not None
        # Reading ids back costs a host synchronisation on an accelerator: check every batch on the
        # CPU, and on the first batch elsewhere (out-of-range ids then fail in index_add_ itself).
        if ids.numel() and (ids.device.type == "cpu" or not self._ids_checked):
            self._ids_checked = True
            if int(ids.min()) < 0 or int(ids.max()) >= n:
                raise ValueError(
                    f"DiffInCallback: sample ids must lie in [0, N) with N={n}; the batch holds ids from "
                    f"{int(ids.min())} to {int(ids.max())}. Wrap the training dataset in IndexedDataset (a Subset "
                    "goes around it: ids stay the wrapped dataset's), or, with ids of your own, pass num_samples = the "
                    f"largest id in the whole training set + 1 (at least {int(ids.max()) + 1})."
                )
        return ids

    def _check_per_sample_loss(self, pl_module: pl.LightningModule, batch: Any, batch_size: int) -> None:
        assert self._recorder is not None
        params = self._recorder.unseeded_loss.parameters()
        # On copies of the buffers (batch norm must not see this forward) and a forked RNG.
        with torch.no_grad(), replayed_rng(None, pl_module.device):
            losses = self._recorder.unseeded_loss.values(params, batch)
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
        recorder = self._recorder
        assert recorder is not None
        step = trainer.global_step
        if not self._records(step):
            # No collective on a step that records nothing (the same steps on every rank): under DDP a rank's
            # error kept by on_train_batch_start waits for the next recorded step's agreement, or the end's.
            recorder.abandon_step()
            return
        error, self._rank_error = self._rank_error, None
        if error is None and pending:
            ids = torch.cat([sample_ids for _, sample_ids in pending])
            if ids.device.type == "cpu" and ids.unique().numel() != ids.numel():
                error = ValueError(
                    f"DiffInCallback: sample ids must not repeat within an optimizer step; step {step} holds "
                    f"{ids.numel() - ids.unique().numel()} repeated ids. Sample without replacement (a plain "
                    "shuffling DataLoader does) so each sample appears at most once per step."
                )
        if error is not None:
            recorder.abandon_step()
        step_gradients = None
        if error is None and pending and self.settings.schedule == "in_run":
            step_gradients = self._training_step_gradients(trainer, pl_module, pending)
        # Every rank reaches this point once per recorded step: the checks' verdicts are shared here, before
        # any collective maths, so a failure on one rank stops all of them with its message; whether every
        # rank has its training step's gradients (the paths that use them issue their own collectives) rides
        # on the same collective: one host wait a recorded step under DDP.
        (every_rank_has_gradients,) = distributed.raise_if_any_rank_failed(error, [step_gradients is not None and step_gradients[0] is not None])
        if not pending:
            recorder.abandon_step()
            return
        if self._scaler_will_skip(trainer, optimizer):
            # AMP's scaler skips optimizer.step on non-finite gradients: no update, no influence.
            recorder.abandon_step()
            self.record.skipped_amp_steps += 1
            return
        self._reduced = None  # new contributions: the totals over ranks are stale
        batches = [batch for batch, _ in pending]
        recorder.adopt_micro_batch_size(max(1, int(ids.numel()) // len(batches)))  # where the loader did not say
        eta = float(optimizer.param_groups[0]["lr"])
        # Training must draw the same random numbers with or without the callback (data order,
        # dropout): every extra pass runs on a forked RNG.
        with replayed_rng(None, pl_module.device):
            if self.settings.schedule == "checkpoints":
                recorder.abandon_step()
                weight = self._total_steps / len(self.record.checkpoint_steps)  # the steps this checkpoint stands for
                recorder.record_checkpoint(step, eta, batches, ids, weight, lambda: self._training_set(trainer, pl_module.device))
            else:
                assert step_gradients is not None
                recorder.record_step(step, eta, batches, ids, *step_gradients, every_rank_has_gradients=every_rank_has_gradients)

    def _training_step_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pending: list[tuple[Any, Tensor]]) -> tuple[Any, ...]:
        """``(gradients, gradient_to_mean, backprop_scale, forward_context, mixed)`` for the recorder.

        Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` (k), so a
        captured output gradient is sample i's own times ``1/(k |b|)`` (times AMP's loss
        scale), and ``.grad`` is ``(1/(k |b|)) sum_i G_i``. Micro-batches of unequal sizes make
        ``.grad`` a weighted mean; such a step is recomputed (``gradients`` is ``None``).
        """
        sizes = {int(ids.numel()) for _, ids in pending}
        precision = trainer.precision_plugin
        mixed = isinstance(precision, MixedPrecision)
        if mixed:
            # The layer rules take their products in the captured tensors' dtype, and autocast leaves
            # half-precision activations: under AMP the products come from one full-precision pass.
            return None, 1.0, 1.0, contextlib.nullcontext, mixed
        if len(sizes) != 1:
            return None, 1.0, 1.0, precision.forward_context, mixed
        size = sizes.pop()
        k = trainer.accumulate_grad_batches
        total = size * len(pending)
        gradients = {
            # (.grad needs a detach only where the backward built a graph of it: create_graph=True)
            name: (torch.zeros_like(p) if p.grad is None else p.grad.detach() if p.grad.requires_grad else p.grad)
            for name, p in pl_module.named_parameters()
            if p.requires_grad
        }
        scale: Tensor | float = float(k * size)
        scaler = getattr(precision, "scaler", None)
        if scaler is not None:
            loss_scale = getattr(scaler, "_scale", None)  # a device tensor: no host synchronisation
            scale = scale / (loss_scale if isinstance(loss_scale, Tensor) else scaler.get_scale())
        return gradients, k * size / total, scale, precision.forward_context, mixed

    @staticmethod
    def _scaler_will_skip(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            return False
        # The gradients are unscaled by now; the scaler skips the step exactly when one is non-finite.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _training_set(self, trainer: pl.Trainer, device: torch.device, progress: str | None = None) -> Iterator[tuple[Any, Tensor]]:
        """The whole training set in id order, one batch on the device at a time (never all of it)."""
        dataset = self._train_dataset(trainer)
        if dataset is None:
            raise ValueError(
                "DiffInCallback scores every training sample (schedule='checkpoints', or the end-of-fit pass of "
                "second_order='propagated') and needs a train dataloader whose dataset has a length."
            )
        size = self.settings.training_set_batch_size
        if size is None:
            size = (self._recorder.micro_batch_size if self._recorder is not None else None) or FALLBACK_BATCH_SIZE
        # The training loader's collate_fn: the pass's batches go to the same per_sample_loss as the training step's.
        batches = training_set_batches(dataset, size, device, getattr(trainer.train_dataloader, "collate_fn", None))
        if progress is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=number_of_batches(dataset, size), desc=progress, unit="batch", leave=True, dynamic_ncols=True)
        for batch in batches:
            yield batch, self._sample_ids(batch, device)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A rank's error from a step that recorded nothing, before the end's collectives (under DDP).
        error, self._rank_error = self._rank_error, None
        distributed.raise_if_any_rank_failed(error)
        self._write_held_checkpoint_result(trainer)
        s = self.settings
        if self._accumulator is not None and self._recorder is not None:
            self._recorder.check_model_finite(trainer.global_step)
        if self.record.model_nonfinite_step is not None:
            return  # no drift correction from a non-finite model: the files say complete: false
        if s.schedule == "in_run" and s.compute_second_order and self._accumulator is not None and self._accumulator.parameter_states:
            assert self._recorder is not None
            device = pl_module.device
            if self._stale_gradients_releasable:
                # The last step's .grad, spent by its update, would sit beside the end-of-fit pass (its peak).
                for parameter in pl_module.parameters():
                    parameter.grad = None
            with replayed_rng(None, device):
                self._recorder.compute_drift(
                    trainer.global_step, device, self._training_set(trainer, device, progress="DiffIn: end-of-fit drift pass")
                )
        factor_steps = {} if self._accumulator is None else nonzero_counts(self._accumulator.nonfinite_factor_steps)
        for name, count in factor_steps.items():
            rank_zero_warn(
                f"DiffInCallback: the curvature along g_V (the propagation factor) was non-finite at {count} recorded step(s) "
                f"for target {name!r}: those steps were skipped for it (nothing of them reaches its scores; counted in the "
                "metadata's 'nonfinite_steps_skipped'). A diverging loss or an eps too small for the dtype can cause this."
            )
        gated_steps = {} if self._accumulator is None else nonzero_counts(self._accumulator.nonfinite_gated_steps)
        for name, count in gated_steps.items():
            rank_zero_warn(
                f"DiffInCallback: {count} recorded step(s) were skipped for target {name!r} because the model's parameters, "
                "the batch gradient G_B, the step's per-sample losses or the target gradient g_V (from its last refresh "
                "to the next) were non-finite (found on the device, without "
                "stopping the step; nothing of them reaches its scores; counted in the metadata's 'nonfinite_steps_skipped'). "
                "A diverging loss or a NaN per-sample loss can cause this."
            )
        for name, count in self.nonfinite_samples_skipped.items():
            rank_zero_warn(
                f"DiffInCallback: {count} (sample, step) non-finite contribution(s) to target {name!r} were skipped: "
                "those samples got nothing from those steps, the others were kept (counted in the metadata's "
                "'nonfinite_samples_skipped'). A NaN per-sample loss or gradient, or an eps too small for the dtype, can cause this."
            )

    # ------------------------------------------------------------------ results

    @property
    def influence(self) -> InfluenceResult:
        """The scores so far with the callback's ``second_order`` term (CPU float64)."""
        return self.influence_with(self.second_order)

    def influence_with(self, second_order: SecondOrderTerm) -> InfluenceResult:
        """The scores so far with a named second-order term (``"propagated"``, ``"paper"`` or ``"sum"``)."""
        check_second_order(second_order, self.settings)
        if self._accumulator is None:
            raise RuntimeError("DiffInCallback has recorded nothing yet: run Trainer.fit with it first.")
        accumulator, drift = self._totals()
        kinds = {t.name: t.kind for t in self.targets}
        has_second = {t.name: t.has_second_order for t in self.targets}
        return build_result(accumulator, drift, kinds, has_second, self.settings, self.record, second_order)

    def _totals(self) -> tuple[InfluenceAccumulator, dict[str, Tensor]]:
        """The accumulator and drift over all ranks: this rank's own in one process, else the last write's sum."""
        assert self._accumulator is not None
        if distributed.world_size() == 1:
            return self._accumulator, {} if self._recorder is None else self._recorder.drift
        if self._reduced is None:
            raise RuntimeError(
                "DiffInCallback: under DDP each rank holds only its own samples' contributions until they are summed "
                "over ranks, which every rank does together when the files are written (at the end of fit and, with "
                "save_on_checkpoint=True, at each checkpoint). Read `callback.influence` after Trainer.fit returns, "
                "or load the files with load_influence."
            )
        return self._reduced

    def _reduce_over_ranks(self) -> tuple[InfluenceAccumulator, dict[str, Tensor]]:
        """Sum the ranks' states (a collective: every rank calls it at the same point) and keep the result."""
        assert self._accumulator is not None
        drift = {} if self._recorder is None else self._recorder.drift
        self._reduced = (self._accumulator.reduced(), distributed.sum_over_ranks(drift) if drift else {})
        return self._reduced

    def _write(self, trainer: pl.Trainer, complete: bool, result: InfluenceResult | None = None) -> None:
        """Write the files from global rank zero.

        Without ``result``, under DDP every rank must call it, to sum the ranks' states; a held
        ``result`` (already summed, at its checkpoint) is written by rank zero alone.
        """
        if self._accumulator is None:
            return
        if result is None and distributed.world_size() > 1:
            self._reduce_over_ranks()
        directory = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            self.output_path = directory / TENSOR_FILE  # where rank zero writes them
            return
        self._checkpoint_result = None  # whatever is written now supersedes a held checkpoint's scores
        if result is None:
            result = self.influence
            reason = None
            if self.record.model_nonfinite_step is not None:
                complete = False
                reason = f"the model's parameters became non-finite at step {self.record.model_nonfinite_step}; later steps were not scored"
            elif not complete:
                reason = "training did not finish"
            result.metadata.update(complete=complete, incomplete_reason=reason, global_step=trainer.global_step, epoch=trainer.current_epoch)
        self.output_path = save_influence(result, directory)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._recorder is not None:
            self._recorder.teardown()  # the model leaves the fit without the callback's hooks

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
        if self._recorder is not None:
            self._recorder.abandon_step()
        # A held checkpoint result may belong to a checkpoint that never reached the disk: drop it.
        self._checkpoint_result = None
        if self.settings.save_on_checkpoint:
            # The files on disk pair with the last checkpoint written; scores ahead of it would not.
            return
        # Keep what was recorded: a crashed run still leaves its partial scores (complete=false).
        if distributed.world_size() > 1:
            # Summing the ranks' states is a collective, and the other ranks may be anywhere (or
            # gone): the files of the last write are what a crashed DDP run leaves.
            rank_zero_warn(
                "DiffInCallback: the run failed under DDP; partial influence is not written after a crash (the ranks' "
                "contributions cannot be summed safely). With save_on_checkpoint=True the files of the last "
                "checkpoint remain."
            )
            return
        try:
            self._write(trainer, complete=False)
        except Exception as error:  # never mask the original exception
            rank_zero_warn(f"DiffInCallback: could not write partial influence after a crash: {error}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not self.settings.save_on_checkpoint or self._accumulator is None:
            return
        if distributed.world_size() > 1:
            self._reduce_over_ranks()  # every rank builds the checkpoint: the held scores are the totals over ranks
        if not trainer.is_global_zero:
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
        state: dict[str, Any] = {**self.record.state_dict(), "every_n_steps": self.settings.every_n_steps}
        state["targets"] = {target.name: target.state_dict() for target in self.targets}
        if self._accumulator is not None:
            # Under DDP Lightning builds the checkpoint on every rank and rank zero saves it: the
            # per-sample states are summed over ranks here so that it holds every sample's.
            accumulator = self._reduce_over_ranks()[0] if distributed.world_size() > 1 else self._accumulator
            state.update(accumulator.state_dict())
        else:
            state.update(sums={}, target_sums={}, nonfinite_skipped=0, nonfinite_samples_skipped={})
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Adopted in on_train_start, once the device and N are known.
        self._loaded_state = dict(state_dict)

    def _adopt_loaded_state(self, device: torch.device) -> None:
        state, self._loaded_state = self._loaded_state or {}, None
        saved_n = state.get("num_samples")
        if saved_n is not None and saved_n != self.record.num_samples:
            raise ValueError(
                f"DiffInCallback: the checkpoint's influence state is for N={saved_n} samples but this run trains on "
                f"N={self.record.num_samples}. Resume with the same training set, or start a new run."
            )
        saved_fingerprint = state.get("fingerprint")
        if saved_fingerprint is not None and saved_fingerprint != self.record.fingerprint:
            raise ValueError(
                f"DiffInCallback: the checkpoint's influence state was recorded on a training set with fingerprint "
                f"{saved_fingerprint}, this run's is {self.record.fingerprint} (different ids or labels). Resume with the "
                "same data, or start a new run."
            )
        names = {target.name for target in self.targets}
        saved_sums = state.get("sums", {})
        if set(saved_sums) != names:
            raise ValueError(
                f"DiffInCallback: the checkpoint records targets {sorted(saved_sums)} but this callback has "
                f"{sorted(names)}. Resume with the same targets."
            )
        assert self._accumulator is not None
        self._accumulator.load_state_dict(state, keep_totals=distributed.rank() == 0)
        self.record.load_state_dict(state)
        for target in self.targets:
            target.load_state_dict(state.get("targets", {}).get(target.name, {}), device)

    def __getattr__(self, name: str) -> Any:
        # Options read as attributes (callback.every_n_steps), as before the settings dataclass.
        if name != "settings" and "settings" in self.__dict__ and hasattr(self.__dict__["settings"], name):
            return getattr(self.__dict__["settings"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


__all__ = ["DiffInCallback", "DatasetTarget", "TrainingLossTarget", "SelfTarget"]
