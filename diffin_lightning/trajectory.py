"""The trajectory log: what replaying a training run needs, recorded in-run, nothing per sample.

:class:`TrajectoryLog` is a Lightning callback. Per optimizer step it keeps the sample ids of
the step's micro-batches, the learning rate of every parameter group (read when the step
runs, so after schedulers), the gradient-clipping factor and whether AMP's scaler skipped the
step (and, when the model draws random numbers, the RNG state each micro-batch started from,
so that a replay draws the same dropout masks). Every ``checkpoint_every_n_steps`` steps it
writes the parameters, buffers, optimizer state and RNG state; at the end of fit the final
parameters. :func:`diffin_lightning.replay.trajectory_influence` reads it after training.

Files (all written atomically: temporary file, fsync, rename, by one background thread in order, so
the fsyncs do not stall training; drained before Lightning saves a checkpoint and at the end of fit;
none executes code on load)::

    trajectory.json                   the index: run id, training-set fingerprint, parameter names,
                                      optimizer and its hyper-parameters, checkpoints, segments
    checkpoint-<step>.safetensors     parameters, buffers, optimizer state, RNG state at the start of <step>
    steps-<first step>.safetensors    the per-step records of one segment (ids, lr, clip, AMP skips)
    final.safetensors                 the parameters and buffers at the end of fit

Resuming: the records not yet written sit in the callback's state (so in Lightning checkpoints);
a fit resumed from a checkpoint drops whatever the interrupted run wrote after it and continues
the same log.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor, nn

from diffin_lightning import lightning_state
from diffin_lightning.data import INDEX_KEY, IndexedDataset, dataset_fingerprint, find_indexed_dataset
from diffin_lightning.store import atomic_write_bytes
from diffin_lightning.version import __version__

FORMAT_VERSION = 1
INDEX_FILE = "trajectory.json"
FINAL_FILE = "final.safetensors"
# A typical run (auto interval) keeps this many parameter checkpoints plus the final parameters:
# with the per-step ids (4 bytes per sample visit), the log is about three times the model.
AUTO_CHECKPOINTS = 2
# Optimizer hyper-parameters the replay reads; the rest are kept for the record only.
_HYPER_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize", "betas", "eps", "amsgrad", "decoupled_weight_decay")


class TrajectoryLogError(ValueError):
    """A trajectory log that cannot be used, or a fit the log cannot record: says what and how to fix it."""


def checkpoint_file(step: int) -> str:
    return f"checkpoint-{step:09d}.safetensors"


def steps_file(first_step: int) -> str:
    return f"steps-{first_step:09d}.safetensors"


def _uses_randomness(module: nn.Module) -> bool:
    """Whether the forward may draw random numbers (dropout of any kind with p > 0)."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()) or any(
        isinstance(m, (nn.RReLU,)) for m in module.modules()
    )


def _default_index_fn(batch: Any) -> Tensor:
    if isinstance(batch, dict) and INDEX_KEY in batch:
        return batch[INDEX_KEY]
    raise TrajectoryLogError(
        f"TrajectoryLog: a training batch has no {INDEX_KEY!r} key, so the log cannot say which samples it held. "
        "Wrap the training set in diffin_lightning.IndexedDataset, or pass `index_fn=lambda batch: <ids tensor>`."
    )


@dataclass
class _StepRecord:
    step: int
    ids: list[list[int]]  # one list per micro-batch
    rng: list[Tensor]  # CPU RNG state per micro-batch ([] when not recorded)
    lr: list[float] | None = None  # per parameter group
    clip: float = 1.0
    skipped: bool = False
    rng_cuda: list[Tensor] = field(default_factory=list)  # the model's CUDA generator per micro-batch, on a GPU

    def to_state(self) -> dict[str, Any]:
        return {"step": self.step, "ids": self.ids, "rng": self.rng, "lr": self.lr, "clip": self.clip, "skipped": self.skipped, "rng_cuda": self.rng_cuda}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "_StepRecord":
        return _StepRecord(
            state["step"], state["ids"], list(state.get("rng", [])), state.get("lr"), float(state.get("clip", 1.0)),
            bool(state.get("skipped", False)), list(state.get("rng_cuda", [])),
        )


