"""A finished training run, read back from its directory: config, data, influence, checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import Tensor

from diffin_lightning.builders import build_datamodule
from diffin_lightning.errors import UsageError
from diffin_lightning.safe_config import check_run_config
from diffin_lightning.store import METADATA_FILE, TENSOR_FILE, InfluenceResult, has_result, load_influence

SCORES = ("diffin", "first_order", "second_order")


@dataclass
class TrainedRun:
    """What the analysis tasks read from a train run's directory (nothing is recomputed)."""

    directory: Path
    config: DictConfig
    datamodule: Any
    influence: InfluenceResult

    @cached_property
    def model(self) -> Any:
        """The model at the end of training, from ``checkpoints/last.ckpt``, in eval mode on the CPU."""
        checkpoint = self.directory / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise UsageError(f"run_dir {self.directory} has no checkpoints/last.ckpt; was it written by diffin_lightning.train?")
        model_class = get_class(self.config.model._target_)
        model = model_class.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
        return model.eval()

    def scores(self, target: str, score: str) -> Tensor:
        if target not in self.influence:
            raise UsageError(f"target must be one of the run's targets {sorted(self.influence)}; got {target!r}.")
        if score not in SCORES:
            raise UsageError(f"score must be one of {SCORES}; got {score!r}.")
        return self.influence[target].component(score)

    def default_target(self, preferred: tuple[str, ...]) -> str:
        for name in preferred:
            if name in self.influence:
                return name
        return next(iter(self.influence))

    @property
    def train_labels(self) -> Tensor:
        return self.datamodule.train_labels

    @property
    def corrupted(self) -> Tensor | None:
        return getattr(self.datamodule, "corrupted", None)


def load_run(run_dir: str | Path | None, *, allowed_targets: Any = None) -> TrainedRun:
    """Open a train run's directory, refusing one without influence files or recorded on other data.

    The directory's ``config.yaml`` may only name ``_target_``s inside the allow-list of
    :mod:`diffin_lightning.safe_config` (this package, the Lightning trainer classes, and the
    modules in ``allowed_targets`` or ``$DIFFIN_ALLOWED_TARGETS``): it is checked before anything
    is built from it.
    """
    if run_dir in (None, "", "???"):
        raise UsageError("run_dir is required: pass run_dir=<a train run's output directory>.")
    directory = Path(str(run_dir)).expanduser()
    if not directory.is_dir():
        raise UsageError(f"run_dir {directory} is not a directory.")
    # A first write of the scores killed between its renames holds the tensors and the pending
    # metadata; load_influence reads that pair (has_result says so), so it is no reason to refuse.
    missing = [] if has_result(directory) else [name for name in (TENSOR_FILE, METADATA_FILE) if not (directory / name).is_file()]
    missing += [name for name in ("config.yaml",) if not (directory / name).is_file()]
    if missing:
        raise UsageError(
            f"run_dir {directory} has no {missing[0]}: point run_dir at the directory that diffin_lightning.train "
            "printed at the end of its run."
        )
    config = check_run_config(directory / "config.yaml", allowed=allowed_targets)
    datamodule = build_datamodule(config.data)
    train_dataset = getattr(datamodule, "train_dataset", None)
    if train_dataset is None:
        raise UsageError(f"{type(datamodule).__name__} has no `train_dataset`; the analysis tasks need one (see ClassificationDataModule).")
    influence = load_influence(directory, dataset=train_dataset)
    return TrainedRun(directory=directory, config=config, datamodule=datamodule, influence=influence)


def suspicion(scores: Tensor, target_kind: str) -> Tensor:
    """Higher = more suspicious: high self-influence, or low (harmful) influence on any other target."""
    return scores if target_kind == "self" else -scores


def evaluate(model: Any, dataset: Any, batch_size: int = 1024) -> dict[str, float]:
    """Mean per-sample loss and accuracy of ``model`` on a ``TensorDataset``-like split."""
    from torch.utils.data import DataLoader

    from diffin_lightning.data import IndexedDataset

    losses, correct, count = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(IndexedDataset(dataset), batch_size=batch_size):
            losses += float(model.per_sample_loss(batch).double().sum())
            correct += int((model.predict_labels(batch) == batch["target"]).sum())
            count += len(batch["target"])
    return {"loss": losses / count, "accuracy": correct / count}


def target_split(run: TrainedRun, target: str) -> Any:
    """The data whose mean loss is the target loss."""
    if target == "val":
        return run.datamodule.val_dataset
    if target == "test":
        return run.datamodule.test_dataset
    if target == "train":
        return run.datamodule.train_dataset.dataset
    raise UsageError(f"the target loss of {target!r} cannot be evaluated after training; use val, test or train.")


def predictions_on_train(run: TrainedRun) -> Tensor:
    from torch.utils.data import DataLoader

    model = run.model
    out = []
    with torch.no_grad():
        for batch in DataLoader(run.datamodule.train_dataset, batch_size=1024):
            out.append(model.predict_labels(batch))
    return torch.cat(out)
