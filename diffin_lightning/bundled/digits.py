"""scikit-learn's digits (1,797 8x8 images, shipped inside the package) with optional label noise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from diffin_lightning.bundled.datamodule import ClassificationDataModule


@dataclass(frozen=True)
class DigitsSplits:
    """Standardized digits split into train/val/test, with the train labels possibly corrupted.

    Attributes:
        train, val, test: ``TensorDataset(features [n, 64], labels [n])``; train labels are the noisy ones.
        flipped: bool ``[N_train]``, True where the train label was changed.
        clean_train_labels: the train labels before corruption.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    flipped: Tensor
    clean_train_labels: Tensor


def load_digits_splits(
    label_noise: float = 0.0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    noise_seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DigitsSplits:
    """Load digits, standardize with train statistics, split, and flip a fraction of train labels.

    A flipped label is replaced by a different class drawn uniformly, so exactly
    ``round(label_noise * N_train)`` labels are wrong and the record says which.
    """
    from sklearn.datasets import load_digits

    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"`label_noise` must be in [0, 1); got {label_noise!r}.")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"`val_fraction` and `test_fraction` must be in (0, 1) with a sum below 1; got {val_fraction}, {test_fraction}."
        )
    bunch = load_digits()
    features = torch.as_tensor(bunch.data, dtype=torch.float64)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_val, n_test = round(val_fraction * len(labels)), round(test_fraction * len(labels))
    val_ids, test_ids, train_ids = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    mean = features[train_ids].mean(0)
    std = features[train_ids].std(0).clamp_min(1e-6)
    features = ((features - mean) / std).to(dtype)

    train_labels = labels[train_ids].clone()
    generator = torch.Generator().manual_seed(noise_seed)
    n_flip = round(label_noise * len(train_ids))
    flip_ids = torch.randperm(len(train_ids), generator=generator)[:n_flip]
    shift = torch.randint(1, 10, (n_flip,), generator=generator)
    train_labels[flip_ids] = (train_labels[flip_ids] + shift) % 10
    flipped = torch.zeros(len(train_ids), dtype=torch.bool)
    flipped[flip_ids] = True
    return DigitsSplits(
        train=TensorDataset(features[train_ids], train_labels),
        val=TensorDataset(features[val_ids], labels[val_ids]),
        test=TensorDataset(features[test_ids], labels[test_ids]),
        flipped=flipped,
        clean_train_labels=labels[train_ids],
    )


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's digits as a LightningDataModule, with label noise and a record of what was flipped.

    Args:
        label_noise: fraction of train labels replaced by a different class.
        batch_size: train batch size.
        split_seed: seeds the train/val/test split.
        noise_seed: seeds which labels are flipped and to what.
        shuffle_seed: seeds the per-epoch shuffle (replayable, see EpochSeededSampler).
        val_fraction, test_fraction: split sizes.
        image: give samples as ``[1, 8, 8]`` images (for a CNN) instead of 64 features.
        double: float64 features (reference tests).
        keep_ids: train on these ids only (retraining for deletion and coresets); ids keep
            their meaning in the full training set.
    """

    def __init__(
        self,
        label_noise: float = 0.0,
        batch_size: int = 64,
        split_seed: int = 0,
        noise_seed: int = 0,
        shuffle_seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        image: bool = False,
        double: bool = False,
        keep_ids: Sequence[int] | None = None,
    ) -> None:
        splits = load_digits_splits(
            label_noise=label_noise,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            noise_seed=noise_seed,
            dtype=torch.float64 if double else torch.float32,
        )
        if image:
            splits = DigitsSplits(
                *(TensorDataset(d.tensors[0].view(-1, 1, 8, 8), d.tensors[1]) for d in (splits.train, splits.val, splits.test)),
                flipped=splits.flipped,
                clean_train_labels=splits.clean_train_labels,
            )
        self.splits = splits
        super().__init__(
            train=splits.train,
            val=splits.val,
            test=splits.test,
            num_classes=10,
            corrupted=splits.flipped,
            batch_size=batch_size,
            shuffle_seed=shuffle_seed,
            keep_ids=keep_ids,
            original_labels=splits.clean_train_labels,
        )
