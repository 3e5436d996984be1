"""Retraining a run's exact config on a subset of its training ids, quietly, with progress."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

import lightning.pytorch as pl
from hydra.utils import instantiate
from tqdm.auto import tqdm

from diffin_lightning.builders import build_datamodule, build_model
from diffin_lightning.tasks.run import TrainedRun


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*treespec.*")  # a Lightning-internal deprecation
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def retrain(run: TrainedRun, keep_ids: Sequence[int] | None, seed: int | None = None) -> Any:
    """Train the run's model again on ``keep_ids`` (all ids when ``None``) and return it.

    With ``seed=None`` the run's own seed is used, so the model starts from the same
    initialisation and, for kept samples, the same relative order. Another ``seed``
    changes the initialisation and, where the data module takes ``shuffle_seed``, the order.
    """
    config = run.config
    overrides: dict[str, Any] = {"keep_ids": None if keep_ids is None else list(keep_ids)}
    if seed is not None and "shuffle_seed" in config.data:
        overrides["shuffle_seed"] = seed
    pl.seed_everything(config.seed if seed is None else seed, workers=True, verbose=False)
    datamodule = build_datamodule(config.data, **overrides)
    model = build_model(config.model, datamodule)
    with _quiet_lightning(), tempfile.TemporaryDirectory() as scratch:
        trainer = instantiate(
            config.trainer,
            devices=1,
            strategy="auto",
            default_root_dir=scratch,
            logger=False,
            callbacks=[],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, datamodule=datamodule)
    return model.cpu().eval()


def progress(jobs: Iterable[Any], description: str, total: int | None = None) -> Iterable[Any]:
    """A progress bar over retraining jobs (stderr), so long work says what it does."""
    return tqdm(jobs, desc=description, total=total, unit="retrain", leave=True)