class TrajectoryLog(pl.Callback):
    """Records a run's trajectory so that influence on any target can be computed after training.

    Args:
        output_dir: the log's directory; default ``<trainer.log_dir or default_root_dir>/trajectory``.
        checkpoint_every_n_steps: K, the optimizer steps between parameter checkpoints. ``None``
            picks ``ceil(total steps / 2)`` at the start of fit: checkpoints at the start and half
            way, plus the final parameters (about three times the model, plus optimizer state and
            4 bytes per sample visit). Smaller K costs disk and speeds nothing up in the replay; it
            only bounds how far a float32 replay drifts before it is re-anchored.
        index_fn: ``index_fn(batch) -> Tensor[B]`` of sample ids; default ``batch["index"]``.
        record_rng: ``"auto"`` records each micro-batch's RNG state when the model has dropout
            (about 5 kB per micro-batch on the CPU), so the replay draws the same masks; ``True``
            always, ``False`` never.

    Example::

        >>> log = TrajectoryLog(output_dir="runs/x/trajectory", checkpoint_every_n_steps=100)
        >>> log.checkpoint_every_n_steps
        100
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        checkpoint_every_n_steps: int | None = None,
        index_fn: Callable[[Any], Tensor] | None = None,
        record_rng: bool | str = "auto",
    ) -> None:
        if checkpoint_every_n_steps is not None and (isinstance(checkpoint_every_n_steps, bool) or not isinstance(checkpoint_every_n_steps, int) or checkpoint_every_n_steps < 1):
            raise TrajectoryLogError(
                f"TrajectoryLog: `checkpoint_every_n_steps` must be a positive int or None (auto); got {checkpoint_every_n_steps!r}."
            )
        if record_rng not in ("auto", True, False):
            raise TrajectoryLogError(f"TrajectoryLog: `record_rng` must be 'auto', True or False; got {record_rng!r}.")
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.index_fn = index_fn or _default_index_fn
        self.record_rng = record_rng
        self.run_id: str | None = None
        self._pending: list[_StepRecord] = []
        self._open: _StepRecord | None = None
        self._index: dict[str, Any] | None = None
        self._restored: dict[str, Any] | None = None
        self._rng_on = False
        self._names: list[str] = []
        # Files are written by one background thread, in submission order: the fsync of an atomic
        # write costs milliseconds, which would otherwise stall the training loop at every checkpoint.
        self._writer: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output_dir=str(self.output_dir))

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_fit(trainer, pl_module)
        if self.output_dir is None:
            self.output_dir = Path(trainer.log_dir or trainer.default_root_dir) / "trajectory"
        if not trainer.is_global_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._rng_on = _uses_randomness(pl_module) if self.record_rng == "auto" else bool(self.record_rng)
        self._names = [name for name, p in pl_module.named_parameters() if p.requires_grad]
        if self._restored is not None:
            self._continue_log(trainer)
        else:
            self._start_log(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero or self._index is None:
            return
        if self._open is None:
            self._open_step(trainer, pl_module)
        assert self._open is not None
        ids = torch.as_tensor(self.index_fn(batch)).detach().to("cpu", torch.int64).reshape(-1)
        self._open.ids.append(ids.tolist())
        if self._rng_on:
            self._open.rng.append(torch.get_rng_state())
            if pl_module.device.type == "cuda":  # dropout on a GPU draws from the device's generator
                self._open.rng_cuda.append(torch.cuda.get_rng_state(pl_module.device))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not trainer.is_global_zero or self._open is None:
            return
        record = self._open
        record.lr = [float(group["lr"]) for group in optimizer.param_groups]
        record.skipped = lightning_state.scaler_will_skip(trainer.precision_plugin, optimizer)
        # Value clipping is not one factor: NaN, which the replay refuses.
        record.clip = 1.0 if record.skipped else float("nan") if lightning_state.clips_by_value(trainer) else lightning_state.norm_clip_factor(trainer, optimizer)
        self._pending.append(record)
        self._open = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._index is None:
            return
        self._open = None  # a step whose optimizer step never ran left no update
        self._flush_segment()
        tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in pl_module.named_parameters() if p.requires_grad}
        tensors.update({f"buffer/{name}": b.detach().cpu().contiguous() for name, b in pl_module.named_buffers()})
        self._write(self.output_dir / FINAL_FILE, save_safetensors_bytes(tensors))  # type: ignore[operator]
        self._index.update(complete=True, final_step=int(trainer.global_step), final_file=FINAL_FILE)
        self._write_index()
        self._drain()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drain(raise_errors=False)  # what was submitted before the failure reaches the disk

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drain(raise_errors=False)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def state_dict(self) -> dict[str, Any]:
        # Lightning is saving a checkpoint: the log's files up to this point must be on disk first,
        # since a fit resumed from that checkpoint continues from them.
        self._drain()
        return {
            "run_id": self.run_id,
            "checkpoint_every_n_steps": self.checkpoint_every_n_steps,
            "output_dir": None if self.output_dir is None else str(self.output_dir),
            "pending": [record.to_state() for record in self._pending],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.run_id = state_dict.get("run_id")
        if state_dict.get("checkpoint_every_n_steps") is not None:
            self.checkpoint_every_n_steps = int(state_dict["checkpoint_every_n_steps"])
        if self.output_dir is None and state_dict.get("output_dir"):
            self.output_dir = Path(state_dict["output_dir"])
        self._pending = [_StepRecord.from_state(s) for s in state_dict.get("pending", [])]

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _check_fit(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise TrajectoryLogError(
                "TrajectoryLog: manual optimization is not supported (the log reads each step from Lightning's "
                "optimizer hooks); got automatic_optimization=False. Use automatic optimization with one optimizer."
            )
        if len(trainer.optimizers) != 1:
            raise TrajectoryLogError(
                f"TrajectoryLog: exactly one optimizer is supported; got {len(trainer.optimizers)}. "
                "Return a single optimizer from configure_optimizers."
            )
        if trainer.world_size > 1:
            raise TrajectoryLogError(
                f"TrajectoryLog: single-device training only for now; got world_size={trainer.world_size}. "
                "Train on one device (trainer=cpu or trainer=gpu)."
            )

    def _start_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.output_dir is not None
        existing = self.output_dir / INDEX_FILE
        if existing.is_file():
            raise TrajectoryLogError(
                f"TrajectoryLog: `output_dir` {self.output_dir} already holds the log of another run ({INDEX_FILE}); "
                "a new fit would write over it. Give a new output_dir, delete the old log, or resume that run from "
                "its Lightning checkpoint (fit(..., ckpt_path=...)) to continue it."
            )
        if self.checkpoint_every_n_steps is None:
            total = trainer.estimated_stepping_batches
            total = 1000 if not math.isfinite(total) else max(1, int(total))
            self.checkpoint_every_n_steps = max(1, math.ceil(total / AUTO_CHECKPOINTS))
        self.run_id = uuid.uuid4().hex
        optimizer = trainer.optimizers[0]
        if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
            rank_zero_warn(
                f"TrajectoryLog: the optimizer is {type(optimizer).__name__}; trajectory_influence replays torch.optim.SGD, "
                "Adam and AdamW only and will refuse this log. Train with one of those to replay it."
            )
        names_of = {id(p): name for name, p in pl_module.named_parameters()}
        groups = []
        for group in optimizer.param_groups:
            hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k in _HYPER_KEYS}
            groups.append({"params": [names_of[id(p)] for p in group["params"] if id(p) in names_of], "hyper": hyper})
        parameters = {
            name: {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")}
            for name, p in pl_module.named_parameters()
            if p.requires_grad
        }
        dataset = lightning_state.train_dataset(trainer)  # None where it has no length: no N, no fingerprint
        num_samples = None if dataset is None else len(dataset)
        self._index = {
            "kind": "diffin_lightning.trajectory",
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "run_id": self.run_id,
            "num_samples": num_samples,
            "fingerprint": None if dataset is None else dataset_fingerprint(find_indexed_dataset(dataset) or dataset),
            "checkpoint_every_n_steps": self.checkpoint_every_n_steps,
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "gradient_clip_val": None if trainer.gradient_clip_val is None else float(trainer.gradient_clip_val),
            "gradient_clip_algorithm": lightning_state.clip_algorithm(trainer),
            "precision": str(trainer.precision),
            "optimizer": {"class": type(optimizer).__name__, "module": type(optimizer).__module__, "groups": groups},
            "parameters": parameters,
            "record_rng": self._rng_on,
            "checkpoints": [],
            "segments": [],
            "complete": False,
        }
        self._write_index()

    def _continue_log(self, trainer: pl.Trainer) -> None:
        """A resumed fit: keep what the interrupted run wrote up to the restored state, drop the rest."""
        assert self.output_dir is not None and self._restored is not None
        path = self.output_dir / INDEX_FILE
        if not path.is_file():
            raise TrajectoryLogError(
                f"TrajectoryLog: resuming run {self.run_id} but {path} does not exist. Resume with the same "
                "`output_dir` the interrupted fit wrote to (its log must be there)."
            )
        index = json.loads(path.read_text())
        if index.get("run_id") != self.run_id:
            raise TrajectoryLogError(
                f"TrajectoryLog: {path} belongs to run {index.get('run_id')!r}, but the checkpoint being resumed is "
                f"from run {self.run_id!r}. Point `output_dir` at the interrupted run's log."
            )
        keep_from = self._pending[0].step if self._pending else int(trainer.global_step)
        for segment in [s for s in index["segments"] if s["start"] >= keep_from]:
            (self.output_dir / segment["file"]).unlink(missing_ok=True)
        for step in [c for c in index["checkpoints"] if c > keep_from]:
            (self.output_dir / checkpoint_file(step)).unlink(missing_ok=True)
        index["segments"] = [s for s in index["segments"] if s["start"] < keep_from]
        index["checkpoints"] = [c for c in index["checkpoints"] if c <= keep_from]
        index.update(complete=False, resumed_at_step=int(trainer.global_step))
        index.pop("final_step", None)
        (self.output_dir / FINAL_FILE).unlink(missing_ok=True)
        self._index = index
        self._rng_on = bool(index["record_rng"])
        self._restored = None
        self._write_index()

    def _open_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = int(trainer.global_step)
        assert self.checkpoint_every_n_steps is not None
        if step % self.checkpoint_every_n_steps == 0:
            self._flush_segment()
            self._write_checkpoint(step, trainer, pl_module)
        self._open = _StepRecord(step=step, ids=[], rng=[])

    def _write_checkpoint(self, step: int, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._index is not None and self.output_dir is not None
        tensors: dict[str, Tensor] = {}
        for name, p in pl_module.named_parameters():
            if p.requires_grad:
                tensors[f"param/{name}"] = p.detach().cpu().contiguous()
        for name, b in pl_module.named_buffers():
            tensors[f"buffer/{name}"] = b.detach().cpu().contiguous()
        optimizer = trainer.optimizers[0]
        names_of = {id(p): name for name, p in pl_module.named_parameters()}
        scalars: dict[str, Any] = {}
        for p, state in optimizer.state.items():
            name = names_of.get(id(p))
            if name is None:
                continue
            for key, value in state.items():
                if isinstance(value, Tensor):
                    tensors[f"optim/{name}/{key}"] = value.detach().cpu().contiguous()
                elif isinstance(value, (int, float, bool)):
                    scalars[f"{name}/{key}"] = value
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for device, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng/cuda{device}"] = state
        metadata = {"step": str(step), "run_id": str(self.run_id), "optimizer_scalars": json.dumps(scalars)}
        self._write(self.output_dir / checkpoint_file(step), save_safetensors_bytes(tensors, metadata=metadata))
        self._index["checkpoints"] = sorted(set(self._index["checkpoints"]) | {step})
        self._write_index()

    def _flush_segment(self) -> None:
        """Write the pending step records as one segment file (the steps since the last checkpoint)."""
        if not self._pending:
            return
        assert self._index is not None and self.output_dir is not None
        records = self._pending
        first = records[0].step
        micro_sizes = [len(ids) for record in records for ids in record.ids]
        tensors = {
            "steps": torch.tensor([r.step for r in records], dtype=torch.int64),
            # int32 halves the log's largest per-step part; ids are < 2**31 for any data set that fits a run.
            "ids": torch.tensor([i for r in records for ids in r.ids for i in ids], dtype=torch.int32 if self._index["num_samples"] is not None and self._index["num_samples"] < 2**31 else torch.int64),
            "micro_batches": torch.tensor([len(r.ids) for r in records], dtype=torch.int64),
            "micro_sizes": torch.tensor(micro_sizes, dtype=torch.int64),
            "lr": torch.tensor([r.lr for r in records], dtype=torch.float64),
            "clip": torch.tensor([r.clip for r in records], dtype=torch.float64),
            "skipped": torch.tensor([r.skipped for r in records], dtype=torch.uint8),
        }
        if self._rng_on:
            tensors["rng"] = torch.stack([state for r in records for state in r.rng])
            if any(r.rng_cuda for r in records):
                tensors["rng_cuda"] = torch.stack([state for r in records for state in r.rng_cuda])
        self._write(self.output_dir / steps_file(first), save_safetensors_bytes(tensors, metadata={"run_id": str(self.run_id)}))
        segments = [s for s in self._index["segments"] if s["start"] != first]
        segments.append({"start": first, "num_steps": len(records), "file": steps_file(first)})
        self._index["segments"] = sorted(segments, key=lambda s: s["start"])
        self._pending = []  # the index is written with the checkpoint that follows, or at the end

    def _write_index(self) -> None:
        assert self._index is not None and self.output_dir is not None
        # Serialised now: the index keeps changing while the writer thread works.
        self._write(self.output_dir / INDEX_FILE, (json.dumps(self._index, indent=2, sort_keys=True) + "\n").encode())

    def _write(self, path: Path, payload: bytes) -> None:
        """Atomic write (temporary file, fsync, rename) on the writer thread, after every earlier one."""
        self._raise_failed_writes()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trajectory-log")
        self._writes.append(self._writer.submit(atomic_write_bytes, path, payload))

    def _raise_failed_writes(self) -> None:
        done = [w for w in self._writes if w.done()]
        self._writes = [w for w in self._writes if not w.done()]
        for write in done:
            write.result()  # re-raises the writer's error (disk full, permissions) in the training thread

    def _drain(self, raise_errors: bool = True) -> None:
        writes, self._writes = self._writes, []
        for write in writes:
            try:
                write.result()
            except Exception:
                if raise_errors:
                    raise


# ---------------------------------------------------------------------- reading


@dataclass
class Segment:
    """One segment's step records, read back."""

    steps: Tensor
    ids: list[list[Tensor]]  # per step, per micro-batch
    lr: Tensor  # [steps, groups]
    clip: Tensor
    skipped: Tensor
    rng: list[list[Tensor]] | None
    rng_cuda: list[list[Tensor]] | None = None


