"""A synthetic classification generator for scale and speed: any N, dimension and class count."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from diffin_lightning.bundled.datamodule import ClassificationDataModule


class SyntheticDataModule(ClassificationDataModule):
    """Gaussian inputs labelled by a random linear teacher, with optional label noise.

    Args:
        num_samples: training samples N (val and test get ``num_samples // 4`` each).
        dim: input features.
        num_classes: classes of the teacher.
        label_noise: fraction of train labels replaced by a different class.
        batch_size: train batch size.
        seed: seeds inputs, teacher and noise.
        shuffle_seed: seeds the per-epoch shuffle.
        keep_ids: train on these ids only.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        dim: int = 32,
        num_classes: int = 4,
        label_noise: float = 0.0,
        batch_size: int = 64,
        seed: int = 0,
        shuffle_seed: int = 0,
        keep_ids: Sequence[int] | None = None,
    ) -> None:
        for name, value in (("num_samples", num_samples), ("dim", dim), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "num_classes" else 1):
                raise ValueError(f"`{name}` must be a positive int (num_classes at least 2); got {value!r}.")
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"`label_noise` must be in [0, 1); got {label_noise!r}.")
        generator = torch.Generator().manual_seed(seed)
        total = num_samples + 2 * (num_samples // 4 or 1)
        inputs = torch.randn(total, dim, generator=generator)
        teacher = torch.randn(dim, num_classes, generator=generator)
        labels = (inputs @ teacher + 0.3 * torch.randn(total, num_classes, generator=generator)).argmax(1)
        n_val = num_samples // 4 or 1
        train_labels = labels[:num_samples].clone()
        n_flip = round(label_noise * num_samples)
        flip_ids = torch.randperm(num_samples, generator=generator)[:n_flip]
        train_labels[flip_ids] = (train_labels[flip_ids] + torch.randint(1, num_classes, (n_flip,), generator=generator)) % num_classes
        corrupted = torch.zeros(num_samples, dtype=torch.bool)
        corrupted[flip_ids] = True
        super().__init__(
            train=TensorDataset(inputs[:num_samples], train_labels),
            val=TensorDataset(inputs[num_samples : num_samples + n_val], labels[num_samples : num_samples + n_val]),
            test=TensorDataset(inputs[num_samples + n_val :], labels[num_samples + n_val :]),
            num_classes=num_classes,
            corrupted=corrupted,
            batch_size=batch_size,
            shuffle_seed=shuffle_seed,
            keep_ids=keep_ids,
            original_labels=labels[:num_samples],
        )
