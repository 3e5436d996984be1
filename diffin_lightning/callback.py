"""The Lightning callback that records Diff-In influence during ``Trainer.fit``: Lightning's hooks, handing off.

- options: :class:`~diffin_lightning.settings.DiffInSettings` (help, checks, metadata);
- checks of what the user hands it: :mod:`diffin_lightning.validation` (targets, module,
  per-sample loss, optimizer) and :mod:`diffin_lightning.sample_ids` (N, the ids' reading and checks);
- what it reads of the Trainer: :mod:`diffin_lightning.lightning_state`; which steps it
  records: :mod:`diffin_lightning.schedule`; resuming: :mod:`diffin_lightning.resume`;
- per step: :class:`~diffin_lightning.recorder.InfluenceRecorder`, which picks where the
  per-sample quantities come from (:mod:`diffin_lightning.engine`), runs the maths
  (:mod:`diffin_lightning.step`) and adds into declared sums (:mod:`diffin_lightning.accumulator`);
- scores and metadata: :mod:`diffin_lightning.results`; files: :mod:`diffin_lightning.store`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffin_lightning import distributed, lightning_state, resume
from diffin_lightning.accumulator import InfluenceAccumulator, nonzero_counts
from diffin_lightning.data import dataset_fingerprint
from diffin_lightning.engine import replayed_rng, save_rng_state
from diffin_lightning.precision import widest_float
from diffin_lightning.recorder import InfluenceRecorder
from diffin_lightning.results import RunRecord, build_result, check_second_order, checkpoint_copy, mark_completion, nonfinite_skip_messages, steps_skipped
from diffin_lightning.sample_ids import SampleIdChecks, default_index_fn, id_space, repeated_ids_error
from diffin_lightning.schedule import plan_checkpoints, records_step
from diffin_lightning.settings import DiffInSettings, SecondOrderTerm
from diffin_lightning.store import TENSOR_FILE, InfluenceResult, save_influence
from diffin_lightning.targets import FALLBACK_BATCH_SIZE, DatasetTarget, SelfTarget, Target, TrainingLossTarget, build_targets
from diffin_lightning.validation import check_module, check_optimizer, check_per_sample_loss, check_targets, default_loss_fn


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
        check_targets(settings, self.targets)
        self.index_fn = settings.index_fn or default_index_fn
        self._id_checks = SampleIdChecks()
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
        self._total_steps = 0
        self._checkpoint_result: InfluenceResult | None = None  # see on_save_checkpoint
        self._stale_gradients_releasable = False  # see lightning_state.discards_stale_gradients
        self._state_key_cache: tuple[DiffInSettings, tuple[str, ...], str] | None = None  # see state_key

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
        # Everything that changes the recorded numbers (DiffInSettings.state_key_fields), so that several
        # callbacks (say, two schedules side by side) can share a Trainer and each resume its own state.
        # Lightning reads it at every hook call (its profiler's action names): formed once per settings
        # object (frozen) and target names, not six times a step (35 us each on the bundled CNN's 4 ms step).
        names = tuple(sorted(t.name for t in self.targets))
        cached = self._state_key_cache
        if cached is None or cached[0] is not self.settings or cached[1] != names:
            cached = self._state_key_cache = (self.settings, names, self._generate_state_key(targets=list(names), **self.settings.state_key_fields()))
        return cached[2]

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
        check_module(pl_module, self.settings.loss_fn is not None, self.settings.allow_batch_mixing)
        for target in self.targets:
            target.check_not_empty()
        self._recorder = InfluenceRecorder(self.settings, self.targets, pl_module, self.settings.loss_fn or default_loss_fn, self.record)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        num_samples, fingerprinted = id_space(lightning_state.train_dataset(trainer), self.settings.num_samples, self.index_fn is default_index_fn)
        self.record.num_samples = num_samples
        self.record.fingerprint = dataset_fingerprint(fingerprinted)
        clipping = lightning_state.clip_algorithm(trainer)
        check_optimizer(trainer.optimizers, clipping, lightning_state.clips_its_own_way(pl_module))
        if self._recorder is not None:
            self._recorder.norm_clipping = clipping == "norm"
            if lightning_state.is_mixed_precision(trainer.precision_plugin):
                self._recorder.adopt_mixed_precision(lightning_state.reusable_under_autocast(trainer.precision_plugin))
        self._stale_gradients_releasable = self.settings.release_stale_gradients and lightning_state.discards_stale_gradients(trainer, pl_module)
        if self.settings.schedule == "checkpoints":
            self._total_steps, self.record.checkpoint_steps = plan_checkpoints(trainer.estimated_stepping_batches, self.settings.num_checkpoints)
        device = pl_module.device
        dtype = widest_float(device)
        if self._accumulator is None or self._loaded_state is not None:
            self._accumulator = InfluenceAccumulator([t.name for t in self.targets], num_samples, device, dtype)
        if self._loaded_state is not None:
            state, self._loaded_state = self._loaded_state, None
            resume.adopt_loaded_state(state, self.record, self._accumulator, self.targets, device)
            resume.warn_if_inexact(trainer.global_step, lightning_state.resumed_mid_epoch(trainer), trainer.train_dataloader, trainer.lightning_module)
        assert self._recorder is not None
        self._recorder.accumulator = self._accumulator
        # The micro-batch size sets the default batch of every extra pass (peak memory as in training).
        self._recorder.adopt_micro_batch_size(getattr(trainer.train_dataloader, "batch_size", None))

    # ------------------------------------------------------------------ per batch / per step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._write_held_checkpoint_result(trainer)
        try:
            ids = self._sample_ids(batch, pl_module.device)
            if not self._loss_checked:
                assert self._recorder is not None
                check_per_sample_loss(self._recorder.unseeded_loss, batch, len(ids), pl_module.device)
                self._loss_checked = True
        except Exception as error:
            if distributed.world_size() == 1:
                raise
            # Under DDP the other ranks would wait for this one in the next collective: keep the
            # error until the step's agreement point, where every rank raises it together.
            self._rank_error = self._rank_error or error
            return
        if records_step(self.settings, self.record.checkpoint_steps, trainer.global_step):
            self._pending.append((batch, ids))
            assert self._recorder is not None
            self._recorder.begin_micro_batch(
                batch,
                int(ids.numel()),
                save_rng_state(pl_module.device),
                trainer.global_step,
                trainer.accumulate_grad_batches,
                lightning_state.is_mixed_precision(trainer.precision_plugin),
                forward_context=trainer.precision_plugin.forward_context,
                release_stale_gradients=self._stale_gradients_releasable,
            )

    def _sample_ids(self, batch: Any, device: torch.device) -> Tensor:
        return self._id_checks.checked(self.index_fn(batch), device, self.record.num_samples)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        pending, self._pending = self._pending, []
        recorder = self._recorder
        assert recorder is not None
        step = trainer.global_step
        if not records_step(self.settings, self.record.checkpoint_steps, step):
            # No collective on a step that records nothing (the same steps on every rank): under DDP a rank's
            # error kept by on_train_batch_start waits for the next recorded step's agreement, or the end's.
            recorder.abandon_step()
            return
        error, self._rank_error = self._rank_error, None
        if error is None and pending:
            ids = torch.cat([sample_ids for _, sample_ids in pending])
            error = repeated_ids_error(ids, step)
        if error is not None:
            recorder.abandon_step()
        step_gradients = None
        if error is None and pending and self.settings.schedule == "in_run":
            sizes = [int(sample_ids.numel()) for _, sample_ids in pending]
            step_gradients = lightning_state.training_step_gradients(
                trainer.precision_plugin, trainer.accumulate_grad_batches, pl_module, sizes, reuse_autocast=recorder.reuses_autocast_step
            )
        # Every rank reaches this point once per recorded step: the checks' verdicts are shared here, before
        # any collective maths, so a failure on one rank stops all of them with its message; whether every
        # rank has its training step's gradients (the paths that use them issue their own collectives) rides
        # on the same collective: one host wait a recorded step under DDP.
        (every_rank_has_gradients,) = distributed.raise_if_any_rank_failed(error, [step_gradients is not None and step_gradients[0] is not None])
        if not pending:
            recorder.abandon_step()
            return
        if lightning_state.scaler_will_skip(trainer.precision_plugin, optimizer):
            # AMP's scaler skips optimizer.step on non-finite gradients: no update, no influence.
            recorder.abandon_step()
            self.record.skipped_amp_steps += 1
            return
        self._reduced = None  # new contributions: the totals over ranks are stale
        batches = [batch for batch, _ in pending]
        recorder.adopt_micro_batch_size(max(1, int(ids.numel()) // len(batches)))  # where the loader did not say
        # A norm-clipped step moves by eta * c * G_B: it counts at eta * c, its first-order terms along the clip's Jacobian.
        clip_factor = lightning_state.norm_clip_factor(trainer, optimizer)
        eta = float(optimizer.param_groups[0]["lr"]) * clip_factor
        clipped = clip_factor < 1.0
        self.record.clipped_steps += int(clipped)
        # Training must draw the same random numbers with or without the callback (data order,
        # dropout): every extra pass runs on a forked RNG.
        with replayed_rng(None, pl_module.device):
            if self.settings.schedule == "checkpoints":
                recorder.abandon_step()
                weight = self._total_steps / len(self.record.checkpoint_steps)  # the steps this checkpoint stands for
                recorder.record_checkpoint(step, eta, batches, ids, weight, lambda: self._training_set(trainer, pl_module.device), clipped=clipped)
            else:
                assert step_gradients is not None
                recorder.record_step(step, eta, batches, ids, *step_gradients, every_rank_has_gradients=every_rank_has_gradients, clipped=clipped)

    def _training_set(self, trainer: pl.Trainer, device: torch.device, progress: str | None = None) -> Iterator[tuple[Any, Tensor]]:
        """The whole training set in id order (lightning_state.training_set); a generator, so that nothing is read before the pass starts."""
        size = self.settings.training_set_batch_size
        if size is None:
            size = (self._recorder.micro_batch_size if self._recorder is not None else None) or FALLBACK_BATCH_SIZE
        yield from lightning_state.training_set(trainer, device, size, lambda batch: self._sample_ids(batch, device), progress)

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
        for message in nonfinite_skip_messages(self._accumulator):
            rank_zero_warn(message)

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
            result = mark_completion(self.influence, self.record, complete, trainer.global_step, trainer.current_epoch)
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
        self._checkpoint_result = checkpoint_copy(self.influence, int(checkpoint["global_step"]), int(checkpoint["epoch"]))

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

    def __getattr__(self, name: str) -> Any:
        # Options read as attributes (callback.every_n_steps), as before the settings dataclass.
        if name != "settings" and "settings" in self.__dict__ and hasattr(self.__dict__["settings"], name):
            return getattr(self.__dict__["settings"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


__all__ = ["DiffInCallback", "DatasetTarget", "TrainingLossTarget", "SelfTarget"]