def read_index(log_dir: str | Path, argument: str = "log_dir") -> dict[str, Any]:
    """The log's index, refusing a directory that holds no log or a log of another format."""
    path = Path(log_dir) / INDEX_FILE
    if not path.is_file():
        raise TrajectoryLogError(
            f"`{argument}` {log_dir} holds no trajectory log ({INDEX_FILE} is missing). Pass the `output_dir` of the "
            "TrajectoryLog callback that recorded the run (the train app writes it to <run_dir>/trajectory)."
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TrajectoryLogError(f"`{argument}`: {path} is not valid JSON ({error}); the log is damaged, re-record the run.") from error
    if index.get("kind") != "diffin_lightning.trajectory" or index.get("format_version") != FORMAT_VERSION:
        raise TrajectoryLogError(
            f"`{argument}`: {path} is not a trajectory log of format version {FORMAT_VERSION} (kind "
            f"{index.get('kind')!r}, version {index.get('format_version')!r}). Re-record the run with this library version."
        )
    return index


def read_tensors(path: Path, argument: str = "log_dir") -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise TrajectoryLogError(
            f"`{argument}`: the log names {path.name} but {path} is missing; the log is incomplete (a file was "
            "deleted or never written). Re-record the run, or resume it from a Lightning checkpoint so it rewrites the file."
        )
    payload = path.read_bytes()
    from safetensors import safe_open  # metadata reader; no code execution

    tensors = load_safetensors_bytes(payload)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return tensors, metadata


def read_segment(log_dir: Path, segment: dict[str, Any], run_id: str) -> Segment:
    tensors, metadata = read_tensors(log_dir / segment["file"])
    if metadata.get("run_id") != run_id:
        raise TrajectoryLogError(
            f"`log_dir`: {segment['file']} belongs to run {metadata.get('run_id')!r}, the index to run {run_id!r}: "
            "files of two runs were mixed in one directory. Re-record the run into an empty directory."
        )
    flat = tensors["ids"].to(torch.int64)
    sizes = tensors["micro_sizes"].tolist()
    per_step = tensors["micro_batches"].tolist()
    micro = list(torch.split(flat, sizes)) if sizes else []
    rng_all, cuda_all = tensors.get("rng"), tensors.get("rng_cuda")
    ids: list[list[Tensor]] = []
    rng: list[list[Tensor]] | None = [] if rng_all is not None else None
    rng_cuda: list[list[Tensor]] | None = [] if cuda_all is not None else None
    cursor = 0
    for count in per_step:
        ids.append(micro[cursor : cursor + count])
        # set_rng_state needs a tensor with its own storage, not a row of the stacked one.
        if rng is not None and rng_all is not None:
            rng.append([rng_all[k].clone() for k in range(cursor, cursor + count)])
        if rng_cuda is not None and cuda_all is not None:
            rng_cuda.append([cuda_all[k].clone() for k in range(cursor, cursor + count)])
        cursor += count
    return Segment(tensors["steps"], ids, tensors["lr"], tensors["clip"], tensors["skipped"].bool(), rng, rng_cuda)
