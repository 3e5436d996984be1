"""Small classifiers with the per-sample loss the callback asks for.

Both read ``{"input", "target"}`` batches (what IndexedDataset makes of ``(x, y)``
pairs), train with plain SGD by default (the maths is exact for it) and expose
``predict_labels`` for the analysis tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Classifier(pl.LightningModule):
    """Shared training logic: cross-entropy per sample, SGD, logged accuracy."""

    net: nn.Module

    def __init__(self, lr: float, momentum: float, weight_decay: float) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr` must be positive; got {lr!r}.")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def per_sample_loss(self, batch: dict[str, Any]) -> Tensor:
        return F.cross_entropy(self(batch["input"]), batch["target"], reduction="none")

    def predict_labels(self, batch: dict[str, Any]) -> Tensor:
        return self(batch["input"]).argmax(-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        size = len(batch["target"])
        self.log("val_loss", self.per_sample_loss(batch).mean(), prog_bar=True, batch_size=size)
        self.log("val_acc", (self.predict_labels(batch) == batch["target"]).float().mean(), prog_bar=True, batch_size=size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class MLPClassifier(Classifier):
    """A multilayer perceptron (tanh: smooth, so finite differences behave).

    Args:
        input_shape: shape of one sample (flattened).
        num_classes: output classes.
        hidden_dims: widths of the hidden layers.
        lr, momentum, weight_decay: SGD settings (momentum and weight decay 0 keep the maths exact).
        dropout: dropout probability after each hidden layer (0: none).
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (64,),
        num_classes: int = 10,
        hidden_dims: Sequence[int] = (64,),
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(lr, momentum, weight_decay)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}. Use 0 for no dropout.")
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)


class CNNClassifier(Classifier):
    """A small convolutional network for ``[C, H, W]`` inputs (no batch norm: per-sample losses stay per-sample).

    Args:
        input_shape: ``[C, H, W]``.
        num_classes: output classes.
        channels: output channels of the two 3x3 convolutions.
        lr, momentum, weight_decay: SGD settings.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: Sequence[int] = (8, 16),
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, momentum, weight_decay)
        self.save_hyperparameters()
        if len(input_shape) != 3:
            raise ValueError(f"`input_shape` must be [C, H, W] for CNNClassifier; got {list(input_shape)}. Use a data module that gives [C, H, W] samples: data=digits data.image=true.")
        c, h, w = input_shape
        self.net = nn.Sequential(
            nn.Conv2d(c, channels[0], 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(channels[0], channels[1], 3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(channels[1] * (h // 2) * (w // 2), num_classes),
        )
