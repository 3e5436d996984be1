"""The data-module contract that the Hydra apps and the post-hoc tasks rely on.

Any LightningDataModule works for training; the analysis tasks additionally read
``train_dataset`` (an :class:`IndexedDataset`), ``val_dataset``, ``test_dataset``,
``corrupted`` (a bool tensor ``[N]`` or ``None``), ``model_kwargs()`` and accept
``keep_ids`` to retrain on a subset. This base class provides all of it for
in-memory ``TensorDataset`` splits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from diffin_lightning.data import EpochSeededSampler, IndexedDataset, ResumableDataLoader


class KeptIdsSampler(EpochSeededSampler):
    """Shuffles only the kept ids, with the same ``(seed, epoch)`` rule as EpochSeededSampler."""

    def __init__(self, kept_ids: Sequence[int], seed: int) -> None:
        super().__init__(len(kept_ids), seed=seed)
        self.kept_ids = list(kept_ids)

    def order(self, epoch: int) -> list[int]:
        return [self.kept_ids[i] for i in super().order(epoch)]

    def __iter__(self) -> Iterator[int]:
        # The base class streams positions in [0, len(kept_ids)) without calling order(); map each
        # one to its kept id, or a retrain would train on the first len(kept_ids) ids instead.
        kept_ids = self.kept_ids
        for position in super().__iter__():
            yield kept_ids[position]


class ClassificationDataModule(pl.LightningDataModule):
    """Train/val/test ``TensorDataset`` splits with stable train ids and a replayable order."""

    def __init__(
        self,
        train: TensorDataset,
        val: TensorDataset,
        test: TensorDataset,
        num_classes: int,
        corrupted: Tensor | None,
        batch_size: int,
        shuffle_seed: int,
        keep_ids: Sequence[int] | None = None,
        original_labels: Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int; got {batch_size!r}.")
        self.train_dataset = IndexedDataset(train)
        self.val_dataset = val
        self.test_dataset = test
        self.num_classes = num_classes
        self.corrupted = corrupted
        self.original_labels = original_labels  # the train labels before corruption, where known
        self.batch_size = batch_size
        self.shuffle_seed = shuffle_seed
        self.keep_ids = None if keep_ids is None else sorted(int(i) for i in keep_ids)
        if self.keep_ids is not None and (not self.keep_ids or self.keep_ids[0] < 0 or self.keep_ids[-1] >= len(train)):
            raise ValueError(f"`keep_ids` must be a non-empty list of ids in [0, {len(train)}); got {len(self.keep_ids)} ids.")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.val_dataset.tensors[0].shape[1:])

    def model_kwargs(self) -> dict[str, Any]:
        """What a model needs to know about the data: input shape and number of classes."""
        return {"input_shape": list(self.input_shape), "num_classes": self.num_classes}

    @property
    def train_labels(self) -> Tensor:
        return self.train_dataset.dataset.tensors[1]

    def train_dataloader(self) -> DataLoader:
        if self.keep_ids is None:
            sampler = EpochSeededSampler(len(self.train_dataset), seed=self.shuffle_seed)
        else:
            sampler = KeptIdsSampler(self.keep_ids, seed=self.shuffle_seed)
        # Resumable: a run resumed from a mid-epoch checkpoint goes on with the epoch's next batch.
        return ResumableDataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(IndexedDataset(self.val_dataset), batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(IndexedDataset(self.test_dataset), batch_size=512)

