"""Training-dynamics baselines recorded in the same run: EL2N scores and forgetting counts.

The coreset task compares Diff-In against two standard data-pruning scores, both
read off the training run itself rather than recomputed afterwards:

- EL2N (Paul et al., 2021): ``|softmax(f(x_i)) - onehot(y_i)|_2`` with the model of an
  early epoch (the forward at sample i's visit in epoch ``el2n_epoch``);
- forgetting counts (Toneva et al., 2019): how often a sample went from correctly to
  wrongly classified between consecutive visits; samples never learned get the
  largest count plus one, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from diffin_lightning import distributed
from diffin_lightning.store import atomic_write_bytes

DYNAMICS_FILE = "dynamics.safetensors"


def _default_logits(module: pl.LightningModule, batch: Any) -> Tensor:
    return module(batch["input"])


class TrainingDynamicsCallback(Callback):
    """Records EL2N and forgetting counts for every training sample.

    Args:
        el2n_epoch: the epoch whose visits give the EL2N score (early in training).
        logits_fn: ``logits_fn(module, batch) -> Tensor[B, C]``; default ``module(batch["input"])``.
        label_key: where the batch keeps the labels.
        output_dir: where ``dynamics.safetensors`` goes; default ``trainer.log_dir``.
    """

    def __init__(
        self,
        el2n_epoch: int = 1,
        logits_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        label_key: str = "target",
        output_dir: str | Path | None = None,
    ) -> None:
        if isinstance(el2n_epoch, bool) or not isinstance(el2n_epoch, int) or el2n_epoch < 0:
            raise ValueError(f"`el2n_epoch` must be a non-negative int; got {el2n_epoch!r}.")
        self.el2n_epoch = el2n_epoch
        self.logits_fn = logits_fn or _default_logits
        self.label_key = label_key
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.el2n: Tensor | None = None
        self.forgetting: Tensor | None = None
        self.last_correct: Tensor | None = None
        self.ever_correct: Tensor | None = None
        self.output_path: Path | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.el2n is None:
            n = len(trainer.train_dataloader.dataset)
            self.el2n = torch.full((n,), float("nan"), dtype=torch.float64)
            self.forgetting = torch.zeros(n, dtype=torch.float64)
            self.last_correct = torch.zeros(n, dtype=torch.bool)
            self.ever_correct = torch.zeros(n, dtype=torch.bool)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.el2n is not None and self.forgetting is not None
        assert self.last_correct is not None and self.ever_correct is not None
        device = pl_module.device
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            logits = self.logits_fn(pl_module, batch).detach()
        labels = batch[self.label_key]
        ids = batch["index"].cpu()
        correct = (logits.argmax(-1) == labels).cpu()
        error = (F.softmax(logits.double(), -1) - F.one_hot(labels, logits.shape[-1]).double()).norm(dim=-1).cpu()
        if distributed.world_size() > 1:
            # Under DDP a sample's consecutive visits can fall on different ranks: every rank
            # follows every rank's samples, so each holds the whole run's counts.
            ids, correct, error = _gather_visits(ids, correct, error)
        self.forgetting[ids] += (self.last_correct[ids] & ~correct).double()
        self.last_correct[ids] = correct
        self.ever_correct[ids] |= correct
        if trainer.current_epoch == self.el2n_epoch:
            self.el2n[ids] = error

    def scores(self) -> dict[str, Tensor]:
        """``el2n`` and ``forgetting`` (never-learned samples: the largest count plus one)."""
        assert self.el2n is not None and self.forgetting is not None and self.ever_correct is not None
        forgetting = self.forgetting.clone()
        forgetting[~self.ever_correct] = forgetting.max() + 1
        return {"el2n": self.el2n.clone(), "forgetting": forgetting}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self.el2n is None:
            return
        directory = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        metadata = {"el2n_epoch": str(self.el2n_epoch), "epochs": str(trainer.current_epoch)}
        self.output_path = directory / DYNAMICS_FILE
        atomic_write_bytes(self.output_path, save_safetensors_bytes(self.scores(), metadata=metadata))

    def state_dict(self) -> dict[str, Any]:
        if self.el2n is None:
            return {}
        return {"el2n": self.el2n, "forgetting": self.forgetting, "last_correct": self.last_correct, "ever_correct": self.ever_correct}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("el2n", "forgetting", "last_correct", "ever_correct"):
            if key in state_dict:
                setattr(self, key, state_dict[key])


def _gather_visits(ids: Tensor, correct: Tensor, error: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's (ids, correct, error) of this batch, in rank order (shards may differ in size)."""
    gathered: list[Any] = [None] * distributed.world_size()
    torch.distributed.all_gather_object(gathered, (ids, correct, error))
    return tuple(torch.cat([part[k] for part in gathered]) for k in range(3))  # type: ignore[return-value]


class DynamicsFileError(ValueError):
    """``dynamics.safetensors`` is unreadable or not what :class:`TrainingDynamicsCallback` writes."""


_DYNAMICS_FIX = "Re-run the training with TrainingDynamicsCallback (the file is written at the end of fit), and do not edit it by hand."


def load_dynamics(directory: str | Path) -> dict[str, Tensor]:
    """Read ``dynamics.safetensors`` (EL2N and forgetting counts) from a run directory, checked.

    safetensors runs no code on load; what it reads is then checked to be the pair this
    callback writes: ``el2n`` (floating, finite) and ``forgetting`` (whole counts >= 0), one
    value per training sample each. Anything else is refused naming the file, the rule, the
    value and the fix, instead of failing later inside a task.
    """
    path = Path(directory) / DYNAMICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run was trained without TrainingDynamicsCallback.")
    try:
        scores = load_safetensors_bytes(path.read_bytes())
    except Exception as error:  # safetensors' own error types vary by version: a truncated or foreign file
        raise DynamicsFileError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error}). {_DYNAMICS_FIX}") from error
    if set(scores) != {"el2n", "forgetting"}:
        raise DynamicsFileError(f"{path}: must hold the tensors ['el2n', 'forgetting']; holds {sorted(scores)}. {_DYNAMICS_FIX}")
    el2n, forgetting = scores["el2n"], scores["forgetting"]
    for name, tensor in scores.items():
        if tensor.dim() != 1:
            raise DynamicsFileError(f"{path}: {name!r} must be 1-d, one value per sample; has shape {tuple(tensor.shape)}. {_DYNAMICS_FIX}")
    if el2n.shape != forgetting.shape:
        raise DynamicsFileError(
            f"{path}: 'el2n' and 'forgetting' must hold one value per sample each; they hold {el2n.numel()} and "
            f"{forgetting.numel()}. {_DYNAMICS_FIX}"
        )
    if not el2n.dtype.is_floating_point or not bool(torch.isfinite(el2n).all()):
        problem = f"dtype {el2n.dtype}" if not el2n.dtype.is_floating_point else f"{int((~torch.isfinite(el2n)).sum())} non-finite value(s)"
        raise DynamicsFileError(f"{path}: 'el2n' must be finite floats; got {problem}. {_DYNAMICS_FIX}")
    counts = forgetting.double()
    if forgetting.dtype == torch.bool or not bool((torch.isfinite(counts) & (counts >= 0) & (counts == counts.round())).all()):
        raise DynamicsFileError(f"{path}: 'forgetting' must be counts (whole numbers >= 0, stored as float64); got dtype {forgetting.dtype} with other values. {_DYNAMICS_FIX}")
    return scores


__all__ = ["DynamicsFileError", "TrainingDynamicsCallback", "load_dynamics"]
